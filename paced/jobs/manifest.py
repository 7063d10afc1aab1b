"""Build a weighted manifest from a student's pass-rate snapshot and write it as Parquet.

`paced manifest build --student S --dataset D --scheme paced --seed 0 --out DIR` writes
DIR/manifest.parquet (epoch order, weights), DIR/shard-00000.parquet … (prompt–completion rows
any trainer can read), DIR/manifest.json (inputs, snapshot id, counts, effective sample size
(Σw)²/Σw², sha256 of every shard file) and DIR/README.md (a dataset card whose `configs` block
names the shards: `datasets.load_dataset(DIR)` loads them). In weighted-loss mode rows without
a teacher reference are left out and counted (`--no-require-reference` keeps them). The folder is built under a temporary name and renamed
into place; rebuilding with the same inputs is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
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
from paced.curriculum.weights import effective_sample_size
from paced.errors import InputError
from paced.store.card import conversational_rows, dataset_card
from paced.store.files import (
    DIR_MODE,
    make_dirs,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from paced.store.home import Home, open_home
from paced.store.shards import assemble_rows
from paced.store.snapshots import measured_chat_template, read_snapshot_rows


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


@dataclass(frozen=True)
class ShardForm:
    """How a manifest folder's shard rows are written: `require_reference` leaves out (and
    counts) rows without a teacher reference; `form` "text" or "conversational" (TRL's
    prompt–completion with message lists); `chat_template` whether the snapshot's rollouts
    rendered prompts with the chat template (recorded, None when unknown)."""

    require_reference: bool = False
    form: str = "text"
    chat_template: bool | None = None

    def __post_init__(self):
        if self.form not in FORMS:
            raise InputError(f"--form must be one of {FORMS}, got {self.form!r}")


FORMS = ("text", "conversational")


def write_manifest_dir(home: Home, manifest: Manifest, inputs: dict, out: Path, shard_size: int,
                       form: ShardForm = ShardForm()) -> dict:
    """Write manifest.parquet, the shards, manifest.json and README.md (a dataset card) into
    `out` (atomically, as a folder)."""
    make_dirs(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}.", dir=out.parent))
    try:
        tmp.chmod(DIR_MODE)  # mkdtemp makes it 0700; the manifest is for a trainer of the same group
        items = manifest.items
        rows = assemble_rows(home, items, inputs["dataset"], manifest.scheme.guard)
        with_reference = pc.is_valid(rows["completion"])
        left_out = 0
        if form.require_reference:
            left_out = rows.num_rows - int(pc.sum(with_reference).as_py() or 0)
            rows = rows.filter(with_reference)
            items = items.filter(pc.is_in(items["problem_id"], value_set=rows["problem_id"]))
        write_parquet_atomic(tmp / "manifest.parquet", items)
        if form.form == "conversational":
            rows = conversational_rows(rows)
        bounds = shard_bounds(rows.num_rows, shard_size)
        digests = {}
        for k, (start, stop) in enumerate(bounds):
            name = f"shard-{k:05d}.parquet"
            write_parquet_atomic(tmp / name, rows.slice(start, stop - start))
            digests[name] = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
        weights = rows["weight"].to_numpy(zero_copy_only=False)
        summary = {
            "inputs": inputs, "paced_version": __version__, "items": rows.num_rows,
            "measured": manifest.measured, "unmeasured": manifest.unmeasured,
            "zero_weight": manifest.zero_weight,
            "with_reference": int(pc.sum(pc.is_valid(rows["completion"])).as_py() or 0),
            "require_reference": form.require_reference, "left_out_without_reference": left_out,
            "form": form.form, "measured_with_chat_template": form.chat_template,
            "effective_sample_size": round(effective_sample_size(weights) if form.require_reference
                                           else manifest.effective_sample_size, 6), "shards": len(bounds),
            "shard_size": shard_size, "guard": manifest.scheme.guard, "sha256": digests,
        }
        write_json_atomic(tmp / "manifest.json", summary)
        write_bytes_atomic(tmp / "README.md", dataset_card(summary).encode())
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
    build.add_argument("--require-reference", action=argparse.BooleanOptionalAction, default=None,
                       help="leave out (and count) rows without a teacher reference: off-policy trainers "
                       "(TRL's SFTTrainer) need a completion on every row. Default: on in weighted-loss mode; "
                       "--no-require-reference keeps them (on-policy training needs only prompts)")
    build.add_argument("--form", choices=FORMS, default="text",
                       help="text: prompt and completion strings; conversational: each a list of "
                       "{role, content} turns (TRL applies the model's chat template)")
    add_home_argument(build)


def run(args) -> int:
    home = open_home(args.home, create=False)
    scheme = WeightScheme(args.scheme, args.alpha, args.beta, args.prior, args.weight_floor, args.uniform_mix)
    manifest, snapshot_id = snapshot_manifest(home, args.student, args.dataset, scheme, args.seed,
                                              args.epoch, args.mode, args.snapshot)
    inputs = manifest_record(args.student, args.dataset, snapshot_id, scheme, args.mode, args.seed, args.epoch)
    require = args.mode == "weighted-loss" if args.require_reference is None else args.require_reference
    form = ShardForm(require, args.form, measured_chat_template(home, args.student, snapshot_id))
    out = Path(args.out)
    if out.exists():
        previous = read_json(out / "manifest.json") if (out / "manifest.json").exists() else None
        same = previous and previous["inputs"] == inputs and previous["shard_size"] == args.shard_size \
            and previous.get("require_reference", False) == require and previous.get("form", "text") == args.form
        if same:
            print(json.dumps({**previous, "out": str(out), "already_built": True}))
            return 0
        raise InputError(f"--out {out} already exists with other contents; choose a new folder")
    summary = write_manifest_dir(home, manifest, inputs, out, args.shard_size, form)
    warning = starvation_warning(manifest)
    if warning:
        print(f"paced manifest: warning: {warning}", file=sys.stderr)
    if summary["left_out_without_reference"]:
        print(f"paced manifest: left out {summary['left_out_without_reference']} of "
              f"{summary['items'] + summary['left_out_without_reference']} rows without a teacher reference "
              "(`paced teacher` adds references; --no-require-reference keeps the rows, for on-policy training)",
              file=sys.stderr)
    if require and summary["items"] == 0:
        raise InputError(f"no row of {args.dataset} with a weight > 0 has a teacher reference: run `paced teacher` "
                         "first, or pass --no-require-reference (on-policy training needs only prompts)")
    print(json.dumps({**{k: v for k, v in summary.items() if k != "sha256"}, "out": str(out)}), file=sys.stdout)
    return 0
