"""Lineage snapshots from the training samples: `paced train --group-size K --group-snapshot-every N`.

The group trainer commits step s's graded samples as rollouts of student
`{lineage}-{run}-step{s}` (paced/jobs/group_rollouts.py). Every N steps this writes the next
snapshot of the lineage L itself, through the code of `refresh_lineage` (paced/jobs/lineage.py),
with no rollout:

- every problem trained since the previous snapshot of the run: the counts of its *newest*
  step's samples (K samples of one checkpoint, or a multiple of K when it came twice in that
  step), `student_id` = that step's `{lineage}-{run}-step{s}`, `stale_age` 0, aggregated by the
  SQL of `paced refresh`;
- every other row of the previous snapshot carried forward (`stale_age` + 1).

A run of the service on L that follows snapshots re-plans from it at its next lease; from
files the trainer rebuilds its manifest on it (paced/jobs/remeasure.py). Idempotent and
resumable like `refresh_lineage`: a key over (lineage, data set, previous snapshot, and per step
its student, sampling hash, problems and input files with sizes) names the snapshot, and a rerun
finds the one its side file records (writing the Parquet file if a kill came between the two).
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from paced.jobs.lineage import (
    _fresh_rows,
    _merge,
    _write_side,
    carried_stats,
    keyed_inputs,
    read_previous,
    resolve_snapshot,
    stale_stats,
)
from paced.store.home import Home, validate_name
from paced.store.rollouts import batch_files
from paced.store.snapshots import write_snapshot


def newest_groups(home: Home, dataset: str,
                  sample_sets: list[tuple[str, str]]) -> list[tuple[str, str, list, list]]:
    """(student, sampling hash, files, problems whose newest samples these are) per sample set
    (oldest first) that has any; a set without committed samples (an off-policy step) is left out."""
    newest: dict[str, int] = {}
    found = []
    for i, (student, sampling_hash) in enumerate(sample_sets):
        files = batch_files(home.rollouts_dir(validate_name(student, "student_id"), sampling_hash, dataset))
        ids = pq.read_table(files, columns=["problem_id"])["problem_id"].to_pylist() if files else []
        newest |= dict.fromkeys(ids, i)
        found.append((student, sampling_hash, files))
    return [(student, h, files, sorted(p for p, j in newest.items() if j == i))
            for i, (student, h, files) in enumerate(found) if i in set(newest.values())]


def refresh_lineage_from_samples(home: Home, lineage_id: str, dataset: str,
                                 sample_sets: list[tuple[str, str]],
                                 previous_snapshot_id: str | None, *, previous_student_id: str | None = None,
                                 step: int | None = None, sampling: dict | None = None) -> str | None:
    """Write (or find) L's snapshot from the samples of `sample_sets` ([(student, sampling hash)],
    oldest step first); its snapshot id, or None when none of them has a sample in `dataset`."""
    validate_name(lineage_id, "lineage_id")
    previous_student_id = previous_student_id or lineage_id
    groups = newest_groups(home, dataset, sample_sets)
    if not groups:
        return None
    key = hashlib.sha256(json.dumps({
        "kind": "training-samples", "lineage_id": lineage_id, "dataset": dataset,
        "previous": [previous_student_id, previous_snapshot_id],
        "sources": [{"student_id": s, "sampling_hash": h, "problem_ids": ids,
                     "inputs": keyed_inputs(home, files)}
                    for s, h, files, ids in groups],
    }, sort_keys=True).encode()).hexdigest()
    found, snapshot_id, done = resolve_snapshot(home, lineage_id, key)
    if done:
        return found
    previous = read_previous(home, previous_student_id, previous_snapshot_id)
    parts = [_fresh_rows(home, files, s, h, dataset, ids, snapshot_id) for s, h, files, ids in groups]
    fresh = pa.concat_tables([table for table, _ in parts])
    table = _merge(previous, fresh, dataset, snapshot_id)
    if not found:
        newest_student, newest_hash = groups[-1][:2]
        _write_side(home, lineage_id, snapshot_id, table, {
            "key": key, "snapshot_id": snapshot_id, "student_id": lineage_id, "checkpoint_id": newest_student,
            "step": step, "dataset": dataset, "sampling_hash": newest_hash, "source": "training-samples",
            "checkpoints": [s for s, *_ in groups],
            "previous_student_id": previous_student_id if previous_snapshot_id else None,
            "previous_snapshot_id": previous_snapshot_id, "rerolled": fresh.num_rows,
            "carried": table.num_rows - fresh.num_rows, "samples": int(pc.sum(fresh["n"]).as_py() or 0),
            "tokens": sum(tokens for _, tokens in parts), "stale_age": stale_stats(table),
            "carry_over_decay": None, "carried_share": carried_stats(table),
        }, sampling)
    write_snapshot(home, lineage_id, table, snapshot_id)
    return snapshot_id

