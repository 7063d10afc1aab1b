"""Service throughput: lease+ack cycles against a real `paced serve` vs a bare FastAPI app.

A data home with 1M synthetic problems (prompts, references, one pass-rate snapshot) is built
once under bench/out/. `paced serve` runs in its own process on a loopback port; a run with
shards of 1,024 is created (its epoch build is timed), and a load generator (httpx, a few
threads, keep-alive) leases and acks until every shard of the epoch is acked. The bare app (also
uvicorn, its own process) answers POST lease with the same bytes from memory and POST ack with a
small JSON: the same two requests per cycle, none of the service's work. Clients parse each
lease response in both cases. Besides throughput and latency it reports the server process's
CPU time per cycle (from /proc), which a busy shared machine distorts far less than wall time.
Prints one table side by side.

    .venv/bin/python bench/service.py                   # 1M problems, shards of 1,024, 4 threads
    .venv/bin/python bench/service.py --n 200000 --threads 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def make_home(n: int) -> Path:
    import numpy as np
    import pyarrow as pa

    from paced.store.files import write_parquet_atomic
    from paced.store.home import open_home
    from paced.store.problems import write_problem_part
    from paced.store.shards import REFERENCE_SCHEMA
    from paced.store.snapshots import COUNTS_SCHEMA, list_snapshots, new_snapshot_id, write_snapshot

    root = OUT / f"service-home-{n}"
    home = open_home(root)
    if list_snapshots(home, "bench"):
        return root
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 10_000, n), rng.integers(0, 10_000, n)
    ids = [f"p{i:07d}" for i in range(n)]
    answers = [str(x) for x in (a + b)]
    write_problem_part(home, "arith", pa.table({
        "id": ids, "prompt": [f"{x}+{y}=" for x, y in zip(a, b, strict=False)], "answer": answers,
        "difficulty": pa.array(np.full(n, 4), pa.int32()), "metadata": ["{}"] * n}), "exact", "bench")
    write_parquet_atomic(home.references_dir("arith", "teacher") / "batch-00000000.parquet", pa.table({
        "problem_id": ids, "dataset": ["arith"] * n, "teacher_id": ["teacher"] * n, "response": answers,
        "attempt": pa.array(np.zeros(n, np.int32))}, schema=REFERENCE_SCHEMA))
    k, correct = 8, rng.binomial(8, rng.beta(0.6, 0.6, n))
    sid = new_snapshot_id("bench")
    write_snapshot(home, "bench", pa.table({
        "problem_id": ids, "dataset": ["arith"] * n, "student_id": ["bench"] * n, "sampling_hash": ["h"] * n,
        "n": np.full(n, k), "correct": correct, "wrong": k - correct, "unparseable": np.zeros(n, np.int64),
        "timeout": np.zeros(n, np.int64), "error": np.zeros(n, np.int64), "pass_rate": correct / k,
        "stale_age": np.zeros(n, np.int32), "snapshot_id": [sid] * n}, schema=COUNTS_SCHEMA), sid)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        try:
            httpx.get(url + "/v1/health", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{cmd} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def bare_server(port: int, body_file: str) -> None:
    """A bare FastAPI app: the same lease bytes from memory, a small ack, nothing else."""
    import uvicorn
    from fastapi import FastAPI, Response

    body = Path(body_file).read_bytes()
    app = FastAPI()

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/runs/{run_id}/leases")
    def lease(run_id: str) -> Response:
        return Response(body, media_type="application/json")

    @app.post("/v1/runs/{run_id}/leases/{lease_id}/ack")
    def ack(run_id: str, lease_id: str) -> dict:
        return {"run_id": run_id, "lease_id": lease_id, "acked": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def load(url: str, run_id: str, threads: int, cycles: int) -> dict:
    """`cycles` lease+ack cycles over `threads` keep-alive clients; latencies in ms."""
    import httpx

    lock, remaining = threading.Lock(), [cycles]
    lease_ms, ack_ms, cycle_ms, items = [], [], [], [0]

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                t0 = time.perf_counter()
                got = client.post(f"/v1/runs/{run_id}/leases", json={"consumer": f"c{i}"}).json()
                t1 = time.perf_counter()
                if got["status"] != "leased":
                    return
                client.post(f"/v1/runs/{run_id}/leases/{got['lease_id']}/ack").raise_for_status()
                t2 = time.perf_counter()
                with lock:
                    lease_ms.append((t1 - t0) * 1e3), ack_ms.append((t2 - t1) * 1e3)
                    cycle_ms.append((t2 - t0) * 1e3)
                    items[0] += len(got["items"])

    start_t = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - start_t
    return {"cycles": len(cycle_ms), "seconds": seconds, "items": items[0], "lease_ms": lease_ms,
            "ack_ms": ack_ms, "cycle_ms": cycle_ms}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(proc: subprocess.Popen, *args) -> dict:
    """`load(*args)`, plus the server's CPU seconds spent meanwhile."""
    before = cpu_seconds(proc.pid)
    result = load(*args)
    return {**result, "server_cpu": cpu_seconds(proc.pid) - before}


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="problems")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--bare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return bare_server(int(args.bare[0]), args.bare[1])
    t = time.perf_counter()
    home = make_home(args.n)
    print(f"data home: {home} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env_cmd = [sys.executable, "-m", "paced.cli", "serve", "--home", str(home), "--port", str(port),
               "--log-level", "warning"]
    proc = start(env_cmd, url)
    try:
        t = time.perf_counter()
        run = httpx.post(url + "/v1/runs", json={"student_id": "bench", "dataset": "arith",
                                                 "shard_size": args.shard_size}, timeout=600).json()
        build_s = time.perf_counter() - t
        probe = httpx.post(f"{url}/v1/runs/{run['run_id']}/leases", json={"consumer": "probe"}).content
        httpx.post(f"{url}/v1/runs/{run['run_id']}/leases/{json.loads(probe)['lease_id']}/ack")
        ours = measured(proc, url, run["run_id"], args.threads, run["shards"] - 1)
    finally:
        stop(proc)
        shutil.rmtree(home / "service", ignore_errors=True)  # the run's shards: ~150 MB at 1M problems
    body = OUT / "service-lease-body.json"
    body.write_bytes(probe)
    bare_port = free_port()
    proc = start([sys.executable, __file__, "--bare", str(bare_port), str(body)],
                 f"http://127.0.0.1:{bare_port}")
    try:
        bare = measured(proc, f"http://127.0.0.1:{bare_port}", "r-000000000000", args.threads, ours["cycles"])
    finally:
        stop(proc)
    report(args, run, build_s, len(probe), ours, bare)


