"""An epoch's plan: the epoch as first built (segment 0) and, for runs that follow snapshots,
each re-plan of its never-leased shards from a newer snapshot (segments 1, 2, …).

Segment k covers the epoch's shards from its `from_shard` up to the next segment's (the last
one: to its end). A re-plan starts at the first shard never leased, so every shard that was
ever leased keeps its segment and its bytes; the shards after it are the new segment's.

In `weighted-loss` mode a re-plan weighs the problems of the data set that no leased shard of
the epoch holds (so no problem is served twice in an epoch), with the run's scheme and guards,
under a sub-seed of (seed, epoch, segment); its weights are normalised over those problems, as
a manifest's are. In `weighted-sample` mode it draws the epoch's remaining draws (with
replacement, as that mode does) from every problem.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from paced.api.records import Replan, SegmentRecord
from paced.api.shardfiles import EpochFiles, epoch_folder, read_epoch, shard_bytes, shard_jsonl, write_epoch
from paced.curriculum import Manifest, WeightScheme, build_manifest
from paced.errors import NotFoundError, PacedError
from paced.store.home import Home
from paced.store.snapshots import read_snapshot_record, read_snapshot_rows


@dataclass(frozen=True)
class EpochPlan:
    """The segments of one epoch, in order; the epoch's shard k is in the last segment whose
    `from_shard` is at most k."""

    run_id: str
    epoch: int
    segments: tuple[EpochFiles, ...]

    @property
    def shards(self) -> int:
        last = self.segments[-1]
        return last.from_shard + last.shards

    @property
    def items(self) -> int:
        last = self.segments[-1]
        return last.from_shard * last.shard_size + last.items

    @property
    def snapshot_id(self) -> str:
        """The snapshot the newest segment was planned from."""
        return self.segments[-1].snapshot_id

    def locate(self, shard: int) -> tuple[EpochFiles, int]:
        """The segment holding the epoch's shard `shard`, and the shard's index in it."""
        if not 0 <= shard < self.shards:
            raise NotFoundError(f"epoch {self.epoch} of run {self.run_id} has {self.shards} shards; "
                                f"no shard {shard}",
                                detail={"field": "shard", "value": shard})
        files = next(f for f in reversed(self.segments) if f.from_shard <= shard)
        return files, shard - files.from_shard

    def shard_items(self, shard: int) -> int:
        files, local = self.locate(shard)
        return files.shard_items(local)

    def snapshot_for(self, shard: int) -> str:
        return self.locate(shard)[0].snapshot_id

    def jsonl(self, shard: int) -> bytes:
        return shard_jsonl(*self.locate(shard))

    def shard_bytes(self, shard: int, fmt: str) -> bytes:
        files, local = self.locate(shard)
        return shard_bytes(files, local, fmt)

    def problem_ids(self, stop_shard: int) -> pa.Array:
        """The problem ids of the epoch's shards [0, stop_shard)."""
        parts = []
        for k, files in enumerate(self.segments):
            end = self.segments[k + 1].from_shard if k + 1 < len(self.segments) else self.shards
            count = min(end, stop_shard) - files.from_shard
            if count > 0:
                ids = pq.read_table(files.folder / "manifest.parquet", columns=["problem_id"])["problem_id"]
                parts.append(ids.slice(0, count * files.shard_size).combine_chunks())
        return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def load_plan(home: Home, run_id: str, epoch: int, starts: list[int]) -> EpochPlan:
    """The plan of an epoch whose segments start at `starts` (as the state database records them)."""
    segments = tuple(read_epoch(epoch_folder(home, run_id, epoch, k)) for k in range(len(starts)))
    found = [files.from_shard for files in segments]
    if found != list(starts):
        raise PacedError(f"the segments of epoch {epoch} of {run_id} start at {found} on disk, {starts} in "
                         "the state database", code="internal")
    return EpochPlan(run_id, epoch, segments)


# ---------------------------------------------------------------- building a segment


def replan_seed(seed: int, epoch: int, segment: int) -> int:
    """A seed of its own for each re-plan, deterministic in (seed, epoch, segment)."""
    return int(np.random.SeedSequence([seed, epoch, segment]).generate_state(1, np.uint64)[0] >> 1)


def remainder_manifest(table: pa.Table, served: pa.Array, scheme: WeightScheme, seed: int, epoch: int,
                       segment: int, mode: str, draws: int) -> Manifest:
    """The manifest of a re-plan (pure): `table` (a snapshot's rows of the run's data set) less
    the `served` problems in weighted-loss mode; `draws` more draws in weighted-sample mode."""
    if mode == "weighted-loss":
        table = table.filter(pc.invert(pc.is_in(table["problem_id"], value_set=served)))
    return build_manifest(table, scheme, replan_seed(seed, epoch, segment), epoch, mode,
                          max(0, draws) if mode == "weighted-sample" else None)


def measured_by(home: Home, student_id: str, snapshot_id: str,
                table: pa.Table) -> tuple[tuple[str, ...], str | None]:
    """The checkpoints whose rollouts measured `table` (its distinct `student_id`s), and the
    lineage's newest checkpoint if a lineage refresh wrote the snapshot (its side file)."""
    record = read_snapshot_record(home, student_id, snapshot_id)
    checkpoint = (record.lineage or {}).get("checkpoint_id") if record else None
    return tuple(sorted(pc.unique(table["student_id"]).to_pylist())), checkpoint


def build_segment(home: Home, config, plan: EpochPlan, replan: Replan) -> SegmentRecord:
    """Write segment `replan.segment` of the epoch (files only; the caller records it). `config`
    is the run's `RunConfig`. A folder left by an earlier attempt that was never recorded is
    replaced."""
    if len(plan.segments) != replan.segment:
        raise PacedError(f"re-plan {replan} does not follow the {len(plan.segments)} segments on record",
                         code="internal")
    folder = epoch_folder(home, replan.run_id, replan.epoch, replan.segment)
    if folder.exists():
        shutil.rmtree(folder)
    table, sid = read_snapshot_rows(home, config.student_id, replan.snapshot_id, config.dataset)
    draws = plan.segments[0].items - replan.from_shard * config.shard_size
    manifest = remainder_manifest(table, plan.problem_ids(replan.from_shard), config.weights, config.seed,
                                  replan.epoch, replan.segment, config.mode, draws)
    student_ids, checkpoint_id = measured_by(home, config.student_id, sid, table)
    files = write_epoch(home, replan.run_id, manifest, sid, config.dataset, config.shard_size,
                        config.teacher_id, segment=replan.segment, from_shard=replan.from_shard,
                        extra={"student_ids": list(student_ids), "checkpoint_id": checkpoint_id})
    ess = files.effective_sample_size
    return SegmentRecord(replan, files.items, files.shards, ess, student_ids, checkpoint_id)


def remove_segment(home: Home, replan: Replan) -> None:
    """Remove the files of a re-plan that was not recorded."""
    shutil.rmtree(epoch_folder(home, replan.run_id, replan.epoch, replan.segment), ignore_errors=True)
