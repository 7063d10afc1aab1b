"""Aggregate each student's committed rollouts into a new pass-rate snapshot (the cron job).

    paced refresh [--student ID] [--sampling-hash H] --home DIR

One snapshot per student, across all its data sets, from the rollouts of ONE sampling config:
`--sampling-hash` if given, else the config with the most committed rollouts (ties: the
smallest hash), since pass rates measured under different sampling do not mix. DuckDB reads
the batch files (`paced/sql/passrates.sql`); the snapshot is written with `write_snapshot`
(temporary name, then rename), so a reader sees the old snapshot or the new one, never half;
older snapshots are never touched.

Idempotent: before the Parquet file, `snapshots/{student}/{snapshot_id}.json` records the
inputs (batch files with sizes) and their fingerprint. When the newest snapshot's fingerprint
equals the current inputs', nothing is written, unless its Parquet file is damaged (truncated,
corrupt): then it is rebuilt from the same rollouts under the same id (`repaired: true`).
Refreshes of one student take the student's snapshot lock in turn (`snapshot_lock`), so two at
once never write the same rows under two ids. Exit 0; stdout: one JSON line per student. A
damaged rollout batch or side file is named in one line on stderr, exit 1.

Cron (every 10 minutes):
    */10 * * * *  PACED_HOME=/data/paced /opt/paced/.venv/bin/paced refresh >> /var/log/paced-refresh.log 2>&1
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from paced.errors import NotFoundError
from paced.store.files import damaged, parquet_problem
from paced.store.home import Home, open_home, validate_name
from paced.store.rollouts import (
    BATCH_HINT,
    RolloutSet,
    list_rollout_students,
    read_sampling_config,
    rollout_sets,
)
from paced.store.snapshots import (
    SnapshotRecord,
    list_snapshots,
    new_snapshot_id,
    read_snapshot_record,
    snapshot_lock,
    write_snapshot,
    write_snapshot_record,
)
from paced.store.sql import connect, query_files, statement


def choose_sampling_hash(sets: list[RolloutSet], sampling_hash: str | None = None) -> str:
    """The requested hash (must exist), else the one with the most rollouts (ties: smallest)."""
    hashes = {s.sampling_hash for s in sets}
    if sampling_hash is None and len(hashes) == 1:
        return hashes.pop()  # nothing to choose: no need to read every file's footer
    totals: dict[str, int] = {}
    for s in sets:
        totals[s.sampling_hash] = totals.get(s.sampling_hash, 0) + s.rows
    if sampling_hash is not None:
        if sampling_hash not in totals:
            raise NotFoundError(f"student {sets[0].student_id!r} has no rollouts with sampling hash "
                                f"{sampling_hash!r}; it has {sorted(totals)}",
                                detail={"field": "sampling_hash", "value": sampling_hash})
        return sampling_hash
    return min(totals, key=lambda h: (-totals[h], h))


def input_files(home: Home, sets: list[RolloutSet]) -> list[dict]:
    """The snapshot's inputs: each batch file (relative to the home) with its size."""
    return [{"path": str(f.relative_to(home.root)), "bytes": f.stat().st_size} for s in sets for f in s.files]


