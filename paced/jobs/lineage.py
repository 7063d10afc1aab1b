"""Lineage snapshots: the pass rates of a student that keeps changing while it trains.

A training run's student has a lineage id L: the student id its manifest or service run was
built for (e.g. "base"). Each refresh rolls out one checkpoint (a student id of its own, the
hash of its folder) on some problems and writes a new snapshot of L under `snapshots/L/`, so a
run on L that follows snapshots takes it as "the newest snapshot of its student":

- rows of the problems just rolled out: counts of the checkpoint's rollouts (`student_id` =
  the checkpoint, `stale_age` 0), aggregated by the same SQL as `paced refresh`;
- every other row of L's previous snapshot, carried forward (`student_id` = the checkpoint
  that measured it, `stale_age` + 1, `carried_share` 1).

With carry-over (a decay λ), a fresh row's estimate also keeps λ × the previous row's evidence
(`evidence_n`, `evidence_correct`: discounted Beta counts; `n`/`correct` stay the fresh samples'
integer counts) and `carried_share` says how much of it is carried (paced/curriculum/carryover.py).

Beside it, `snapshots/L/{snapshot_id}.json` (written first, atomically) records the lineage:
which checkpoint and step produced the snapshot, from which previous snapshot, how many rows
were re-rolled and carried, rollout samples and tokens, stale ages, and the chain of those
records since the lineage began (`history`). It also records the fingerprint `paced refresh`
would compute for L's own rollouts, so the cron job does not replace the lineage snapshot
with one made of L's rollouts alone.

Idempotent and resumable: a key over (lineage, checkpoint, data set, sampling hash, previous
snapshot, problem ids, input files and sizes) names the refresh. A call whose key a snapshot
of L already records returns that snapshot, writing its Parquet file first if a kill came
between the two files (the rows are recomputed from the same inputs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from paced.curriculum.carryover import CarryOver, carry_evidence
from paced.curriculum.reprobe import carry_forward
from paced.errors import InputError
from paced.jobs.refresh import choose_sampling_hash, fingerprint, input_files
from paced.store.home import Home, open_home, validate_name
from paced.store.rollouts import batch_files, rollout_sets
from paced.store.snapshots import (
    COUNTS_SCHEMA,
    SNAPSHOT_SCHEMA,
    SnapshotRecord,
    fill_evidence,
    new_snapshot_id,
    read_snapshot,
    read_snapshot_record,
    snapshot_records,
    write_snapshot,
    write_snapshot_record,
)
from paced.store.sql import connect, query_arrow, statement


def read_lineage(home: Home | str | Path, lineage_id: str, snapshot_id: str) -> dict:
    """The lineage record of one snapshot of L (what `refresh_lineage` wrote beside it)."""
    home = home if isinstance(home, Home) else open_home(home, create=False)
    record = read_snapshot_record(home, lineage_id, snapshot_id)
    if record is None or record.lineage is None:
        raise InputError(f"snapshot {snapshot_id} of {lineage_id!r} was not written by a lineage refresh")
    return record.lineage


def keyed_inputs(home: Home, files) -> list[dict]:
    """The inputs of a refresh as its key records them: each file's path in the home and size."""
    return [{"path": str(f.relative_to(home.root)), "bytes": f.stat().st_size} for f in files]


def read_previous(home: Home, student_id: str, snapshot_id: str | None) -> pa.Table | None:
    """The snapshot a lineage refresh builds on (None: the lineage's first)."""
    return read_snapshot(home, student_id, snapshot_id) if snapshot_id else None


def resolve_snapshot(home: Home, lineage_id: str, key: str) -> tuple[str | None, str, bool]:
    """(the side file's snapshot id for `key` or None, the id to write under, whether that
    snapshot is already complete): a rerun of a killed refresh finishes it under the same id."""
    found = _find(home, lineage_id, key)
    return found, found or new_snapshot_id(key), bool(found and (home.snapshots_dir(lineage_id) /
                                                               f"{found}.parquet").exists())


