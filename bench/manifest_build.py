"""Manifest build at scale: ours vs plain pandas vs DuckDB's own Parquet read+write.

10M synthetic problems (pass counts in Parquet) → weighted `weighted-loss` manifest Parquet.
Each variant runs in a fresh subprocess, so its peak RSS (ru_maxrss, interpreter and imports
included) is its own. Prints one table, side by side, with ratios against ours.

    .venv/bin/python bench/manifest_build.py            # 10M problems
    .venv/bin/python bench/manifest_build.py --n 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def make_input(n: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = OUT / f"passcounts-{n}.parquet"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    k = 8
    # a spread like a real student: ~20% never, ~60% partly, ~20% always solved
    p = rng.beta(0.6, 0.6, size=n)
    correct = rng.binomial(k, p)
    ids = pa.array([f"p{i:010d}" for i in rng.permutation(n)])
    pq.write_table(pa.table({"problem_id": ids, "correct": correct, "n": np.full(n, k)}), path)
    return path


def run_ours(src: Path, dst: Path) -> dict:
    import pyarrow.parquet as pq

    from paced.curriculum import WeightScheme, build_manifest

    table = pq.read_table(src)
    manifest = build_manifest(table, WeightScheme(name="paced"), seed=0, epoch=0)
    pq.write_table(manifest.items, dst, compression="zstd")
    return {"items": manifest.num_items}


def run_pandas(src: Path, dst: Path) -> dict:
    import numpy as np
    import pandas as pd

    df = pd.read_parquet(src).sort_values("problem_id", kind="stable")
    p = df["correct"] / df["n"]
    df["weight"] = p * (1 - p)
    df["pass_rate"] = p
    df = df[df["weight"] > 0]
    df = df.sample(frac=1.0, random_state=np.random.RandomState(0)).reset_index(drop=True)
    df["weight"] = df["weight"] / df["weight"].mean()
    df["position"] = np.arange(len(df))
    df[["position", "problem_id", "weight", "pass_rate", "n"]].to_parquet(dst, compression="zstd")
    return {"items": len(df)}


def run_duckdb(src: Path, dst: Path) -> dict:
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute("COPY (SELECT * FROM read_parquet($src)) TO $dst (FORMAT parquet, COMPRESSION zstd)",
                {"src": str(src), "dst": str(dst)})
    return {"items": con.execute("SELECT count(*) FROM read_parquet($dst)", {"dst": str(dst)}).fetchone()[0]}


VARIANTS = {"paced": run_ours, "pandas": run_pandas, "duckdb-copy": run_duckdb}


def child(variant: str, src: Path) -> None:
    dst = OUT / f"manifest-{variant}.parquet"
    start = time.perf_counter()
    info = VARIANTS[variant](src, dst)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "seconds": seconds, "peak_mib": peak_mib, **info}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args.variant, Path(args.src))
    src = make_input(args.n)
    results = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--src", str(src)],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    ours = results[0]
    print(f"manifest build, {args.n:,} problems (K=8), one run")
    print(f"{'variant':<12} {'items':>11} {'seconds':>9} {'peak MiB':>9} {'time/ours':>10} {'mem/ours':>9}")
    for r in results:
        print(f"{r['variant']:<12} {r['items']:>11,} {r['seconds']:>9.2f} {r['peak_mib']:>9.0f} "
              f"{r['seconds'] / ours['seconds']:>10.2f} {r['peak_mib'] / ours['peak_mib']:>9.2f}")


if __name__ == "__main__":
    main()
