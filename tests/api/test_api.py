"""The curriculum service through the real FastAPI app (TestClient), a real DuckDB state file
and real Parquet snapshots in tmp_path; a settable clock drives lease expiry."""

import io
import json
import time

import pyarrow.parquet as pq
import pytest
from api_fixtures import add_snapshot, eligible, make_service_home
from fastapi.testclient import TestClient

from paced.api.app import create_app
from paced.api.settings import Settings

N = 100


@pytest.fixture
def home(tmp_path):
    return make_service_home(tmp_path, n=N)


@pytest.fixture
def client(home, clock):
    app = create_app(Settings(home=home[0].root, max_shard_size=64), clock=clock)
    with TestClient(app) as c:
        yield c


def new_run(client, **fields):
    body = {"student_id": "s1", "dataset": "arith", "shard_size": 10, **fields}
    r = client.post("/v1/runs", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def lease(client, run_id, consumer="c", **fields):
    r = client.post(f"/v1/runs/{run_id}/leases", json={"consumer": consumer, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def ack(client, run_id, lease_id):
    return client.post(f"/v1/runs/{run_id}/leases/{lease_id}/ack")


def test_health_names_the_newest_snapshot_of_each_student(client, home):
    first = home[1]
    newer = add_snapshot(home[0], "s1", [1] * N)
    other = add_snapshot(home[0], "s2", [2] * N)
    body = client.get("/v1/health").json()
    assert body["status"] == "ok" and body["home"] is None  # the path only to a request with the token
    assert body["students"] == {"s1": newer, "s2": other} and newer > first


def test_passrates_summarise_the_snapshot_and_name_bad_inputs(client, home):
    body = client.get("/v1/students/s1/passrates").json()
    assert body["snapshot_id"] == home[1] and body["problems"] == N and sum(body["histogram"]) == N
    zeros, ones = sum(1 for i in range(N) if i % 9 == 0), sum(1 for i in range(N) if i % 9 == 8)
    assert body["share_zero"] == pytest.approx(zeros / N) and body["share_one"] == pytest.approx(ones / N)
    assert body["histogram"][0] == zeros and len(body["histogram"]) == 10
    assert client.get("/v1/students/s1/passrates?dataset=arith").json()["problems"] == N
    missing = client.get("/v1/students/s1/passrates?dataset=other")
    assert missing.status_code == 404 and missing.json()["detail"]["field"] == "dataset"
    assert client.get("/v1/students/nobody/passrates").json()["code"] == "not_found"
    bad = client.get("/v1/students/..x/passrates")
    assert bad.status_code in (404, 422) and set(bad.json()) == {"error", "code", "detail"}


def test_create_run_pins_its_snapshot_and_reports_counts(client, home):
    created = new_run(client, epochs=3)
    items = eligible(N)
    assert created["items"] == items and created["shards"] == -(-items // 10)
    assert created["snapshot_id"] == home[1] and created["epoch"] == 0
    add_snapshot(home[0], "s1", [4] * N)  # newer, but the run is pinned
    view = client.get(f"/v1/runs/{created['run_id']}").json()
    assert view["snapshot_id"] == home[1] and view["config"]["snapshot_id"] == home[1]
    assert view["progress"][0]["pending"] == created["shards"] and view["done"] is False


def test_lease_ack_state_machine_with_expiry(client, clock):
    run = new_run(client)["run_id"]
    a = lease(client, run, "a", ttl_seconds=10)
    b = lease(client, run, "b", ttl_seconds=10)
    assert (a["shard"], b["shard"]) == (0, 1) and len(a["items"]) == 10
    clock.advance(11)  # both expired
    c = lease(client, run, "c", ttl_seconds=10)
    assert c["shard"] == 0  # the lowest expired shard is handed out again
    conflict = ack(client, run, a["lease_id"])
    assert conflict.status_code == 409 and conflict.json()["code"] == "lease_superseded"
    late = ack(client, run, b["lease_id"])  # expired, but nobody took shard 1 since: accepted
    assert late.status_code == 200 and late.json()["already_acked"] is False
    assert ack(client, run, c["lease_id"]).json()["already_acked"] is False
    again = ack(client, run, c["lease_id"])
    assert again.status_code == 200 and again.json()["already_acked"] is True
    assert lease(client, run, "d")["shard"] == 2  # acked shards are never handed out again
    unknown = ack(client, run, "l-0000000000000000")
    assert unknown.status_code == 404 and unknown.json()["detail"]["field"] == "lease_id"


def test_wait_while_all_open_shards_are_leased_then_done(client, clock):
    run = new_run(client, shard_size=64)["run_id"]
    a, b = lease(client, run, ttl_seconds=30), lease(client, run, ttl_seconds=60)
    r = client.post(f"/v1/runs/{run}/leases", json={"consumer": "x"})
    assert r.json()["status"] == "wait" and 0 < r.json()["retry_after_seconds"] <= 5
    assert int(r.headers["Retry-After"]) >= 1
    for held in (a, b):
        assert ack(client, run, held["lease_id"]).status_code == 200
    assert lease(client, run)["status"] == "done"
    view = client.get(f"/v1/runs/{run}").json()
    assert view["done"] is True and view["progress"][0]["acked"] == 2


def consume(client, run_id, consumer="c"):
    """Lease and ack until done; the items of every acked shard, by epoch."""
    seen: dict[int, list] = {}
    while (got := lease(client, run_id, consumer))["status"] != "done":
        if got["status"] == "wait":  # the next epoch is still being built
            time.sleep(got["retry_after_seconds"])
            continue
        assert ack(client, run_id, got["lease_id"]).status_code == 200
        seen.setdefault(got["epoch"], []).extend(got["items"])
    return seen


def test_every_item_of_every_epoch_is_served_exactly_once_in_a_new_order(client):
    run = new_run(client, epochs=2, seed=7)["run_id"]
    seen = consume(client, run)
    assert sorted(seen) == [0, 1]
    for items in seen.values():
        assert [it["position"] for it in items] == list(range(eligible(N)))
    ids0, ids1 = ([it["problem_id"] for it in seen[e]] for e in (0, 1))
    assert sorted(ids0) == sorted(ids1) and ids0 != ids1  # same problems, new epoch order


def test_a_new_epoch_is_built_in_the_background_while_leases_answer_wait(home):
    app = create_app(Settings(home=home[0].root, epoch_build_wait_seconds=0))
    with TestClient(app) as c:
        run = new_run(c, epochs=2)["run_id"]
        while (got := lease(c, run))["status"] == "leased" and got["epoch"] == 0:
            ack(c, run, got["lease_id"])
        assert got["status"] == "wait" and got["retry_after_seconds"] <= 1
        deadline = time.monotonic() + 60
        while (got := lease(c, run))["status"] == "wait" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got["status"] == "leased" and got["epoch"] == 1


def test_follow_snapshots_takes_new_weights_per_epoch_and_records_them(client, home):
    follow = new_run(client, epochs=2, follow_snapshots=True)["run_id"]
    pinned = new_run(client, epochs=2)["run_id"]
    newer = add_snapshot(home[0], "s1", [4] * N)  # every problem at p = 1/2
    seen_follow, seen_pinned = consume(client, follow), consume(client, pinned)
    # no shard of epoch 0 was leased yet: the whole epoch is planned again from the newer snapshot
    for epoch in (0, 1):
        assert len(seen_follow[epoch]) == N and all(it["pass_rate"] == 0.5 for it in seen_follow[epoch])
    assert len(seen_pinned[0]) == len(seen_pinned[1]) == eligible(N)
    history = client.get(f"/v1/runs/{follow}").json()["snapshot_history"]
    assert [(h["epoch"], h["segment"], h["from_shard"], h["snapshot_id"]) for h in history] == [
        (0, 0, 0, home[1]), (0, 1, 0, newer), (1, 0, 0, newer)]
    assert all(h["student_ids"] == ["s1"] and h["checkpoint_id"] is None for h in history)
    pinned_history = client.get(f"/v1/runs/{pinned}").json()["snapshot_history"]
    assert [(h["epoch"], h["snapshot_id"]) for h in pinned_history] == [(0, home[1]), (1, home[1])]


def test_shard_formats_agree_and_the_same_request_returns_the_same_bytes(client, home, tmp_path):
    run = new_run(client)["run_id"]
    leased = lease(client, run)
    url = f"/v1/runs/{run}/epochs/0/shards/{leased['shard']}"
    as_json = client.get(url)
    assert as_json.content == client.get(url + "?format=json").content
    assert as_json.json()["items"] == leased["items"]
    lines = client.get(url + "?format=jsonl").text.splitlines()
    assert [json.loads(line) for line in lines] == leased["items"]
    parquet = client.get(url + "?format=parquet")
    assert parquet.headers["content-type"] == "application/vnd.apache.parquet"
    assert parquet.content == client.get(url + "?format=parquet").content
    assert pq.read_table(io.BytesIO(parquet.content)).to_pylist() == leased["items"]
    with_ref = [it for it in leased["items"] if it["completion"] is not None]
    assert with_ref and all(it["completion"] == str(2 * int(it["problem_id"][1:]) + 1) for it in with_ref)
    assert client.get(f"/v1/runs/{run}/epochs/0/shards/99").status_code == 404
    assert client.get(f"/v1/runs/{run}/epochs/1/shards/0").json()["detail"]["field"] == "epoch"


def test_a_parquet_shard_loads_with_datasets_as_prompt_completion_rows(client, tmp_path):
    import datasets

    run = new_run(client)["run_id"]
    path = tmp_path / "shard.parquet"
    path.write_bytes(client.get(f"/v1/runs/{run}/epochs/0/shards/0?format=parquet").content)
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    assert ds.num_rows == 10 and {"prompt", "completion", "weight", "problem_id"} <= set(ds.column_names)
    assert ds[0]["prompt"].endswith("=")


def test_weighted_sample_mode_draws_num_samples_with_unit_weights(client):
    created = new_run(client, mode="weighted-sample", num_samples=25)
    assert created["items"] == 25 and created["shards"] == 3
    items = consume(client, created["run_id"])[0]
    assert len(items) == 25 and {it["weight"] for it in items} == {1.0}


@pytest.mark.parametrize(("body", "field"), [
    ({"shard_size": 65}, "shard_size"),  # over the max_shard_size setting
    ({"shard_size": 0}, "shard_size"),
    ({"alpha": -1}, "alpha"),
    ({"mode": "weighted-loss", "num_samples": 5}, "num_samples"),
    ({"student_id": "../etc"}, "student_id"),
    ({"student_id": "nobody"}, "student_id"),
    ({"dataset": "other"}, "dataset"),
    ({"snapshot_id": "19990101T000000000000Z-00000000"}, "snapshot_id"),
    ({"scheme": "hard-filter", "weight_floor": 2}, "weight_floor"),
    ({"teacher_id": "nobody"}, "teacher_id"),
    ({"extra": 1}, "extra"),
])
def test_bad_run_requests_are_4xx_naming_the_field(client, body, field):
    r = client.post("/v1/runs", json={"student_id": "s1", "dataset": "arith", "shard_size": 10, **body})
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error", "code", "detail"} and r.json()["detail"]["field"] == field


def test_a_scheme_leaving_no_weight_is_a_clear_422(client, home):
    add_snapshot(home[0], "s3", [0] * N)
    r = client.post("/v1/runs", json={"student_id": "s3", "dataset": "arith", "shard_size": 8})
    assert r.status_code == 422 and "positive weight" in r.json()["error"]


def test_routing_errors_and_oversized_bodies_have_the_error_shape(client):
    for r, status in ((client.get("/nope"), 404), (client.delete("/v1/health"), 405),
                      (client.get("/v1/runs/r-zz"), 422), (client.get("/v1/runs/r-000000000000"), 404),
                      (client.post("/v1/runs", content=b"{", headers={"content-type": "application/json"}),
                       422),
                      (client.post("/v1/runs", content=b"x" * 70000), 413)):
        assert r.status_code == status and set(r.json()) == {"error", "code", "detail"}, r.text


def test_token_guards_every_post_but_not_gets(home):
    app = create_app(Settings(home=home[0].root, token="s3cret"))
    with TestClient(app) as c:
        body = {"student_id": "s1", "dataset": "arith"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = c.post("/v1/runs", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        run = c.post("/v1/runs", json=body, headers=good).json()["run_id"]
        assert c.post(f"/v1/runs/{run}/leases", json={"consumer": "a"}).status_code == 401
        held = c.post(f"/v1/runs/{run}/leases", json={"consumer": "a"}, headers=good).json()
        assert c.post(f"/v1/runs/{run}/leases/{held['lease_id']}/ack").status_code == 401
        assert c.post(f"/v1/runs/{run}/leases/{held['lease_id']}/ack", headers=good).status_code == 200
        for url in ("/v1/health", f"/v1/runs/{run}", f"/v1/runs/{run}/epochs/0/shards/0", "/metrics"):
            assert c.get(url).status_code == 200


def test_metrics_count_requests_items_and_outstanding_leases(client):
    run = new_run(client)["run_id"]
    held = lease(client, run)
    text = client.get("/metrics").text
    assert "paced_items_served_total 10.0" in text and "paced_leases_outstanding 1.0" in text
    assert ('paced_http_requests_total{method="POST",route="/v1/runs/{run_id}/leases",status="200"} 1.0'
            in text)
    ack(client, run, held["lease_id"])
    assert "paced_leases_outstanding 0.0" in client.get("/metrics").text


def test_include_items_false_leases_without_rows(client):
    run = new_run(client)["run_id"]
    got = lease(client, run, include_items=False)
    assert got["status"] == "leased" and "items" not in got and got["num_items"] == 10


def test_a_run_that_leaves_most_of_the_pool_untrained_is_logged(client, home, caplog):
    add_snapshot(home[0], "s3", [0 if i % 3 else 4 for i in range(N)])  # two thirds never solved
    with caplog.at_level("WARNING", logger="paced.api"):
        starved = new_run(client, student_id="s3")
        guarded = new_run(client, student_id="s3", scheme="paced-posterior")
    warned = [r.getMessage() for r in caplog.records if "weight 0" in r.getMessage()]
    assert len(warned) == 1 and "paced-posterior" in warned[0]
    assert (len(starved["warnings"]) == 1 and "weight 0" in starved["warnings"][0]
            and guarded["warnings"] == [])
