"""The trainer's typed records: columnar batches, the stream's resumable position, progress records."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from trainer_helpers import make_rows, write_shards

from paced.errors import InputError, PacedError
from paced.store.files import write_parquet_atomic
from paced.trainer.checkpoint import Progress
from paced.trainer.data import BatchStream, FileShardSource, Position
from paced.trainer.records import EvalPoint, RemeasureRecord


def stream_over(folder, position=None, batch_size=3) -> BatchStream:
    stream = BatchStream(FileShardSource(folder), batch_size, need_completion=True)
    stream.load_state_dict({"position": position})
    return stream


def test_batches_are_columns_and_a_stream_resumes_from_its_state_dict(tmp_path):
    rows = make_rows(20, completion_every=4)
    folder = write_shards(tmp_path / "m", rows, shard_size=7)
    stream = stream_over(folder)
    taken = [stream.next_batch() for _ in range(3)]
    first = taken[0]
    assert isinstance(first.weights, np.ndarray) and first.weights.dtype == np.float64
    kept = [r for r in rows if r["completion"] is not None]
    assert first.prompts == [r["prompt"] for r in kept[:3]]
    assert first.weights.tolist() == [r["weight"] for r in kept[:3]]
    state = stream.state_dict()
    assert Position.from_json(state["position"]) == taken[-1].position
    expected = [stream.next_batch() for _ in range(4)]  # across the epoch's end
    resumed = stream_over(folder, state["position"])
    again = [resumed.next_batch() for _ in range(4)]
    assert [b.prompts for b in again] == [b.prompts for b in expected]
    assert [b.position for b in again] == [b.position for b in expected]
    with pytest.raises(PacedError, match="started"):
        resumed.load_state_dict(state)


def test_a_batch_given_back_is_not_counted_as_taken(tmp_path):
    stream = stream_over(write_shards(tmp_path / "m", make_rows(12), shard_size=12))
    stream.next_batch()
    before = stream.state_dict()
    stream.push_back(stream.next_batch())
    assert stream.state_dict() == before
    stream.next_batch()
    assert stream.state_dict() != before


def test_progress_reads_the_trainer_state_an_older_version_wrote():
    record = {"kind": "every", "step": 2, "round": 1, "checkpoint": "checkpoint-2", "checkpoint_id": "m-1",
              "student_id": "s1", "snapshot_id": "x", "previous_snapshot_id": "w", "dataset": "arith",
              "sampling_hash": "h", "rerolled": 3, "carried": 27, "stale_age_max": 1, "stale_age_mean": 0.9,
              "rollout_samples": 6, "rollout_tokens": 18, "rollout_seconds": 0.5, "backend": "transformers",
              "source": "out/manifest-step2", "refresh_seconds": 1.5}
    state = {"step": 3, "stage": 0, "stage_step": 3, "stage_steps": [3], "source": "out/manifest-step2",
             "position": {"epoch": 0, "shard": 1, "row": 2}, "skipped_batches": 0, "tokens": 40,
             "skipped_rows": 1, "seconds": 2.0, "refreshes": [record],
             "pending_refresh": {"kind": "every", "step": 4, "stage": 0, "round": 2},
             "evals": [{"step": 0, "accuracy": 0.5, "by_difficulty": {"1": 0.5}, "problems": 6,
                        "train_tokens": 0,
                        "rollout_tokens": 0, "seconds": 0.1}], "first_loss": 2.0, "last_loss": 1.0}
    progress = Progress.from_state(state, 1, "ignored")
    assert progress.remeasures == [RemeasureRecord.from_json(record)]
    assert progress.remeasures[0].to_json() == record and progress.pending.round == 2
    assert progress.evals[0].accuracy == 0.5
    with pytest.raises(InputError, match="a refresh record lacks snapshot_id"):
        Progress.from_state({**state, "refreshes": [{k: v for k, v in record.items() if k != "snapshot_id"}]},
                            1, "")


def test_a_batch_carries_every_shard_column_and_across_shards_lacking_one(tmp_path):
    rows = make_rows(8)
    folder = write_shards(tmp_path / "m", rows, shard_size=4)
    bare = pa.Table.from_pylist([{"prompt": r["prompt"], "completion": r["completion"], "weight": r["weight"]}
                                 for r in rows[4:]])
    write_parquet_atomic(folder / "shard-00001.parquet", bare)  # a shard without ids or counts
    batch = stream_over(folder, batch_size=6).next_batch()
    assert batch.column("problem_id") == [r["problem_id"] for r in rows[:4]] + [None, None]
    assert batch.column("n") == [8, 8, 8, 8, None, None]
    assert batch.column("answer") == [None] * 6  # no shard has the column
    kept = batch.select(batch.weights > 0.6)
    assert kept.prompts == [r["prompt"] for r in rows[:6] if r["weight"] > 0.6]
    assert kept.weights.tolist() == [r["weight"] for r in rows[:6] if r["weight"] > 0.6]


@pytest.mark.parametrize(("bad", "message"), [(None, "row 4 has no `weight`"),
                                              (float("nan"), "row 4 has weight"), (-1.0, "row 4 has weight"),
                                              (float("inf"), "row 4 has weight")])
def test_a_missing_or_bad_weight_is_an_error_naming_the_shard(tmp_path, bad, message):
    """No weight, or one that is not finite and >= 0: one error naming the shard file and row."""
    rows = make_rows(6)
    folder = write_shards(tmp_path / "m", rows, shard_size=6)
    table = pa.Table.from_pylist([{**r, "weight": bad if i == 4 else r["weight"]}
                                  for i, r in enumerate(rows)])
    write_parquet_atomic(folder / "shard-00000.parquet", table)
    with pytest.raises(InputError, match=rf"shard-00000.parquet: {message}"):
        stream_over(folder).next_batch()


def test_group_and_carry_over_records_keep_their_own_fields():
    base = {"step": 4, "round": 2, "checkpoint": "checkpoint-4", "student_id": "s1", "snapshot_id": "y",
            "previous_snapshot_id": "x", "dataset": "arith", "rerolled": 0, "carried": 30, "stale_age_max": 2,
            "stale_age_mean": 1.0, "rollout_samples": 0, "rollout_tokens": 0, "rollout_seconds": 0.0,
            "source": "out/manifest-step4", "refresh_seconds": 0.2}
    group = {**base, "kind": "samples", "checkpoint_id": "m-4", "sampling_hash": "h", "backend": None,
             "sample_steps": [2, 3], "samples": 64, "sample_tokens": 256,
             "frontier": {"problems": 30, "share_mid": 0.1}}
    carry = {**base, "kind": "every", "checkpoint_id": "m-4", "sampling_hash": "h", "backend": "transformers",
             "carry_over_decay": 0.8, "carried_share_mean": 0.4}
    nothing_new = {**base, "kind": "samples", "checkpoint_id": None, "sampling_hash": None, "backend": None,
                   "sample_steps": [], "samples": 0, "sample_tokens": 0}
    for record in (group, carry, nothing_new):
        assert RemeasureRecord.from_json(record).to_json() == record
    point = {"step": 5, "accuracy": 0.25, "by_difficulty": {}, "problems": 4, "train_tokens": 10,
             "rollout_tokens": 3, "generated_tokens": 7, "flops": 1.5e9, "train_seconds": 1.0, "seconds": 0.1}
    assert EvalPoint.from_json(point).to_json() == point
    # an evaluator's or hook's own figures are kept as it reported them
    own = {**point, "forget_accuracy": 0.5, "by_module": {"add": 0.25}}
    assert EvalPoint.from_json(own).to_json() == own
    assert EvalPoint.from_json(own).extra == {"forget_accuracy": 0.5, "by_module": {"add": 0.25}}
    assert RemeasureRecord.from_json({**carry, "custom": [1, 2]}).to_json() == {**carry, "custom": [1, 2]}
