"""paced.client against the real service on a loopback port: lazy leases, background renewals,
acks after steps, retries, and the wait/done answers."""

import subprocess
import sys
import time

import httpx
import pytest
from api_fixtures import ServerThread, make_service_home

from paced.api.app import create_app
from paced.api.settings import Settings
from paced.client import DONE_COLUMN, ServiceClient, ShardClient
from paced.errors import NotFoundError, PacedError


@pytest.fixture
def service(tmp_path):
    home, _ = make_service_home(tmp_path, n=40)
    with ServerThread(create_app(Settings(home=home.root, retry_after_seconds=0.1))) as server:
        yield server.url


def new_run(url: str, **config) -> str:
    body = {"student_id": "s1", "dataset": "arith", "shard_size": 5, **config}
    return f"{url}/v1/runs/{httpx.post(f'{url}/v1/runs', json=body).json()['run_id']}"


def run_view(run_url: str) -> dict:
    return httpx.get(run_url).json()


def test_import_leaves_torch_and_vllm_out():
    code = "import sys, paced.client; print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_batches_hand_out_every_row_once_per_epoch_and_ack_after_steps(service):
    run = new_run(service, epochs=2)
    with ShardClient(run, consumer="loop") as client:
        seen, acks = [], []
        for rows in client.batches(4):
            seen += [r["problem_id"] for r in rows]
            acks.append(client.step_done())
        view = run_view(run)
    with_refs = [r for r in range(40) if r % 2 == 0]
    eligible = [i for i in with_refs if 0 < i % 9 < 8]  # weight > 0 under `paced`, with a reference
    assert sorted(seen) == sorted(f"p{i:07d}" for i in eligible * 2)  # every row, once an epoch
    assert view["done"] and client.done and sum(acks) == client.acked == client.leased
    assert client.skipped_rows > 0 and not client.held and client.conflicts == client.dropped == 0


def test_opening_and_peeking_at_a_dataset_leases_one_shard_and_keeps_it(service):
    run = new_run(service)
    client = ShardClient(run, consumer="trl")
    dataset = client.dataset()
    assert DONE_COLUMN in dataset.column_names and client.leased == 0  # opening leases nothing
    firsts = [next(iter(dataset)) for _ in range(4)]  # what SFTTrainer does while it sets up
    assert client.leased == 1 and all(f == firsts[0] for f in firsts)
    rows = list(dataset)  # the real pass starts again at the held shard's first row
    assert rows[0] == firsts[0] and len({r["position"] for r in rows}) == len(rows)
    assert not client.done  # the pass ends at the epoch's end: its last shards wait for a step
    assert client.step_done() == client.leased and run_view(run)["done"]
    assert list(dataset) == [] and client.done
    client.close()


def test_held_leases_are_renewed_in_the_background(service):
    run = new_run(service)
    with ShardClient(run, consumer="slow", ttl_seconds=0.6) as client:
        rows = client.rows()
        first = next(rows)
        time.sleep(1.5)  # 2.5 TTLs: only the renewals keep the shard ours
        other = httpx.post(f"{run}/leases", json={"consumer": "other"}).json()
        assert other["shard"] == 1 and first["position"] < 5
        for row in rows:
            if row[DONE_COLUMN]:
                break
        assert client.step_done() == 1 and client.acked == 1 and client.conflicts == client.dropped == 0


def test_batch_tracking_acks_only_shards_whose_last_row_was_trained_on(service):
    run = new_run(service)
    with ShardClient(run, consumer="trainer") as client:
        client.track_batches()
        rows = client.rows()
        read_ahead = [next(rows)]
        while not read_ahead[-1][DONE_COLUMN]:
            read_ahead.append(next(rows))
        read_ahead.append(next(rows))  # a loader reads ahead into the next shard
        assert client.step_done() == 0  # read, not yet trained on
        client.consumed(r[DONE_COLUMN] for r in read_ahead[:-2])
        assert client.step_done() == 0  # its last row is not in a trained batch yet
        client.consumed(r[DONE_COLUMN] for r in read_ahead)
        assert client.step_done() == 1 and client.acked == 1
        progress = run_view(run)["progress"][0]
        assert progress["acked"] == 1 and progress["leased"] == 1


def test_wait_is_waited_out_and_done_ends(service):
    run = new_run(service, shard_size=40)  # one shard
    with ShardClient(run, consumer="a") as first, ShardClient(run, consumer="b", ttl_seconds=0.5) as second:
        assert first.service.lease(run, "probe", 0.3).status == "leased"  # held by someone else for 0.3 s
        started = time.monotonic()
        rows = list(second.rows())  # waits for the probe's lease to expire, then takes the shard
        assert rows and time.monotonic() - started >= 0.25
        second.step_done()
        assert list(first.rows()) == [] and first.done


def test_errors_name_the_fault(service, tmp_path):
    with pytest.raises(NotFoundError, match="404"):
        next(ShardClient(f"{service}/v1/runs/r-000000000000", consumer="x").rows())
    with pytest.raises(PacedError, match="not a run URL"):
        ShardClient(f"{service}/v1/nothing")
    down = ServiceClient("http://127.0.0.1:9", retries=2, backoff_seconds=0.01)
    with pytest.raises(PacedError, match=r"cannot reach the service.*after 3 tries") as err:
        down.get_run("http://127.0.0.1:9/v1/runs/r")
    assert err.value.code == "service_unreachable"


def test_torch_dataset_feeds_a_data_loader_and_acks_after_each_step(service):
    from torch.utils.data import DataLoader

    run = new_run(service)
    with ShardClient(run, consumer="torch") as client:
        loader = DataLoader(client.torch_dataset(), batch_size=4, collate_fn=list)
        rows = []
        while not client.done:  # a pass ends where the epoch's last shards wait for their step
            for batch in loader:
                rows += batch
                client.step_done()
        assert run_view(run)["done"] and client.acked == client.leased
        assert len({r["position"] for r in rows}) == len(rows) > 0
