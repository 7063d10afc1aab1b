"""Faults and access rules of the service: a damaged snapshot (503, never 500), a failed first start
on a real full disk (no state file left), strict request bodies, paths that decode to `..`,
reads behind the token, leases bound to their consumer, and a real `paced serve` subprocess for
what only a socket shows (a busy port, a malformed Content-Length, the access log). vLLM and an
unsupported head size: tests/backends/test_backends.py."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from api_fixtures import make_service_home
from fastapi.testclient import TestClient
from fault_helpers import fill, small_tmpfs, truncate
from test_api_serve import free_port

from paced.api.app import create_app
from paced.api.settings import Settings
from paced.errors import PacedError

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def home(tmp_path):
    return make_service_home(tmp_path, n=30)


def client_for(home, **settings):
    return TestClient(create_app(Settings(home=home[0].root, **settings)))


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "code", "detail"} and body["code"] == code, body
    return body


def test_a_damaged_snapshot_is_a_503_naming_the_file(home):
    path = home[0].snapshots_dir("s1") / f"{home[1]}.parquet"
    truncate(path)
    with client_for(home) as client:
        body = assert_error(client.get("/v1/students/s1/passrates"), 503, "damaged_file")
        assert str(path) in body["error"] and "paced refresh --student s1" in body["error"]
        r = client.post("/v1/runs", json={"student_id": "s1", "dataset": "arith"})
        assert_error(r, 503, "damaged_file")


def test_a_path_that_decodes_to_dot_dot_is_a_json_404_not_a_redirect(home):
    with client_for(home) as client:
        for url in ("/v1/runs/r-%2e%2e%2f", "/v1/runs/r-%2e%2e%2f%2e%2e%2fhealth", "/v1/health/"):
            assert_error(client.get(url, follow_redirects=False), 404, "not_found")


@pytest.mark.parametrize("field, value", [("seed", "1"), ("shard_size", "10"), ("follow_snapshots", "true"),
                                          ("alpha", "1.0"), ("seed", 1.5)])
def test_run_bodies_are_strictly_typed(home, field, value):
    with client_for(home) as client:
        r = client.post("/v1/runs", json={"student_id": "s1", "dataset": "arith", field: value})
        assert assert_error(r, 422, "validation_error")["detail"]["field"] == field


def test_a_prior_is_a_json_array_of_numbers(home):
    with client_for(home) as client:
        body = {"student_id": "s1", "dataset": "arith", "scheme": "paced-posterior"}
        assert client.post("/v1/runs", json={**body, "prior": [1, 2]}).status_code == 201
        r = client.post("/v1/runs", json={**body, "prior": ["1", 2]})
        assert assert_error(r, 422, "validation_error")["detail"]["field"].startswith("prior")


def test_leases_are_acked_and_renewed_only_by_their_consumer(home):
    with client_for(home) as client:
        run = client.post("/v1/runs",
                          json={"student_id": "s1", "dataset": "arith", "shard_size": 5}).json()["run_id"]
        first, second = (client.post(f"/v1/runs/{run}/leases", json={"consumer": "a"}).json()["lease_id"]
                         for _ in range(2))
        url = f"/v1/runs/{run}/leases/{first}"
        body = assert_error(client.post(f"{url}/ack", json={"consumer": "b"}), 403, "lease_not_yours")
        assert "'a'" in body["error"] and body["detail"]["field"] == "consumer"
        assert_error(client.post(f"{url}/renew", json={"consumer": "b", "ttl_seconds": 60}), 403,
                     "lease_not_yours")
        assert client.post(f"{url}/renew", json={"consumer": "a", "ttl_seconds": 60}).status_code == 200
        assert client.post(f"{url}/ack", json={"consumer": "a"}).json()["acked"]
        assert_error(client.post(f"{url}/ack", json={"consumer": "b"}), 403,
                     "lease_not_yours")  # acked: still a's
        assert client.post(f"{url}/ack", json={"consumer": "a"}).json()["already_acked"]
        forced = client.post(f"/v1/runs/{run}/leases/{second}/ack", json={"consumer": "ops", "force": True})
        assert forced.status_code == 200 and not forced.json()["already_acked"]
        third = client.post(f"/v1/runs/{run}/leases", json={"consumer": "a"}).json()["lease_id"]
        # no consumer named: as before
        assert client.post(f"/v1/runs/{run}/leases/{third}/ack").status_code == 200


def test_reads_need_the_token_when_asked_and_health_hides_the_home(home):
    with client_for(home, token=TOKEN, token_reads=True) as client:
        run = client.post("/v1/runs", json={"student_id": "s1", "dataset": "arith"},
                          headers=AUTH).json()["run_id"]
        for url in ("/v1/students/s1/passrates", f"/v1/runs/{run}", f"/v1/runs/{run}/epochs/0/shards/0",
                    "/metrics", "/"):
            assert_error(client.get(url), 401, "unauthorized")
            assert client.get(url, headers=AUTH).status_code == 200, url
        assert client.get("/v1/health").json() == {"status": "ok",
                                                   "version": client.get("/v1/health").json()["version"],
                                                   "home": None, "students": None}
        full = client.get("/v1/health", headers=AUTH).json()
        assert full["home"] == str(home[0].root) and full["students"] == {"s1": home[1]}
    with client_for(home, token=TOKEN) as client:  # reads open (the default): students, never the home
        body = client.get("/v1/health").json()
        assert body["students"] == {"s1": home[1]} and body["home"] is None
        assert client.get("/v1/students/s1/passrates").status_code == 200
    with pytest.raises(ValueError, match="PACED_TOKEN_READS needs PACED_TOKEN"):
        Settings(home=home[0].root, token_reads=True)


def test_a_failed_first_start_on_a_full_disk_leaves_no_state_file(tmp_path):
    with small_tmpfs(tmp_path / "disk", size="8m") as disk:
        home, _ = make_service_home(disk, n=10)
        state = home.service_dir / "state.duckdb"
        filler = fill(disk)
        with pytest.raises(PacedError, match="No space left on device|cannot open the service state"):
            create_app(Settings(home=home.root))
        assert not state.exists() and not state.with_name("state.duckdb.wal").exists()
        filler.unlink()
        with TestClient(create_app(Settings(home=home.root))) as client:
            assert client.get("/v1/health").status_code == 200
            filler = fill(disk)  # full while serving: a 503 in the error shape, never a 500
            r = client.post("/v1/runs", json={"student_id": "s1", "dataset": "arith", "shard_size": 1})
            assert r.status_code == 503 and r.json()["code"] in ("storage_error", "unavailable"), r.text
            filler.unlink()
            assert client.post("/v1/runs", json={"student_id": "s1", "dataset": "arith"}).status_code == 201
        assert state.stat().st_mode & 0o777 == 0o600 and home.service_dir.stat().st_mode & 0o777 == 0o700


def test_an_empty_state_file_from_an_earlier_failed_start_is_created_again(home):
    state = home[0].service_dir / "state.duckdb"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(b"")
    with client_for(home) as client:
        assert client.post("/v1/runs", json={"student_id": "s1", "dataset": "arith"}).status_code == 201
    assert state.stat().st_size > 0


def test_serve_busy_port_bad_content_length_and_no_token_in_the_access_log(tmp_path):
    home, _ = make_service_home(tmp_path, n=10)
    port = free_port()
    env = {**os.environ, "PACED_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "paced.cli", "serve", "--home", str(home.root), "--port",
                             str(port), "--log-level", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        start_wait(proc, port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
        assert json.loads(body)["code"] == "bad_request"
        import httpx

        assert httpx.get(f"http://127.0.0.1:{port}/v1/health?token=leaked-{TOKEN}&x=1").status_code == 200
        busy = subprocess.run([sys.executable, "-m", "paced.cli", "serve", "--home", str(tmp_path / "other"),
                               "--port", str(port)], capture_output=True, text=True, timeout=60, env=env)
        assert busy.returncode == 1 and busy.stderr.strip().count("\n") == 0, busy.stderr
        assert f"127.0.0.1:{port}" in busy.stderr and "in use" in busy.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    log = proc.stdout.read().decode() + proc.stderr.read().decode()  # uvicorn's access log is on stdout
    assert "/v1/health?token=[redacted]&x=1" in log and "leaked" not in log and TOKEN not in log


def start_wait(proc, port):
    import time

    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("paced serve did not start")

