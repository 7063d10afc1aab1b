"""Property tests of the pure parts of the service: the lease state machine of one epoch (with
renewals and re-plans), and the shard offsets of an epoch's JSONL file."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paced.api.leases import EpochLeases
from paced.api.shardfiles import line_offsets
from paced.errors import ConflictError

# An operation: ("lease", ttl) | ("ack", index of a lease granted so far) | ("tick", seconds)
OPS = st.lists(st.one_of(
    st.tuples(st.just("lease"), st.sampled_from([1.0, 2.0, 5.0])),
    st.tuples(st.just("ack"), st.integers(0, 40)),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 3.0])),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(shards=st.integers(1, 6), ops=OPS)
def test_leases_follow_the_state_machine_and_ack_each_shard_at_most_once(shards, ops):
    state, now, granted = EpochLeases("r-000000000000", 0, shards), 0.0, []
    holder, expires, acked = {}, {}, {}  # the model: latest lease and its expiry per shard, acks
    for kind, arg in ops:
        if kind == "tick":
            now += arg
        elif kind == "lease":
            open_ = [k for k in range(shards) if k not in acked and (k not in holder or expires[k] <= now)]
            shard = state.pick(now)
            assert shard == (min(open_) if open_ else None)
            if shard is not None:
                lease_id = f"l-{len(granted):016x}"
                state.grant(shard, lease_id, now + arg)
                holder[shard], expires[shard] = lease_id, now + arg
                granted.append((lease_id, shard))
        elif granted:
            lease_id, shard = granted[arg % len(granted)]
            if acked.get(shard) == lease_id:
                assert state.check_ack(lease_id) == "already"
            elif shard in acked or holder[shard] != lease_id:
                with pytest.raises(ConflictError):
                    state.check_ack(lease_id)
            else:
                assert state.check_ack(lease_id) == "ack"
                state.record_ack(shard, lease_id)
                acked[shard] = lease_id
    assert state.acked == len(acked) and state.all_acked == (len(acked) == shards)
    assert sorted(state.live(now)) == sorted(k for k in holder if k not in acked and expires[k] > now)


# Re-plans: ("freeze",) stops fresh grants; ("resize", extra) makes the epoch next_fresh + extra long.
REPLAN_OPS = st.lists(st.one_of(
    st.tuples(st.just("lease"), st.sampled_from([1.0, 3.0])),
    st.tuples(st.just("ack"), st.integers(0, 40)),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 2.0])),
    st.tuples(st.just("freeze"), st.just(0)),
    st.tuples(st.just("resize"), st.integers(0, 4)),
    st.tuples(st.just("renew"), st.integers(0, 40)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(shards=st.integers(1, 6), ops=REPLAN_OPS)
def test_replans_only_change_shards_never_granted_and_pause_fresh_grants(shards, ops):
    state, now, granted, acked = EpochLeases("r-000000000000", 0, shards), 0.0, [], {}
    expires, holder = {}, {}
    for kind, arg in ops:
        if kind == "tick":
            now += arg
        elif kind == "freeze" and state.next_fresh < state.shards:
            state.pending = "re-plan"
        elif kind == "resize" and state.frozen:
            state.resize(state.next_fresh + arg)
            state.starts.append(state.next_fresh)
            state.pending = None
        elif kind == "lease":
            expired = [k for k in expires if k not in acked and expires[k] <= now]
            fresh = [state.next_fresh] if state.next_fresh < state.shards and not state.frozen else []
            shard = state.pick(now)
            assert shard == min(expired + fresh, default=None)
            if shard is not None:
                lease_id = f"l-{len(granted):016x}"
                state.grant(shard, lease_id, now + arg)
                expires[shard], holder[shard] = now + arg, lease_id
                granted.append((lease_id, shard))
                assert state.segment_of(shard) == max(i for i, s in enumerate(state.starts) if s <= shard)
        elif kind == "renew" and granted:
            lease_id, shard = granted[arg % len(granted)]
            if shard in acked or holder[shard] != lease_id:
                with pytest.raises(ConflictError):
                    state.check_renew(lease_id)
            else:
                state.check_renew(lease_id)
                state.renew(lease_id, now + 3.0)
                expires[shard] = now + 3.0
        elif kind == "ack" and granted:
            lease_id, shard = granted[arg % len(granted)]
            try:
                if state.check_ack(lease_id) == "ack":
                    state.record_ack(shard, lease_id)
                    assert shard not in acked
                    acked[shard] = lease_id
            except ConflictError:
                pass
    assert sorted({k for _, k in granted}) == list(range(state.next_fresh))  # granted in order, a prefix
    assert state.next_fresh <= state.shards and all(k < state.shards for k in acked)
    assert state.acked == len(acked) and state.all_acked == (len(acked) == state.shards)
    if state.next_fresh:
        with pytest.raises(ValueError):
            state.resize(state.next_fresh - 1)


def test_an_acked_shard_is_never_granted_again():
    state = EpochLeases("r-000000000000", 0, 1)
    state.grant(0, "l-a", 10.0)
    state.record_ack(0, "l-a")
    assert state.pick(100.0) is None
    with pytest.raises(ValueError):
        state.grant(0, "l-b", 200.0)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), max_size=60), every=st.integers(1, 8), chunk=st.integers(1, 50))
def test_line_offsets_cut_a_file_every_n_lines(tmp_path_factory, lengths, every, chunk):
    path = tmp_path_factory.mktemp("lines") / "f.jsonl"
    data = b"".join(b"x" * n + b"\n" for n in lengths)
    path.write_bytes(data)
    ends = [i + 1 for i, b in enumerate(data) if b == 10]
    expected = [0] + [ends[k - 1] for k in range(every, len(ends) + 1, every)]
    if expected[-1] != len(data):
        expected.append(len(data))
    assert line_offsets(path, every, chunk) == expected
