"""Show a student's pass-rate snapshot: counts, mean, shares at 0 and 1, a text histogram.

    paced passrates show --student ID [--snapshot ID] [--dataset NAME] [--json] --home DIR

`--json` prints one JSON object: snapshot_id, student_id, sampling_hash, problems, rollouts,
mean_pass_rate, share_zero, share_one, histogram (10 bins over [0, 1], p = 1.0 in the last),
bin_edges, carried_rows (rows measured on an earlier checkpoint), carried_share (mean share of
each estimate's evidence carried from earlier refreshes: paced/curriculum/carryover.py),
evidence_samples (Σ evidence_n, discounted), and by_dataset (the same figures per data set).
`rollouts` counts the rows' own samples; `pass_rate` is the estimate (evidence_correct/evidence_n).
Each data set's entry also has `by_level` (per difficulty level) and, when its problems name a
`module` in their metadata (as `builtin:mathematics` rows do), `by_module` (per module, then per
level): problems, mean pass rate, and the shares at 0, strictly between 0 and 1 (the frontier),
and at 1.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from paced.curriculum.summary import passrate_summary, text_histogram
from paced.errors import NotFoundError
from paced.store.home import Home, open_home, validate_name
from paced.store.problems import read_problems
from paced.store.snapshots import read_snapshot_rows

GROUP_KEYS = ("problems", "mean_pass_rate", "share_zero", "share_frontier", "share_one")


def _summary(table: pa.Table) -> dict:
    summary = passrate_summary(table["pass_rate"].to_numpy(zero_copy_only=False),
                               table["n"].to_numpy(zero_copy_only=False))
    measured = table.filter(pc.greater(table["n"], 0))
    share = pc.mean(measured["carried_share"]).as_py() if measured.num_rows else None
    return {**summary, "carried_rows": int(pc.sum(pc.greater(measured["stale_age"], 0)).as_py() or 0),
            "carried_share": share, "evidence_samples": float(pc.sum(measured["evidence_n"]).as_py() or 0.0)}


def compute_group_summary(pass_rate: list[float]) -> dict:
    """Problems, mean and the shares at 0, in (0, 1) and at 1 of one group's pass rates."""
    p = np.asarray(pass_rate, dtype=np.float64)
    summary = passrate_summary(p, np.ones(len(p), dtype=np.int64))
    frontier = float(((p > 0) & (p < 1)).mean()) if len(p) else None
    return {k: summary.get(k) for k in GROUP_KEYS} | {"share_frontier": frontier}


def _problem_groups(home: Home, dataset: str) -> dict[str, tuple[str | None, str]]:
    """problem id -> (module or None, level as text; "none" without a difficulty); empty when the
    data set's problems are not in this home."""
    try:
        problems = read_problems(home, dataset)
    except NotFoundError:
        return {}
    out = {}
    for pid, difficulty, meta in zip(problems["id"].to_pylist(), problems["difficulty"].to_pylist(),
                                     problems["metadata"].to_pylist()):
        module = json.loads(meta).get("module") if meta else None
        out[pid] = (module if isinstance(module, str) else None,
                    "none" if difficulty is None else str(difficulty))
    return out


def group_summaries(home: Home, dataset: str, table: pa.Table) -> dict:
    """`by_level` and (when problems name a module) `by_module` of one data set's snapshot rows;
    nothing when its problems are not in this home."""
    groups = _problem_groups(home, dataset)
    if not groups:
        return {}
    by_level, by_module = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for pid, p, n in zip(table["problem_id"].to_pylist(), table["pass_rate"].to_pylist(),
                         table["n"].to_pylist()):
        if n == 0 or pid not in groups:
            continue
        module, level = groups[pid]
        by_level[level].append(p)
        if module is not None:
            by_module[module][level].append(p)
    out = {"by_level": {lv: compute_group_summary(ps) for lv, ps in sorted(by_level.items())}}
    if by_module:
        out["by_module"] = {m: {lv: compute_group_summary(ps) for lv, ps in sorted(levels.items())}
                            for m, levels in sorted(by_module.items())}
    return out


