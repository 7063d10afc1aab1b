"""Light client of the paced service (httpx, pyarrow, tenacity; never torch or vLLM at import).

- `ShardClient(run_url, token=...)`: lease shards of a run lazily, renew them in the
  background, ack them after the optimizer step that used their last row (`step_done()`);
  `rows()`, `batches(n)`, `dataset()` (a `datasets.IterableDataset`), `torch_dataset()`.
- `ServiceClient(base_url)`: the JSON requests behind it (runs, leases), with retries.
"""

from paced.client.service import LeaseAnswer, ServiceClient, run_base
from paced.client.shards import DONE_COLUMN, HeldShard, ShardClient

__all__ = ["DONE_COLUMN", "HeldShard", "LeaseAnswer", "ServiceClient", "ShardClient", "run_base"]
