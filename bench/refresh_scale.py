"""`paced refresh` at scale: 10⁷ rollout rows in 10⁴ batch files, vs DuckDB reading them alone.

Synthetic rollouts (ROLLOUT_SCHEMA, one student, one sampling config, K = 8 samples per problem,
`--rows-per-file` rows per committed batch file) are written once under `--out` (git-ignored).
Then, each in a fresh process, three times:

- **refresh**: `paced refresh --student S --home H` (a new snapshot each time: the previous
  snapshots are removed first so it never short-cuts on the fingerprint);
- **duckdb read**: DuckDB alone scanning the columns the refresh needs (dataset, problem_id,
  sample_idx, outcome) of the same files, reduced to one row so nothing is materialised.

Reported: median wall seconds and peak resident memory (the child's ru_maxrss), and the ratios.

    .venv/bin/python bench/refresh_scale.py --rows 10000000 --files 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out" / "refresh_scale"
READ_SQL = ("SELECT count(*), count(*) FILTER (WHERE outcome = 'correct'), sum(sample_idx), "
            "count(DISTINCT problem_id), min(dataset) FROM read_parquet(?)")


def generate(home: Path, rows: int, files: int, seed: int = 0) -> Path:
    """Write the synthetic batch files once (a `done.json` marks a complete set); their folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from paced.store.home import open_home
    from paced.store.rollouts import ROLLOUT_SCHEMA

    h = open_home(home)
    folder = h.rollouts_dir("synthetic", "0123456789ab", "pool")
    marker = folder.parent / "done.json"
    if marker.exists() and json.loads(marker.read_text()) == {"rows": rows, "files": files}:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_file = rows // files
    outcomes = np.array(["correct", "wrong", "unparseable"])
    for f in range(files):
        start = f * per_file
        idx = np.arange(start, start + per_file)
        problem = idx // 8
        table = pa.table({
            "problem_id": np.char.add("p", np.char.zfill(problem.astype(str), 9)),
            "dataset": ["pool"] * per_file, "sample_idx": pa.array(idx % 8, pa.int32()),
            "completion": rng.integers(0, 20000, per_file).astype(str),
            "outcome": outcomes[rng.choice(3, per_file, p=[0.5, 0.45, 0.05])],
            "tokens": pa.array(rng.integers(2, 9, per_file), pa.int32()),
            "finish_reason": ["stop"] * per_file,
            "student_id": ["synthetic"] * per_file, "sampling_hash": ["0123456789ab"] * per_file,
            "grader": ["numeric@1"] * per_file,
        }, schema=ROLLOUT_SCHEMA)
        pq.write_table(table, folder / f"batch-{f:08d}.parquet", compression="zstd")
        if f % 1000 == 999:
            print(f"  wrote {f + 1} / {files} files", file=sys.stderr)
    marker.write_text(json.dumps({"rows": rows, "files": files}))
    return folder


def run_child(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:4]} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    home = Path(args.out).resolve() / f"home-{args.rows}-{args.files}"
    t0 = time.perf_counter()
    folder = generate(home, args.rows, args.files)
    print(f"data: {args.rows:,} rows in {args.files:,} files under {folder} "
          f"({sum(f.stat().st_size for f in folder.glob('*.parquet')) / 2**20:.0f} MiB), "
          f"ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    read = [sys.executable, "-c", "import duckdb, sys; print(duckdb.connect().execute(sys.argv[1], "
            "[sys.argv[2]]).fetchall())", READ_SQL, str(folder / "batch-*.parquet")]
    refresh = [sys.executable, "-m", "paced.cli", "refresh", "--student", "synthetic", "--home", str(home)]
    results: dict[str, list[tuple[float, float]]] = {"refresh": [], "duckdb read": []}
    for _ in range(args.repeats):
        shutil.rmtree(home / "snapshots", ignore_errors=True)
        results["refresh"].append(run_child(refresh))
        results["duckdb read"].append(run_child(read))
    summary = {name: {"seconds": statistics.median(r[0] for r in runs), "peak_mib": max(r[1] for r in runs)}
               for name, runs in results.items()}
    ratio = {k: summary["refresh"][k] / summary["duckdb read"][k] for k in ("seconds", "peak_mib")}
    (Path(args.out) / f"refresh_scale-{args.rows}-{args.files}.json").write_text(
        json.dumps({"args": vars(args), "runs": results, "summary": summary, "ratio": ratio}, indent=1))
    print(f"| {args.rows:,} rows, {args.files:,} files | seconds (median of {args.repeats}) | peak RSS MiB |")
    print("|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['seconds']:.2f} | {s['peak_mib']:.0f} |")
    print(f"| ratio | {ratio['seconds']:.2f}× | {ratio['peak_mib']:.2f}× |")


if __name__ == "__main__":
    main()