def snapshot_summary(home: Home, student_id: str, snapshot_id: str | None = None,
                     dataset: str | None = None) -> dict:
    """The summary of a snapshot (the newest when None), overall and by data set."""
    validate_name(student_id, "student")
    table, snapshot_id = read_snapshot_rows(home, student_id, snapshot_id, dataset)
    by_dataset = {}
    for name in sorted(set(table["dataset"].to_pylist())):
        part = _summary(table.filter(pc.equal(table["dataset"], name)))
        by_dataset[name] = {k: part[k] for k in ("problems", "rollouts", "mean_pass_rate", "share_zero",
                                                 "share_one", "carried_share", "histogram")}
        by_dataset[name] |= group_summaries(home, name, table.filter(pc.equal(table["dataset"], name)))
    hashes = sorted(set(table["sampling_hash"].to_pylist()))
    return {"snapshot_id": snapshot_id, "student_id": student_id,
            "sampling_hash": hashes[0] if len(hashes) == 1 else hashes,
            **_summary(table), "by_dataset": by_dataset}


def format_summary(summary: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    mean = summary["mean_pass_rate"]
    lines = [
        f"student {summary['student_id']}  snapshot {summary['snapshot_id']}  sampling "
        f"{summary['sampling_hash']}",
        f"problems {summary['problems']}  rollouts {summary['rollouts']}  "
        f"mean pass rate {'n/a' if mean is None else f'{mean:.4f}'}  "
        f"never solved {pct(summary['share_zero'])}  always solved {pct(summary['share_one'])}",
        f"carried from earlier checkpoints: {summary['carried_rows']} rows, "
        f"mean carried share {pct(summary['carried_share'])} (evidence samples "
        f"{summary['evidence_samples']:g})",
    ]
    for name, part in summary["by_dataset"].items():
        m = part["mean_pass_rate"]
        lines.append(f"  {name}: {part['problems']} problems, {part['rollouts']} rollouts, "
                     f"mean {'n/a' if m is None else f'{m:.4f}'}")
        lines += format_groups(part)
    lines.append("pass rate       problems")
    lines.append(text_histogram(summary))
    return "\n".join(lines)


def format_groups(part: dict) -> list[str]:
    """A table of pass rates by module and level (or by level alone)."""
    rows = [(module, level, g) for module, levels in part.get("by_module",
                                                              {}).items() for level, g in levels.items()]
    if not rows:
        rows = [("", level, g) for level, g in part.get("by_level", {}).items()]
    if not rows or (len(rows) == 1 and rows[0][1] == "none"):
        return []
    width = max(len("module"), *(len(m) for m, _, _ in rows))
    lines = [f"    {'module':<{width}}  level  problems    mean   p=0  0<p<1   p=1"]
    for module, level, g in rows:
        lines.append(f"    {module:<{width}}  {level:>5}  {g['problems']:>8}  {g['mean_pass_rate']:.4f}  "
                     f"{100 * g['share_zero']:3.0f}%  {100 * g['share_frontier']:4.0f}%  "
                     f"{100 * g['share_one']:3.0f}%")
    return lines


def add_arguments(parser) -> None:
    from paced.store.home import add_home_argument

    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="summary and histogram of a student's pass-rate snapshot")
    show.add_argument("--student", required=True, help="student id")
    show.add_argument("--snapshot", default=None, help="snapshot id (default: the newest)")
    show.add_argument("--dataset", default=None, help="only this data set's problems")
    show.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_home_argument(show)


def run(args) -> int:
    home = open_home(args.home, create=False)
    summary = snapshot_summary(home, args.student, args.snapshot, args.dataset)
    print(json.dumps(summary) if args.json else format_summary(summary), file=sys.stdout)
    return 0
