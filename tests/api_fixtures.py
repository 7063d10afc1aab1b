"""Helpers for the service tests: a real data home (problems, snapshots, references) and a real
uvicorn server on a loopback port in a thread."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pyarrow as pa

from paced.store.files import write_parquet_atomic
from paced.store.home import open_home
from paced.store.problems import write_problem_part
from paced.store.shards import REFERENCE_SCHEMA
from paced.store.snapshots import COUNTS_SCHEMA, new_snapshot_id, write_snapshot

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def problem_ids(n: int) -> list[str]:
    return [f"p{i:07d}" for i in range(n)]


def add_snapshot(home, student: str, correct: list[int], dataset: str = "arith", n: int = 8,
                 key: str = "") -> str:
    """Write a pass-rate snapshot for problems p0000000… with `correct[i]` of `n` right."""
    ids = problem_ids(len(correct))
    rows = len(ids)
    sid = new_snapshot_id(f"{student}-{key}-{time.monotonic_ns()}")
    table = pa.table({
        "problem_id": ids, "dataset": [dataset] * rows, "student_id": [student] * rows,
        "sampling_hash": ["h"] * rows, "n": [n] * rows, "correct": correct,
        "wrong": [n - c for c in correct], "unparseable": [0] * rows, "timeout": [0] * rows,
        "error": [0] * rows, "pass_rate": [c / n for c in correct], "stale_age": [0] * rows,
        "snapshot_id": [sid] * rows,
    }, schema=COUNTS_SCHEMA)
    write_snapshot(home, student, table, sid)
    return sid


def make_service_home(root: Path, n: int = 100, with_refs: bool = True, dataset: str = "arith"):
    """A data home with `n` arithmetic problems, a snapshot of student `s1` (problem i solved
    i % 9 times of 8: p = 0 for i ≡ 0, p = 1 for i ≡ 8 mod 9), and references for even i."""
    home = open_home(root / "home")
    ids = problem_ids(n)
    problems = pa.table({
        "id": ids, "prompt": [f"{i}+{i + 1}=" for i in range(n)],
        "answer": [str(2 * i + 1) for i in range(n)],
        "difficulty": pa.array([len(str(i)) for i in range(n)], pa.int32()), "metadata": ["{}"] * n,
    })
    write_problem_part(home, dataset, problems, grader="exact", source="test")
    sid = add_snapshot(home, "s1", [i % 9 for i in range(n)], dataset)
    if with_refs:
        even = list(range(0, n, 2))
        refs = pa.table({"problem_id": [ids[i] for i in even], "dataset": [dataset] * len(even),
                         "teacher_id": ["t"] * len(even), "response": [f"{2 * i + 1}" for i in even],
                         "attempt": pa.array([0] * len(even), pa.int32())}, schema=REFERENCE_SCHEMA)
        write_parquet_atomic(home.references_dir(dataset, "t") / "batch-00000000.parquet", refs)
    return home, sid


def eligible(n: int) -> int:
    """Problems with 0 < p < 1 under make_service_home's snapshot (positive weight under paced)."""
    return sum(1 for i in range(n) if 0 < i % 9 < 8)


class Clock:
    """A settable clock for lease expiry (Unix seconds)."""

    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a thread; `url` once started."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until_healthy(proc, url: str, timeout_seconds: float = 120.0) -> None:
    """Block until the `paced serve` subprocess `proc` answers /v1/health at `url` (its stderr
    raised if it exits first; killed if it never answers)."""
    import httpx

    deadline = time.monotonic() + timeout_seconds
    while True:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)


def run_consumers(url: str, run_id: str, threads: int, *, ttl: float, abandon: float, late: float,
                  late_factor: float, max_wait: float, timeout: float) -> tuple[list[dict], list[str]]:
    """`threads` consumers lease from run `run_id` until it is done, each seeded by its index: a
    share `abandon` of leases is dropped (the shard goes out again after `ttl`), a share `late` is
    acked after `late_factor` × `ttl` (200 if nobody took the shard since, else 409), the rest at
    once. Returns every lease whose ack succeeded, and the unexpected answers."""
    import random

    import httpx

    acked, errors, lock = [], [], threading.Lock()

    def consume(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=timeout) as client:
            while True:
                r = client.post(f"/v1/runs/{run_id}/leases",
                                json={"consumer": f"c{seed}", "ttl_seconds": ttl})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                got = r.json()
                if got["status"] == "done":
                    return
                if got["status"] == "wait":
                    time.sleep(min(got["retry_after_seconds"], max_wait))
                    continue
                roll = rng.random()
                if roll < abandon:
                    continue
                if roll < abandon + late:
                    time.sleep(ttl * late_factor)
                a = client.post(f"/v1/runs/{run_id}/leases/{got['lease_id']}/ack")
                if a.status_code == 200:
                    with lock:
                        acked.append(got)
                elif a.status_code != 409:
                    errors.append(a.text)

    workers = [threading.Thread(target=consume, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=10 * timeout)
    return acked, errors
