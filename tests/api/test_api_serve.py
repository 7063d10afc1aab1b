"""`paced serve` as a real subprocess on a loopback port: serve, SIGTERM (or SIGKILL), restart, and
the state (runs, leases, acks, re-plans) survives: every item exactly once across the restart,
same shard bytes."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from api_fixtures import eligible, make_service_home

N = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(home, port, env=None):
    proc = subprocess.Popen([sys.executable, "-m", "paced.cli", "serve", "--home", str(home), "--port",
                             str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("paced serve did not start")


def stop(proc) -> int:
    """SIGTERM; uvicorn shuts down gracefully (lifespan: the state database is checkpointed and
    closed), then re-raises the signal, so the exit status is -SIGTERM (143 in a shell)."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    assert b"Traceback" not in proc.stderr.read()
    return code


def lease(client, run_id, ttl=60.0):
    r = client.post(f"/v1/runs/{run_id}/leases", json={"consumer": "t", "ttl_seconds": ttl})
    assert r.status_code == 200, r.text
    return r.json()


def test_restart_keeps_leases_and_acks_and_serves_each_item_once(tmp_path):
    home, _ = make_service_home(tmp_path, n=N)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(home.root, port)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            run = c.post("/v1/runs", json={"student_id": "s1", "dataset": "arith", "shard_size": 8,
                                           "epochs": 2}).json()
            rid, acked = run["run_id"], []
            held = [lease(c, rid, ttl=2.0) for _ in range(4)]
            for got in held[:2]:
                assert c.post(f"/v1/runs/{rid}/leases/{got['lease_id']}/ack").status_code == 200
                acked.append((got["epoch"], got["items"]))
            shard0 = c.get(f"/v1/runs/{rid}/epochs/0/shards/0?format=parquet").content
    finally:
        assert stop(proc) == -signal.SIGTERM
    proc = start(home.root, port)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            view = c.get(f"/v1/runs/{rid}").json()
            epoch0 = view["progress"][0]
            assert (epoch0["acked"] == 2
                    and epoch0["acked"] + epoch0["leased"] + epoch0["pending"] == run["shards"])
            assert c.get(f"/v1/runs/{rid}/epochs/0/shards/0?format=parquet").content == shard0
            again = c.post(f"/v1/runs/{rid}/leases/{held[0]['lease_id']}/ack")
            assert again.status_code == 200 and again.json()["already_acked"] is True
            while (got := lease(c, rid))["status"] != "done":
                if got["status"] == "wait":  # the two unacked leases from before the restart
                    time.sleep(got["retry_after_seconds"])
                    continue
                assert c.post(f"/v1/runs/{rid}/leases/{got['lease_id']}/ack").status_code == 200
                acked.append((got["epoch"], got["items"]))
            stale = c.post(f"/v1/runs/{rid}/leases/{held[2]['lease_id']}/ack")
            assert stale.status_code == 409  # expired, and its shard was served again
    finally:
        assert stop(proc) == -signal.SIGTERM
    for epoch in (0, 1):
        positions = sorted(it["position"] for e, items in acked if e == epoch for it in items)
        assert positions == list(range(eligible(N)))


def test_serve_refuses_a_public_host_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PACED_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "paced.cli", "serve", "--home", str(tmp_path / "h"), "--host",
                        "0.0.0.0", "--port", str(free_port())], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "non-loopback" in r.stderr and "PACED_TOKEN" in r.stderr


def test_a_second_server_on_the_same_home_fails_clearly(tmp_path):
    home, _ = make_service_home(tmp_path, n=10)
    proc = start(home.root, free_port())
    try:
        r = subprocess.run([sys.executable, "-m", "paced.cli", "serve", "--home", str(home.root), "--port",
                            str(free_port())], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "another `paced serve`" in r.stderr
    finally:
        assert stop(proc) == -signal.SIGTERM


def test_a_killed_server_restarts_with_its_replans_and_serves_each_item_once(tmp_path):
    from api_fixtures import add_snapshot

    home, base = make_service_home(tmp_path, n=N)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(home.root, port)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            rid = c.post("/v1/runs", json={"student_id": "s1", "dataset": "arith", "shard_size": 8,
                                           "follow_snapshots": True}).json()["run_id"]
            acked = [lease(c, rid) for _ in range(2)]
            for got in acked:
                assert c.post(f"/v1/runs/{rid}/leases/{got['lease_id']}/ack").status_code == 200
            newer = add_snapshot(home, "s1", [(i * 5 + 3) % 9 for i in range(N)])
            switched = lease(c, rid)
            assert (switched["shard"], switched["snapshot_id"]) == (2, newer)
            shard2 = c.get(f"/v1/runs/{rid}/epochs/0/shards/2?format=parquet").content
    finally:
        proc.kill()  # SIGKILL: no shutdown, the state file is recovered from its write-ahead log
        proc.wait(timeout=30)
    proc = start(home.root, port)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get(f"/v1/runs/{rid}/epochs/0/shards/2?format=parquet").content == shard2
            history = c.get(f"/v1/runs/{rid}").json()["snapshot_history"]
            assert [(h["from_shard"], h["snapshot_id"]) for h in history] == [(0, base), (2, newer)]
            assert c.post(f"/v1/runs/{rid}/leases/{switched['lease_id']}/ack").status_code == 200
            acked.append(switched)
            while (got := lease(c, rid))["status"] != "done":
                assert got["snapshot_id"] == newer
                assert c.post(f"/v1/runs/{rid}/leases/{got['lease_id']}/ack").status_code == 200
                acked.append(got)
            items = c.get(f"/v1/runs/{rid}").json()["progress"][0]["items"]
    finally:
        assert stop(proc) == -signal.SIGTERM
    rows = [it for got in acked for it in got["items"]]
    assert sorted(it["position"] for it in rows) == list(range(items))
    assert len({it["problem_id"] for it in rows}) == len(rows)