def report(args, run: dict, build_s: float, body_bytes: int, ours: dict, bare: dict) -> None:
    print(f"service bench: {args.n:,} problems, run of {run['items']:,} items in {run['shards']} shards of "
          f"{args.shard_size:,}; epoch build {build_s:.1f} s; lease response {body_bytes / 1024:.0f} KiB; "
          f"{args.threads} client threads; {os.cpu_count()} CPUs")
    print(f"{'server':<12} {'cycles':>7} {'cycles/s':>9} {'items/s':>9} {'lease p50':>10} {'lease p99':>10} "
          f"{'ack p50':>8} {'ack p99':>8} {'cycle p50':>10} {'cycle p99':>10} {'srv CPU/cycle':>14}")
    for name, r in (("paced", ours), ("bare", bare)):
        rate = r["cycles"] / r["seconds"]
        print(f"{name:<12} {r['cycles']:>7} {rate:>9.1f} {r['items'] / r['seconds']:>9.0f} "
              f"{pct(r['lease_ms'], 50):>10.2f} {pct(r['lease_ms'], 99):>10.2f} {pct(r['ack_ms'], 50):>8.2f} "
              f"{pct(r['ack_ms'], 99):>8.2f} {pct(r['cycle_ms'], 50):>10.2f} {pct(r['cycle_ms'], 99):>10.2f} "
              f"{r['server_cpu'] / r['cycles'] * 1e3:>11.2f} ms")
    ratio = (ours["cycles"] / ours["seconds"]) / (bare["cycles"] / bare["seconds"])
    cpu_ratio = (bare["server_cpu"] / bare["cycles"]) / (ours["server_cpu"] / ours["cycles"])
    print(f"throughput paced/bare: {ratio:.2f}x (goal >= 0.5x); server CPU per cycle bare/paced: "
          f"{cpu_ratio:.2f}x; cycle p99 {pct(ours['cycle_ms'], 99):.1f} ms (goal <= 20 ms); latencies in ms")


if __name__ == "__main__":
    main()
