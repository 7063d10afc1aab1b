"""The trainer's service source renews the leases it holds (as it does before a pass-rate
refresh), against a real uvicorn server on a loopback port."""

import time

import httpx
from api_fixtures import ServerThread, make_service_home

from paced.api.app import create_app
from paced.api.settings import Settings
from paced.client import ShardClient
from paced.trainer.data import HttpShardSource


def test_http_source_renews_the_leases_it_holds_and_not_the_acked_ones(tmp_path):
    home, _ = make_service_home(tmp_path, n=40)
    with ServerThread(create_app(Settings(home=home.root))) as server:
        run = httpx.post(f"{server.url}/v1/runs", json={"student_id": "s1", "dataset": "arith",
                                                        "shard_size": 5}).json()["run_id"]
        source = HttpShardSource(f"{server.url}/v1/runs/{run}", consumer="trainer", ttl_seconds=1.0)
        shards = iter(source)
        first, second = next(shards), next(shards)
        source.ack(first.key)
        assert source.renew(ttl_seconds=60) == 1  # only the lease still held
        time.sleep(1.5)  # past the first TTL: without the renewal shard 1 would go out again
        other = httpx.post(f"{server.url}/v1/runs/{run}/leases", json={"consumer": "other"}).json()
        assert (second.index, other["shard"]) == (1, 2)
        source.ack(second.key)
        assert source.renew() == 0 and source.acked == 2
        stale = ShardClient(f"{server.url}/v1/runs/{run}", ttl_seconds=0.2, renew_in_background=False)
        held = stale.lease()
        time.sleep(0.4)
        assert httpx.post(f"{server.url}/v1/runs/{run}/leases",
                          json={"consumer": "x"}).json()["shard"] == held.index
        # the shard went out again: dropped
        assert stale.renew() == 0 and not stale.held and stale.dropped == 1
        source.close()
        stale.close()