def _find(home: Home, lineage_id: str, key: str) -> str | None:
    """The snapshot of L whose side file records this refresh key, if any."""
    for record in snapshot_records(home, lineage_id):
        if (record.lineage or {}).get("key") == key:
            return record.snapshot_id
    return None


def _fresh_rows(home: Home, files: list[Path], checkpoint_id: str, sampling_hash: str, dataset: str,
                problem_ids: list[str], snapshot_id: str) -> tuple[pa.Table, int]:
    """Snapshot rows of `problem_ids` from the checkpoint's rollouts, and their generated tokens."""
    if not problem_ids:
        return SNAPSHOT_SCHEMA.empty_table(), 0
    params = {"files": [str(f) for f in files], "student_id": checkpoint_id, "sampling_hash": sampling_hash,
              "snapshot_id": snapshot_id}
    rows = query_arrow(connect(), statement("passrates.aggregate"), params)
    table = fill_evidence(rows.cast(COUNTS_SCHEMA))
    wanted = pa.array(problem_ids, pa.string())
    table = table.filter(pc.is_in(table["problem_id"], value_set=wanted))
    missing = set(problem_ids) - set(table["problem_id"].to_pylist())
    if missing:
        raise InputError(f"{len(missing)} problems have no rollouts of {checkpoint_id} under sampling "
                         f"{sampling_hash} in {dataset!r}, e.g. {sorted(missing)[:3]}; roll them out first")
    tokens = pa.concat_tables([pq.read_table(f, columns=["problem_id", "tokens"]) for f in files])
    tokens = tokens.filter(pc.is_in(tokens["problem_id"], value_set=wanted))
    return table, int(pc.sum(tokens["tokens"]).as_py() or 0)


def _merge(previous: pa.Table | None, fresh: pa.Table, dataset: str, snapshot_id: str,
           decay: float | None = None) -> pa.Table:
    """Fresh rows over the previous snapshot's (its other data sets are carried too); with a
    decay λ the fresh rows' evidence adds λ × the previous row's (`carry_evidence`)."""
    if previous is None:
        merged = fresh
    else:
        same = pc.equal(previous["dataset"], dataset)
        fresh = carry_evidence(previous.filter(same), fresh, decay)
        merged = pa.concat_tables([carry_forward(previous.filter(same), fresh),
                                   carry_forward(previous.filter(pc.invert(same)), fresh.slice(0, 0))])
    index = merged.schema.get_field_index("snapshot_id")
    merged = merged.set_column(index, "snapshot_id", pa.array([snapshot_id] * merged.num_rows, pa.string()))
    return merged.cast(SNAPSHOT_SCHEMA).sort_by([("dataset", "ascending"), ("problem_id", "ascending")])


def _own_fingerprint(home: Home, lineage_id: str) -> str | None:
    """What `paced refresh --student L` would fingerprint for L's own rollouts (None: it has none)."""
    sets = rollout_sets(home, lineage_id)
    if not sets:
        return None
    chosen = choose_sampling_hash(sets)
    return fingerprint(chosen, input_files(home, [s for s in sets if s.sampling_hash == chosen]))


def stale_stats(table: pa.Table) -> dict:
    ages = np.asarray(table["stale_age"].to_pylist(), dtype=np.int64)
    values, counts = np.unique(ages, return_counts=True)
    return {"max": int(ages.max()) if len(ages) else 0,
            "mean": round(float(ages.mean()), 6) if len(ages) else 0.0,
            "rows_by_age": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}}


def carried_stats(table: pa.Table) -> dict:
    """How much of the estimates is carried: the mean carried share over measured rows, and the
    evidence samples (Σ evidence_n, discounted) against the fresh ones of this refresh."""
    measured = table.filter(pc.greater(table["evidence_n"], 0))
    share = pc.mean(measured["carried_share"]).as_py() if measured.num_rows else None
    return {"mean": None if share is None else round(share, 6),
            "evidence_samples": round(float(pc.sum(table["evidence_n"]).as_py() or 0.0), 6)}


