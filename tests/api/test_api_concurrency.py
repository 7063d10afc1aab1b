"""The service under concurrent consumers and concurrent writers, on a real uvicorn server on a
loopback port: exactly once across 16 threads with abandoned and late leases, and a real
`paced refresh` writing snapshots while requests are served."""

import random
import threading
import time

import httpx
import pyarrow as pa
from api_fixtures import ServerThread, eligible, make_service_home, problem_ids, run_consumers

from paced.api.app import create_app
from paced.api.settings import Settings
from paced.cli import main
from paced.store.rollouts import ROLLOUT_SCHEMA, write_rollout_batch

THREADS = 16
TTL = 1.0


def test_concurrent_consumers_ack_every_item_exactly_once(tmp_path):
    n = 400
    home, _ = make_service_home(tmp_path, n=n)
    app = create_app(Settings(home=home.root, retry_after_seconds=0.2))
    with ServerThread(app) as server:
        run = httpx.post(f"{server.url}/v1/runs",
                         json={"student_id": "s1", "dataset": "arith", "shard_size": 5,
                               "epochs": 2, "seed": 1}).json()
        leases, errors = run_consumers(server.url, run["run_id"], THREADS, ttl=TTL, abandon=0.15, late=0.15,
                                       late_factor=1.3, max_wait=0.2, timeout=30)
        assert not errors
        acked = [(g["epoch"], g["shard"], [it["position"] for it in g["items"]]) for g in leases]
        view = httpx.get(f"{server.url}/v1/runs/{run['run_id']}").json()
        metrics = httpx.get(f"{server.url}/metrics").text
    leased = float(metrics.split('paced_leases_total{outcome="leased"} ')[1].split()[0])
    assert leased > 2 * run["shards"]  # abandoned leases expired and their shards went out again
    items = eligible(n)
    assert view["done"] and [p["acked"] for p in view["progress"]] == [run["shards"]] * 2
    for epoch in (0, 1):
        shards = [s for e, s, _ in acked if e == epoch]
        positions = [p for e, _, ps in acked if e == epoch for p in ps]
        assert sorted(shards) == list(range(run["shards"]))  # each shard acked exactly once
        assert sorted(positions) == list(range(items))  # each item exactly once, none lost


def rollouts(n: int, start: int, k: int, rng: random.Random) -> pa.Table:
    ids = problem_ids(n)
    rows = [{"problem_id": pid, "dataset": "arith", "sample_idx": j, "completion": "x",
             "outcome": rng.choice(["correct", "wrong"]), "tokens": 1, "finish_reason": "stop",
             "student_id": "s1", "sampling_hash": "h1", "grader": "exact@1"}
            for pid in ids for j in range(start, start + k)]
    return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)


def test_requests_never_fail_while_refresh_writes_snapshots(tmp_path):
    n = 60
    home, first = make_service_home(tmp_path, n=n)
    app = create_app(Settings(home=home.root))
    stop, written = threading.Event(), []

    def refresher():
        rng, sample = random.Random(0), 0
        folder = home.rollouts_dir("s1", "h1", "arith")
        while not stop.is_set() and sample < 60:
            write_rollout_batch(folder, rollouts(n, sample, 2, rng))
            sample += 2
            assert main(["refresh", "--home", str(home.root), "--student", "s1"]) == 0
            written.append(sample)

    writer = threading.Thread(target=refresher)
    statuses = []
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        writer.start()
        deadline = time.monotonic() + 60
        while writer.is_alive() and time.monotonic() < deadline:
            statuses.append(client.get("/v1/health").status_code)
            statuses.append(client.get("/v1/students/s1/passrates?dataset=arith").status_code)
            r = client.post("/v1/runs", json={"student_id": "s1", "dataset": "arith", "shard_size": 16,
                                              "epochs": 2, "follow_snapshots": True, "scheme": "uniform"})
            statuses.append(r.status_code)
            while (r.status_code < 300
                   and (got := client.post(f"/v1/runs/{r.json()['run_id']}/leases",
                                           json={"consumer": "t"})).json()["status"] == "leased"):
                statuses.append(got.status_code)
                statuses.append(client.post(f"/v1/runs/{got.json()['run_id']}/leases/{got.json()['lease_id']}/ack").status_code)
        stop.set()
        writer.join(timeout=120)
        newest = client.get("/v1/health").json()["students"]["s1"]
    assert len(written) >= 3 and newest > first  # refresh really wrote snapshots meanwhile
    assert len(statuses) > 20 and set(statuses) <= {200, 201}, sorted(set(statuses))
