"""Runs that follow snapshots re-plan the shards not leased yet when a newer snapshot appears
(mid-epoch), and lease renewal. The real app (TestClient) over a real data home and state file;
a settable clock drives lease expiry."""

import numpy as np
import pytest
from api_fixtures import add_snapshot, eligible, make_service_home, problem_ids
from fastapi.testclient import TestClient

from paced.api.app import create_app
from paced.api.settings import Settings
from paced.curriculum import WeightScheme, compute_weights

N = 100
BASE = [i % 9 for i in range(N)]  # make_service_home's snapshot: problem i solved i % 9 times of 8
NEWER = [(i * 5 + 3) % 9 for i in range(N)]  # other pass rates for every problem


@pytest.fixture
def home(tmp_path):
    return make_service_home(tmp_path, n=N)


def open_client(home, clock, **settings):
    return TestClient(create_app(Settings(home=home.root, **settings), clock=clock))


def new_run(c, **fields):
    r = c.post("/v1/runs", json={"student_id": "s1", "dataset": "arith", "shard_size": 10, **fields})
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


def lease(c, run, consumer="c", **fields):
    r = c.post(f"/v1/runs/{run}/leases", json={"consumer": consumer, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def ack(c, run, got):
    r = c.post(f"/v1/runs/{run}/leases/{got['lease_id']}/ack")
    assert r.status_code == 200, r.text


def shard_bytes(c, run, epoch, shard):
    return [c.get(f"/v1/runs/{run}/epochs/{epoch}/shards/{shard}?format={f}").content for f in ("json",
                                                                                                "parquet")]


def consume(c, run, acked):
    """Lease and ack until done, appending every leased shard to `acked`."""
    while (got := lease(c, run))["status"] != "done":
        assert got["status"] == "leased", got
        ack(c, run, got)
        acked.append(got)


def expected_weights(correct: list[int], ids: list[str]) -> dict[str, float]:
    """compute_weights (paced, α = β = 1) on the counts of `ids`, kept where > 0 and normalised
    to mean 1 over those, as a manifest does."""
    w = compute_weights(np.array([correct[int(pid[1:])] for pid in ids]), np.full(len(ids), 8),
                        WeightScheme())
    keep = w > 0
    return {pid: x / w[keep].mean() for pid, x, k in zip(ids, w, keep, strict=True) if k}


def assert_exactly_once(c, run, acked, epoch=0):
    """Every item of the epoch's final plan is in exactly one acked shard; no problem twice."""
    mine = [got for got in acked if got["epoch"] == epoch]
    progress = c.get(f"/v1/runs/{run}").json()["progress"][epoch]
    assert sorted(got["shard"] for got in mine) == list(range(progress["shards"]))
    items = [it for got in mine for it in got["items"]]
    assert sorted(it["position"] for it in items) == list(range(progress["items"]))
    ids = [it["problem_id"] for it in items]
    assert len(ids) == len(set(ids))
    return items


def test_a_following_run_replans_the_shards_not_leased_yet_from_a_newer_snapshot(home, clock):
    with open_client(home[0], clock) as c:
        follow, pinned = new_run(c, follow_snapshots=True), new_run(c)
        first = [lease(c, follow, ttl_seconds=30) for _ in range(3)]
        for got in first[:2]:
            ack(c, follow, got)
        before = {k: shard_bytes(c, follow, 0, k) for k in range(3)}
        unbuilt = c.get(f"/v1/runs/{follow}/epochs/0/shards/5")
        assert unbuilt.status_code == 404 and unbuilt.json()["code"] == "shard_not_built"
        newer = add_snapshot(home[0], "s1", NEWER)
        switched = lease(c, follow, ttl_seconds=30)
        assert (switched["shard"], switched["snapshot_id"]) == (3, newer)
        served = [it["problem_id"] for got in first for it in got["items"]]
        remainder = expected_weights(NEWER, sorted(set(problem_ids(N)) - set(served)))
        for it in switched["items"]:
            assert it["weight"] == pytest.approx(remainder[it["problem_id"]], rel=1e-12)
            assert it["pass_rate"] == NEWER[int(it["problem_id"][1:])] / 8
        ack(c, follow, switched)
        # shard 2's lease (granted before the re-plan) expires: it goes out again, same rows
        clock.advance(31)
        again = lease(c, follow)
        assert again["shard"] == 2 and again["items"] == first[2]["items"] and again["snapshot_id"] == home[1]
        acked = first[:2] + [switched, again]
        ack(c, follow, again)
        consume(c, follow, acked)
        items = assert_exactly_once(c, follow, acked)
        later = {it["problem_id"] for got in acked if got["shard"] >= 3 for it in got["items"]}
        assert later == set(remainder) and not later & set(served)
        assert all(shard_bytes(c, follow, 0, k) == before[k] for k in range(3))
        assert len(items) == 30 + len(remainder)
        view = c.get(f"/v1/runs/{follow}").json()
        assert [(h["segment"], h["from_shard"], h["snapshot_id"],
                 h["student_ids"]) for h in view["snapshot_history"]] \
            == [(0, 0, home[1], ["s1"]), (1, 3, newer, ["s1"])]
        assert view["done"] and view["progress"][0]["items"] == len(items)
        pinned_items = []
        consume(c, pinned, pinned_items)
        rows = [it for got in pinned_items for it in got["items"]]
        assert len(rows) == eligible(N) and all(it["pass_rate"] == BASE[int(it["problem_id"][1:])] / 8
                                                for it in rows)
        assert {got["snapshot_id"] for got in pinned_items} == {home[1]}
        assert len(c.get(f"/v1/runs/{pinned}").json()["snapshot_history"]) == 1


def test_a_replan_that_leaves_no_weight_ends_the_epoch_at_the_shards_already_out(home, clock):
    with open_client(home[0], clock) as c:
        run = new_run(c, follow_snapshots=True, epochs=2)
        got = lease(c, run)
        add_snapshot(home[0], "s1", [8] * N)  # every problem solved: weight 0 under paced
        ack(c, run, got)
        after = lease(c,
                      run)  # epoch 0 ends after shard 0; epoch 1 is built from the newer snapshot: no items
        assert after["status"] == "done"
        view = c.get(f"/v1/runs/{run}").json()
        assert view["progress"][0]["shards"] == 1 and view["progress"][0]["items"] == 10
        assert [(h["epoch"], h["from_shard"]) for h in view["snapshot_history"]] == [(0, 0), (0, 1), (1, 0)]


def test_weighted_sample_runs_replan_the_remaining_draws(home, clock):
    with open_client(home[0], clock) as c:
        run = new_run(c, follow_snapshots=True, mode="weighted-sample", num_samples=25)
        acked = [lease(c, run)]
        ack(c, run, acked[0])
        newer = add_snapshot(home[0], "s1", NEWER)
        consume(c, run, acked)
        rows = [it for got in acked for it in got["items"]]
        assert sorted(it["position"] for it in rows) == list(range(25)) and {it["weight"]
                                                                             for it in rows} == {1.0}
        assert [got["snapshot_id"] for got in acked] == [home[1], newer, newer]
        assert all(NEWER[int(it["problem_id"][1:])] not in (0, 8) for it in rows[10:])


def test_a_restart_reloads_the_segments_and_serves_each_item_once(home, clock):
    root = home[0].root
    with open_client(home[0], clock) as c:
        run = new_run(c, follow_snapshots=True, shard_size=8)
        acked = [lease(c, run) for _ in range(2)]
        for got in acked:
            ack(c, run, got)
        add_snapshot(home[0], "s1", NEWER)
        held = lease(c, run, ttl_seconds=60)  # the re-plan's first shard, not acked before the restart
        assert held["shard"] == 2
        before = shard_bytes(c, run, 0, 2)
    segment = root / "service" / "runs" / run / "epoch-00000"
    (segment / "seg-002").mkdir()  # as a kill after writing a segment, before recording it, leaves
    (segment / "seg-002" / "epoch.json").write_text("{}")
    (segment / ".tmp-seg-003.x").mkdir()  # as a kill while writing one leaves
    with open_client(home[0], clock) as c:
        assert not (segment / ".tmp-seg-003.x").exists()
        assert shard_bytes(c, run, 0, 2) == before
        again = c.post(f"/v1/runs/{run}/leases/{held['lease_id']}/ack")
        assert again.status_code == 200 and again.json()["already_acked"] is False
        acked.append(held)
        third = add_snapshot(home[0], "s1", [(i + 2) % 9 for i in range(N)])
        nxt = lease(c, run)
        assert (nxt["shard"], nxt["snapshot_id"]) == (3, third)  # segment 2, built over the leftover folder
        ack(c, run, nxt)
        acked.append(nxt)
        consume(c, run, acked)
        assert_exactly_once(c, run, acked)
        history = c.get(f"/v1/runs/{run}").json()["snapshot_history"]
        assert [(h["segment"], h["from_shard"]) for h in history] == [(0, 0), (1, 2), (2, 3)]
    with open_client(home[0], clock) as c:
        assert lease(c, run)["status"] == "done"
        assert shard_bytes(c, run, 0, 2) == before


# ---------------------------------------------------------------- renewal


def renew(c, run, lease_id, **body):
    return c.post(f"/v1/runs/{run}/leases/{lease_id}/renew", json=body or None)


def test_renew_extends_a_lease_past_its_expiry(home, clock):
    with open_client(home[0], clock) as c:
        run = new_run(c)
        held = lease(c, run, "a", ttl_seconds=10)
        clock.advance(8)
        r = renew(c, run, held["lease_id"], ttl_seconds=20)
        assert r.status_code == 200 and r.json()["ttl_seconds"] == 20 and r.json()["shard"] == 0
        clock.advance(15)  # past the first expiry, inside the renewed one
        assert lease(c, run, "b")["shard"] == 1
        clock.advance(10)  # the renewed lease expired too, but nobody took shard 0: renewing is still fine
        assert renew(c, run, held["lease_id"]).json()["ttl_seconds"] == 300  # the service's default TTL
        ack(c, run, held)
        acked = renew(c, run, held["lease_id"])
        assert acked.status_code == 409 and acked.json()["code"] == "lease_acked"


def test_renew_refuses_superseded_unknown_and_bad_requests(home, clock):
    with open_client(home[0], clock) as c:
        run = new_run(c)
        old = lease(c, run, "a", ttl_seconds=5)
        clock.advance(6)
        assert lease(c, run, "b")["shard"] == old["shard"]  # the shard went out again
        r = renew(c, run, old["lease_id"])
        assert r.status_code == 409 and r.json()["code"] == "lease_superseded"
        unknown = renew(c, run, "l-0000000000000000")
        assert unknown.status_code == 404 and unknown.json()["detail"]["field"] == "lease_id"
        assert renew(c, "r-000000000000", old["lease_id"]).status_code == 404
        too_long = renew(c, run, old["lease_id"], ttl_seconds=1e6)
        assert too_long.status_code == 422 and too_long.json()["detail"]["field"] == "ttl_seconds"


def test_renew_needs_the_token_and_survives_a_restart(home, clock):
    good = {"Authorization": "Bearer s3cret"}
    with open_client(home[0], clock, token="s3cret") as c:
        run = c.post("/v1/runs", json={"student_id": "s1", "dataset": "arith", "shard_size": 10},
                     headers=good).json()
        held = c.post(f"/v1/runs/{run['run_id']}/leases", json={"consumer": "a", "ttl_seconds": 5},
                      headers=good).json()
        url = f"/v1/runs/{run['run_id']}/leases/{held['lease_id']}/renew"
        assert c.post(url, json={"ttl_seconds": 100}).status_code == 401
        assert c.post(url, json={"ttl_seconds": 100}, headers=good).status_code == 200
    with open_client(home[0], clock, token="s3cret") as c:
        clock.advance(50)
        other = c.post(f"/v1/runs/{run['run_id']}/leases", json={"consumer": "b"}, headers=good).json()
        assert other["shard"] == 1  # shard 0 is still held: the renewal was written down
