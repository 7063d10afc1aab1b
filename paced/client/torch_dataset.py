"""`torch.utils.data.IterableDataset` over a `ShardClient` (the one module of the client that
imports torch: `ShardClient.torch_dataset()` imports it when called)."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from paced.errors import InputError


class ShardIterableDataset(IterableDataset):
    """Rows of `client.rows()`: leases lazily, one pass per iteration. Use it in the process that
    trains (`num_workers=0`): the leases, their renewals and the acks after each step belong to
    that process's client."""

    def __init__(self, client):
        super().__init__()
        self.client = client

    def __iter__(self) -> Iterator[dict]:
        if get_worker_info() is not None:
            raise InputError("a paced ShardIterableDataset must be read in the training process: "
                             "use DataLoader(..., num_workers=0)")
        return self.client.rows()
