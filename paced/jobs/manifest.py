"""Build a weighted manifest from a student's pass-rate snapshot and write it as Parquet.

`paced manifest build --student S --dataset D --scheme paced --seed 0 --out DIR` writes
DIR/manifest.parquet (epoch order, weights), DIR/shard-00000.parquet … (prompt–completion rows
any trainer can read) and DIR/manifest.json (inputs, snapshot id, counts, effective sample size
(Σw)²/Σw², sha256 of every shard file). The folder is built under a temporary name and renamed
into place; rebuilding with the same inputs is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow.compute as pc

from paced import __version__
from paced.curriculum import (
    MODES,
    SCHEMES,
    Manifest,
    WeightScheme,
    build_manifest,
    shard_bounds,
    starvation_warning,
)
from paced.errors import InputError
from paced.store.files import DIR_MODE, make_dirs, read_json, write_json_atomic, write_parquet_atomic
from paced.store.home import Home, open_home
from paced.store.shards import assemble_rows
from paced.store.snapshots import read_snapshot_rows


def parse_prior(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError as err:
        raise InputError(f"--prior must be two numbers 'a,b', got {text!r}") from err
    return a, b


def snapshot_manifest(home: Home, student_id: str, dataset: str, scheme: WeightScheme, seed: int,
                      epoch: int = 0, mode: str = "weighted-loss", snapshot_id: str | None = None,
                      num_samples: int | None = None) -> tuple[Manifest, str]:
    """The manifest of one data set under a student's snapshot (newest when None)."""
    table, sid = read_snapshot_rows(home, student_id, snapshot_id, dataset)
    return build_manifest(table, scheme, seed, epoch, mode, num_samples), sid


def manifest_record(student_id: str, dataset: str, snapshot_id: str, scheme: WeightScheme, mode: str, seed: int,
                    epoch: int = 0) -> dict:
    """What built a manifest: the `inputs` of its manifest.json (a refresh rebuilds from them)."""
    return {"student_id": student_id, "dataset": dataset, "snapshot_id": snapshot_id, "scheme": scheme.name,
            "alpha": scheme.alpha, "beta": scheme.beta, "prior": list(scheme.prior), "weight_floor": scheme.floor,
            "uniform_mix": scheme.mix, "mode": mode, "seed": seed, "epoch": epoch}


def write_manifest_dir(home: Home, manifest: Manifest, inputs: dict, out: Path, shard_size: int) -> dict:
    """Write manifest.parquet, the shards and manifest.json into `out` (atomically, as a folder)."""
    bounds = shard_bounds(manifest.num_items, shard_size)
    make_dirs(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}.", dir=out.parent))
    try:
        tmp.chmod(DIR_MODE)  # mkdtemp makes it 0700; the manifest is for a trainer of the same group
        write_parquet_atomic(tmp / "manifest.parquet", manifest.items)
        rows = assemble_rows(home, manifest.items, inputs["dataset"], manifest.scheme.guard)
        digests = {}
        for k, (start, stop) in enumerate(bounds):
            name = f"shard-{k:05d}.parquet"
            write_parquet_atomic(tmp / name, rows.slice(start, stop - start))
            digests[name] = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
        summary = {
            "inputs": inputs, "paced_version": __version__, "items": manifest.num_items,
            "measured": manifest.measured, "unmeasured": manifest.unmeasured,
            "zero_weight": manifest.zero_weight, "with_reference": int(pc.sum(pc.is_valid(rows["completion"])).as_py() or 0),
            "effective_sample_size": round(manifest.effective_sample_size, 6), "shards": len(bounds),
            "shard_size": shard_size, "guard": manifest.scheme.guard, "sha256": digests,
        }
        write_json_atomic(tmp / "manifest.json", summary)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def add_arguments(parser) -> None:
    from paced.store.home import add_home_argument

    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = sub.add_parser("build", help="build a manifest and its shards")
    build.add_argument("--student", required=True, help="student id whose pass rates weight the problems")
    build.add_argument("--dataset", required=True, help="data set to draw problems from")
    build.add_argument("--out", required=True, help="folder to write (must not exist, or hold the same build)")
    build.add_argument("--scheme", choices=sorted(SCHEMES), default="paced")
    build.add_argument("--alpha", type=float, default=1.0)
    build.add_argument("--beta", type=float, default=1.0)
    build.add_argument("--prior", type=parse_prior, default=(1.0, 1.0), help="Beta prior 'a,b' (paced-posterior)")
    build.add_argument("--weight-floor", type=float, default=0.0, help="every measured problem gets >= this")
    build.add_argument("--uniform-mix", type=float, default=0.0, help="w' = (1-λ)·w/mean(w) + λ")
    build.add_argument("--mode", choices=MODES, default="weighted-loss")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--epoch", type=int, default=0)
    build.add_argument("--shard-size", type=int, default=256)
    build.add_argument("--snapshot", default=None, help="snapshot id (default: the newest)")
    add_home_argument(build)


def run(args) -> int:
    home = open_home(args.home, create=False)
    scheme = WeightScheme(args.scheme, args.alpha, args.beta, args.prior, args.weight_floor, args.uniform_mix)
    manifest, snapshot_id = snapshot_manifest(home, args.student, args.dataset, scheme, args.seed,
                                              args.epoch, args.mode, args.snapshot)
    inputs = manifest_record(args.student, args.dataset, snapshot_id, scheme, args.mode, args.seed, args.epoch)
    out = Path(args.out)
    if out.exists():
        previous = read_json(out / "manifest.json") if (out / "manifest.json").exists() else None
        if previous and previous["inputs"] == inputs and previous["shard_size"] == args.shard_size:
            print(json.dumps({**previous, "out": str(out), "already_built": True}))
            return 0
        raise InputError(f"--out {out} already exists with other contents; choose a new folder")
    summary = write_manifest_dir(home, manifest, inputs, out, args.shard_size)
    warning = starvation_warning(manifest)
    if warning:
        print(f"paced manifest: warning: {warning}", file=sys.stderr)
    print(json.dumps({**{k: v for k, v in summary.items() if k != "sha256"}, "out": str(out)}), file=sys.stdout)
    return 0