def refresh_lineage(home: Home | str | Path, lineage_id: str, checkpoint_id: str, dataset: str,
                    sampling_hash: str, previous_snapshot_id: str | None, *, problem_ids=None,
                    previous_student_id: str | None = None,
                    step: int | None = None, sampling: dict | None = None, decay: float | None = None) -> str:
    """Write (or find) the snapshot of lineage L measured on `checkpoint_id`; its snapshot id.

    `problem_ids`: the problems just rolled out (None: every problem of the checkpoint's
    rollouts in `dataset`); each must have committed rollouts. `previous_snapshot_id` (of
    `previous_student_id`, default L): the snapshot whose other rows are carried forward
    (None: no carried rows). `step` and `sampling` (the rollout config's record) are written
    into the lineage record. `decay` λ (None: off): carry-over, each fresh row's evidence is
    λ × its previous evidence + its fresh counts (paced/curriculum/carryover.py)."""
    home = home if isinstance(home, Home) else open_home(home, create=False)
    for name, value in (("lineage_id", lineage_id), ("checkpoint_id", checkpoint_id), ("dataset", dataset)):
        validate_name(value, name)
    previous_student_id = previous_student_id or lineage_id
    files = batch_files(home.rollouts_dir(checkpoint_id, sampling_hash, dataset))
    if problem_ids is None:
        problem_ids = pq.read_table(files, columns=["problem_id"])["problem_id"].to_pylist() if files else []
    problem_ids = sorted(set(problem_ids))
    if decay is not None:
        CarryOver(decay=decay)  # validates λ
    key = hashlib.sha256(json.dumps({
        "lineage_id": lineage_id, "checkpoint_id": checkpoint_id, "dataset": dataset,
        "sampling_hash": sampling_hash,
        "previous": [previous_student_id, previous_snapshot_id], "problem_ids": problem_ids,
        "inputs": keyed_inputs(home, files),
        **({"decay": decay} if decay is not None else {}),
    }, sort_keys=True).encode()).hexdigest()
    found, snapshot_id, done = resolve_snapshot(home, lineage_id, key)
    if done:
        return found
    previous = read_previous(home, previous_student_id, previous_snapshot_id)
    fresh, tokens = _fresh_rows(home, files, checkpoint_id, sampling_hash, dataset, problem_ids, snapshot_id)
    table = _merge(previous, fresh, dataset, snapshot_id, decay)
    if not found:
        _write_side(home, lineage_id, snapshot_id, table, {
            "key": key, "snapshot_id": snapshot_id, "student_id": lineage_id, "checkpoint_id": checkpoint_id,
            "step": step, "dataset": dataset, "sampling_hash": sampling_hash,
            "previous_student_id": previous_student_id if previous_snapshot_id else None,
            "previous_snapshot_id": previous_snapshot_id, "rerolled": len(problem_ids),
            "carried": table.num_rows - fresh.num_rows, "samples": int(pc.sum(fresh["n"]).as_py() or 0),
            "tokens": tokens, "stale_age": stale_stats(table), "carry_over_decay": decay,
            "carried_share": carried_stats(table),
        }, sampling)
    write_snapshot(home, lineage_id, table, snapshot_id)
    return snapshot_id


def _write_side(home: Home, lineage_id: str, snapshot_id: str, table: pa.Table, record: dict,
                sampling: dict | None) -> None:
    history = []
    if record["previous_snapshot_id"]:
        previous = read_snapshot_record(home, record["previous_student_id"], record["previous_snapshot_id"])
        history = (previous.history or []) if previous else []
    write_snapshot_record(home, SnapshotRecord(
        snapshot_id=snapshot_id, student_id=lineage_id, sampling_hash=record["sampling_hash"],
        sampling=sampling, fingerprint=_own_fingerprint(home, lineage_id), problems=table.num_rows,
        datasets=sorted(set(table["dataset"].to_pylist())), lineage=record,
        history=[*history, {k: v for k, v in record.items() if k != "key"}]))
