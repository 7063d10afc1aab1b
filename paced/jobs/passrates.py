"""Show a student's pass-rate snapshot: counts, mean, shares at 0 and 1, a text histogram.

    paced passrates show --student ID [--snapshot ID] [--dataset NAME] [--json] --home DIR

`--json` prints one JSON object: snapshot_id, student_id, sampling_hash, problems, rollouts,
mean_pass_rate, share_zero, share_one, histogram (10 bins over [0, 1], p = 1.0 in the last),
bin_edges, and by_dataset (the same figures per data set).
"""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.compute as pc

from paced.curriculum.summary import passrate_summary, text_histogram
from paced.store.home import Home, open_home, validate_name
from paced.store.snapshots import read_snapshot_rows


def _summary(table: pa.Table) -> dict:
    return passrate_summary(table["pass_rate"].to_numpy(zero_copy_only=False),
                            table["n"].to_numpy(zero_copy_only=False))


def snapshot_summary(home: Home, student_id: str, snapshot_id: str | None = None,
                     dataset: str | None = None) -> dict:
    """The summary of a snapshot (the newest when None), overall and by data set."""
    validate_name(student_id, "student")
    table, snapshot_id = read_snapshot_rows(home, student_id, snapshot_id, dataset)
    by_dataset = {}
    for name in sorted(set(table["dataset"].to_pylist())):
        part = _summary(table.filter(pc.equal(table["dataset"], name)))
        by_dataset[name] = {k: part[k] for k in ("problems", "rollouts", "mean_pass_rate", "share_zero",
                                                 "share_one", "histogram")}
    hashes = sorted(set(table["sampling_hash"].to_pylist()))
    return {"snapshot_id": snapshot_id, "student_id": student_id,
            "sampling_hash": hashes[0] if len(hashes) == 1 else hashes,
            **_summary(table), "by_dataset": by_dataset}


def format_summary(summary: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    mean = summary["mean_pass_rate"]
    lines = [
        f"student {summary['student_id']}  snapshot {summary['snapshot_id']}  sampling {summary['sampling_hash']}",
        f"problems {summary['problems']}  rollouts {summary['rollouts']}  "
        f"mean pass rate {'n/a' if mean is None else f'{mean:.4f}'}  "
        f"never solved {pct(summary['share_zero'])}  always solved {pct(summary['share_one'])}",
    ]
    for name, part in summary["by_dataset"].items():
        m = part["mean_pass_rate"]
        lines.append(f"  {name}: {part['problems']} problems, {part['rollouts']} rollouts, "
                     f"mean {'n/a' if m is None else f'{m:.4f}'}")
    lines.append("pass rate       problems")
    lines.append(text_histogram(summary))
    return "\n".join(lines)


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