def fingerprint(sampling_hash: str, inputs: list[dict]) -> str:
    text = json.dumps({"sampling_hash": sampling_hash, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def newest_side(home: Home, student_id: str) -> SnapshotRecord | None:
    """The record beside the student's newest snapshot (its `fingerprint`…), if any."""
    ids = list_snapshots(home, student_id)
    return read_snapshot_record(home, student_id, ids[-1]) if ids else None


def newest_fingerprint(home: Home, student_id: str) -> str | None:
    """The fingerprint recorded beside the student's newest snapshot, if any."""
    side = newest_side(home, student_id)
    return side.fingerprint if side else None


def _aggregate(home: Home, student_id: str, chosen: str, inputs: list[dict], snapshot_id: str, con=None):
    files = [str(home.root / i["path"]) for i in inputs]
    params = {"files": files, "student_id": student_id, "sampling_hash": chosen, "snapshot_id": snapshot_id}
    return aggregate_passrates(con or connect(), params)


def _repair(home: Home, student_id: str, side: SnapshotRecord, chosen: str, inputs: list[dict],
            con=None) -> bool:
    """Rebuild the newest snapshot from its own inputs if its Parquet file is damaged; False if
    it reads. A lineage snapshot (rows carried from earlier checkpoints) cannot be rebuilt here."""
    sid = side.snapshot_id
    path = home.snapshots_dir(student_id) / f"{sid}.parquet"
    reason = parquet_problem(path)
    if reason is None:
        return False
    if side.lineage is not None:
        raise damaged(path, reason, "it was written by a training refresh and cannot be rebuilt from "
                                    "rollouts alone: move it aside and rerun that refresh")
    print(f"paced refresh: {path} {reason}; rebuilding it from its rollouts", file=sys.stderr)
    write_snapshot(home, student_id, _aggregate(home, student_id, chosen, inputs, sid, con), sid, repair=True)
    return True


def aggregate_passrates(con, params: dict) -> pa.Table:
    """`passrates.aggregate`'s rows: by one hash aggregate when no sample was committed twice
    (checked exactly, per problem, for sample indices < 64), else by the deduplicating query. A
    batch file DuckDB cannot read is named (`DamagedError`)."""
    files = params["files"]
    table = query_files(con, statement("passrates.aggregate_fast"), params, files, BATCH_HINT)
    exact = pc.all(pc.equal(table["rows"], table["n"])).as_py() is not False
    if exact and (pc.max(table["top"]).as_py() or 0) < 64:
        return table.drop_columns(["rows", "top"])
    return query_files(con, statement("passrates.aggregate"), params, files, BATCH_HINT)


def refresh_student(home: Home, student_id: str, sampling_hash: str | None = None, con=None) -> dict:
    """Write a new snapshot of `student_id` unless the newest one already covers its rollouts
    (then repair it if it is damaged). Holds the student's snapshot lock throughout."""
    validate_name(student_id, "student_id")
    if not rollout_sets(home, student_id):  # before the lock: no snapshots folder for a typo
        raise NotFoundError(f"student {student_id!r} has no committed rollouts in {home.root}; "
                            "run `paced rollout` first", detail={"field": "student", "value": student_id})
    with snapshot_lock(home, student_id):
        return _refresh_locked(home, student_id, sampling_hash, con)


def _refresh_locked(home: Home, student_id: str, sampling_hash: str | None, con=None) -> dict:
    sets = rollout_sets(home, student_id)
    chosen = choose_sampling_hash(sets, sampling_hash)
    sets = [s for s in sets if s.sampling_hash == chosen]
    inputs = input_files(home, sets)
    key = fingerprint(chosen, inputs)
    base = {"student_id": student_id, "sampling_hash": chosen}
    side = newest_side(home, student_id)
    if side is not None and side.fingerprint == key:
        repaired = _repair(home, student_id, side, chosen, inputs, con)
        return {**base, "snapshot_id": side.snapshot_id, "written": repaired, "repaired": repaired}
    snapshot_id = new_snapshot_id(key)
    table = _aggregate(home, student_id, chosen, inputs, snapshot_id, con)
    sampling = read_sampling_config(home.rollouts_dir(student_id, chosen, sets[0].dataset))
    write_snapshot_record(home, SnapshotRecord(
        snapshot_id=snapshot_id, student_id=student_id, sampling_hash=chosen, sampling=sampling,
        fingerprint=key, inputs=inputs, problems=table.num_rows, datasets=sorted({s.dataset for s in sets})))
    write_snapshot(home, student_id, table, snapshot_id)
    return {**base, "snapshot_id": snapshot_id, "written": True, "problems": table.num_rows,
            "rollouts": sum(table["n"].to_pylist()), "batch_files": len(inputs)}


def refresh(home: Home, student_id: str | None = None, sampling_hash: str | None = None) -> list[dict]:
    """Refresh one student, or every student with rollouts. One result dict per student."""
    if sampling_hash is not None:
        validate_name(sampling_hash, "sampling_hash")
    students = [student_id] if student_id else list_rollout_students(home)
    con = connect()
    results = []
    for student in students:
        if student_id is None:  # every student: skip those without (matching) rollouts
            hashes = {s.sampling_hash for s in rollout_sets(home, student)}
            if not hashes or (sampling_hash is not None and sampling_hash not in hashes):
                continue
        results.append(refresh_student(home, student, sampling_hash, con))
    return results


def add_arguments(parser) -> None:
    from paced.store.home import add_home_argument

    parser.add_argument("--student", default=None, help="refresh only this student (default: every student)")
    parser.add_argument("--sampling-hash", default=None,
                        help="use the rollouts of this sampling config (default: the one with the most "
                             "rollouts)")
    add_home_argument(parser)


def run(args) -> int:
    start = time.perf_counter()
    home = open_home(args.home, create=False)
    results = refresh(home, args.student, args.sampling_hash)
    for result in results:
        print(json.dumps({**result, "seconds": round(time.perf_counter() - start, 3)}), file=sys.stdout)
    if not results:
        print(f"paced refresh: no rollouts under {Path(home.root) / 'rollouts'}; nothing to do",
              file=sys.stderr)
    return 0
