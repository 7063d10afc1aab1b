"""A run that follows snapshots under 8 concurrent consumers (abandoned and late leases among
them) while new snapshots keep appearing, on a real uvicorn server on a loopback port: every
re-plan keeps exactly once per epoch, and every acked shard is served later with the rows it
was leased with."""

import random
import threading
import time

import httpx
from api_fixtures import ServerThread, add_snapshot, make_service_home, run_consumers

from paced.api.app import create_app
from paced.api.settings import Settings

THREADS = 8
TTL = 0.5
N = 300


def test_replans_under_concurrent_consumers_keep_exactly_once_per_epoch(tmp_path):
    home, _ = make_service_home(tmp_path, n=N)
    app = create_app(Settings(home=home.root, retry_after_seconds=0.1))
    stop, written = threading.Event(), []

    def writer():
        rng = random.Random(7)
        while not stop.is_set() and len(written) < 25:
            written.append(add_snapshot(home, "s1", [rng.randrange(9) for _ in range(N)],
                                        key=str(len(written))))
            time.sleep(rng.uniform(0.05, 0.3))

    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        run = client.post("/v1/runs",
                          json={"student_id": "s1", "dataset": "arith", "shard_size": 5, "epochs": 2,
                                "seed": 3, "follow_snapshots": True}).json()["run_id"]
        snapshots = threading.Thread(target=writer)
        snapshots.start()
        acked, errors = run_consumers(server.url, run, THREADS, ttl=TTL, abandon=0.1, late=0.1,
                                      late_factor=1.5, max_wait=0.1, timeout=60)
        stop.set()
        snapshots.join()
        assert not errors, errors[:3]
        view = client.get(f"/v1/runs/{run}").json()
        served = {(got["epoch"], got["shard"]): client.get(f"/v1/runs/{run}/epochs/{got['epoch']}/shards/"
                                                           f"{got['shard']}").json()["items"]
                  for got in acked}
    assert view["done"]
    mid_epoch = [h for h in view["snapshot_history"] if h["segment"] > 0 and h["from_shard"] > 0]
    assert len(mid_epoch) >= 2, view["snapshot_history"]  # the epochs really were re-planned while served
    for epoch in (0, 1):
        mine = [got for got in acked if got["epoch"] == epoch]
        progress = view["progress"][epoch]
        assert sorted(got["shard"]
                      for got in mine) == list(range(progress["shards"]))  # each shard acked once
        items = [it for got in mine for it in got["items"]]
        assert sorted(it["position"]
                      for it in items) == list(range(progress["items"]))  # none lost, none twice
        ids = [it["problem_id"] for it in items]
        assert len(ids) == len(set(ids))  # no problem twice in an epoch
    assert all(served[(got["epoch"], got["shard"])] == got["items"] for got in acked)
