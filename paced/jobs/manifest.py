"""Build a weighted manifest from a student's pass-rate snapshot and write it as Parquet.

`paced manifest build --student S --dataset D --scheme paced --seed 0 --out DIR` writes
DIR/manifest.parquet (epoch order, weights), DIR/shard-00000.parquet … (prompt–completion rows
any trainer can read), DIR/manifest.json (inputs, snapshot id, counts, effective sample size
(Σw)²/Σw², sha256 of every shard file) and DIR/README.md (a dataset card whose `configs` block
names the shards: `datasets.load_dataset(DIR)` loads them). In weighted-loss mode rows without
a teacher reference are left out and counted (`--no-require-reference` keeps them). The folder is
built under a temporary name and renamed into place; rebuilding with the same inputs is a no-op.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
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
from paced.curriculum.weights import JSON_KEYS, effective_sample_size
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

FORMAT_VERSION = 1  # of manifest.json's `inputs`; a file without the key is this layout too


def parse_prior(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError as err:
        raise InputError(f"--prior must be two numbers 'a,b', got {text!r}") from err
    return a, b


SCHEME_HELP = {  # JSON key -> (flag, help)
    "scheme": ("--scheme", "weighting scheme"),
    "alpha": ("--alpha", "exponent α of w = p^α (1−p)^β"),
    "beta": ("--beta", "exponent β of w = p^α (1−p)^β"),
    "prior": ("--prior", "Beta prior 'a,b' of paced-posterior"),
    "weight_floor": ("--weight-floor", "guard: every measured problem weighs at least ε"),
    "uniform_mix": ("--uniform-mix", "guard: w' = (1−λ)·w/mean(w) + λ"),
}


def add_scheme_arguments(parser, *, defaults: bool = True, note: str = "") -> None:
    """--scheme --alpha --beta --prior --weight-floor --uniform-mix, one per `WeightScheme` field.
    `defaults` False: each defaults to None (someone else's value, e.g. a manifest's), and
    `note` says whose."""
    values = WeightScheme().to_json() if defaults else dict.fromkeys(JSON_KEYS)
    kinds = {"scheme": {"choices": sorted(SCHEMES)}, "prior": {"type": parse_prior, "metavar": "A,B"}}
    for key, (flag, text) in SCHEME_HELP.items():
        default = tuple(values[key]) if isinstance(values[key], list) else values[key]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text += f" ({note})" if note else f" (default: {shown})"
        parser.add_argument(flag, dest=key, default=default, help=text, **kinds.get(key, {"type": float}))


def scheme_settings(args) -> dict:
    """The weight settings `add_scheme_arguments` parsed and the user gave (not None), by JSON key."""
    return {key: list(v) if isinstance(v, tuple) else v for key in JSON_KEYS
            if (v := getattr(args, key, None)) is not None}


@dataclass(frozen=True, kw_only=True)
class ManifestInputs:
    """What built a manifest: the `inputs` of its manifest.json (a re-measurement rebuilds from them)."""

    student_id: str
    dataset: str
    snapshot_id: str | None = None  # None: the student's newest (resolved by `snapshot_manifest`)
    weights: WeightScheme = field(default_factory=WeightScheme)
    mode: str = "weighted-loss"
    seed: int = 0
    epoch: int = 0
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return {"student_id": self.student_id, "dataset": self.dataset, "snapshot_id": self.snapshot_id,
                **self.weights.to_json(), "mode": self.mode, "seed": self.seed, "epoch": self.epoch,
                "format_version": self.format_version}

    @classmethod
    def from_json(cls, data: dict, where: str = "manifest.json") -> ManifestInputs:
        """Also the inputs written before `format_version` (and the guards) existed."""
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise InputError(f"{where}: inputs format {version} is newer than this paced reads "
                             f"({FORMAT_VERSION}): upgrade paced")
        missing = [k for k in ("student_id", "dataset", "snapshot_id") if k not in data]
        if missing:
            raise InputError(f"{where}: inputs lack {', '.join(missing)}; rebuild it with `paced manifest "
                             "build`")
        return cls(student_id=data["student_id"], dataset=data["dataset"], snapshot_id=data["snapshot_id"],
                   weights=WeightScheme.from_json(data), mode=data.get("mode", "weighted-loss"),
                   seed=int(data.get("seed", 0)), epoch=int(data.get("epoch", 0)))


def snapshot_manifest(home: Home, inputs: ManifestInputs,
                      num_samples: int | None = None) -> tuple[Manifest, ManifestInputs]:
    """The manifest of `inputs` under its snapshot (None: the student's newest), and the inputs
    with that snapshot's id."""
    table, sid = read_snapshot_rows(home, inputs.student_id, inputs.snapshot_id, inputs.dataset)
    manifest = build_manifest(table, inputs.weights, inputs.seed, inputs.epoch, inputs.mode, num_samples)
    return manifest, dataclasses.replace(inputs, snapshot_id=sid)


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


def write_manifest_dir(home: Home, manifest: Manifest, inputs: ManifestInputs, out: Path, shard_size: int,
                       form: ShardForm = ShardForm()) -> dict:
    """Write manifest.parquet, the shards, manifest.json and README.md (a dataset card) into
    `out` (atomically, as a folder)."""
    make_dirs(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}.", dir=out.parent))
    try:
        tmp.chmod(DIR_MODE)  # mkdtemp makes it 0700; the manifest is for a trainer of the same group
        items = manifest.items
        rows = assemble_rows(home, items, inputs.dataset, manifest.scheme.guard)
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
            "inputs": inputs.to_json(), "paced_version": __version__, "items": rows.num_rows,
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
    build.add_argument("--out", required=True,
                       help="folder to write (must not exist, or hold the same build)")
    add_scheme_arguments(build)
    build.add_argument("--mode", choices=MODES, default="weighted-loss")
    build.add_argument("--seed", type=int, default=0, help="seed of the epoch's order and draws (default: 0)")
    build.add_argument("--epoch", type=int, default=0,
                       help="epoch number: another order per epoch (default: 0)")
    build.add_argument("--shard-size", type=int, default=256)
    build.add_argument("--snapshot", default=None, help="snapshot id (default: the newest)")
    build.add_argument("--require-reference", action=argparse.BooleanOptionalAction, default=None,
                       help="leave out (and count) rows without a teacher reference: off-policy trainers "
                       "(TRL's SFTTrainer) need a completion on every row. Default: on in weighted-loss "
                       "mode; --no-require-reference keeps them (on-policy training needs only prompts)")
    build.add_argument("--form", choices=FORMS, default="text",
                       help="text: prompt and completion strings; conversational: each a list of "
                       "{role, content} turns (TRL applies the model's chat template)")
    add_home_argument(build)


def run(args) -> int:
    home = open_home(args.home, create=False)
    asked = ManifestInputs(student_id=args.student, dataset=args.dataset, snapshot_id=args.snapshot,
                           weights=WeightScheme.from_json(scheme_settings(args)), mode=args.mode,
                           seed=args.seed, epoch=args.epoch)
    manifest, inputs = snapshot_manifest(home, asked)
    require = args.mode == "weighted-loss" if args.require_reference is None else args.require_reference
    form = ShardForm(require, args.form, measured_chat_template(home, args.student, inputs.snapshot_id))
    out = Path(args.out)
    if out.exists():
        previous = read_json(out / "manifest.json") if (out / "manifest.json").exists() else None
        same = previous and same_build(previous, inputs, args.shard_size, out) \
            and previous.get("require_reference", False) == require \
            and previous.get("form", "text") == args.form
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
              "(`paced teacher` adds references; --no-require-reference keeps the rows, for on-policy "
              "training)",
              file=sys.stderr)
    if require and summary["items"] == 0:
        raise InputError(f"no row of {args.dataset} with a weight > 0 has a teacher reference: run `paced "
                         "teacher` "
                         "first, or pass --no-require-reference (on-policy training needs only prompts)")
    print(json.dumps({**{k: v for k, v in summary.items() if k != "sha256"}, "out": str(out)}),
          file=sys.stdout)
    return 0


def same_build(previous: dict, inputs: ManifestInputs, shard_size: int, out: Path) -> bool:
    """Whether manifest.json `previous` (also one written by an older paced) records this build."""
    if "inputs" not in previous or previous.get("shard_size") != shard_size:
        return False
    return ManifestInputs.from_json(previous["inputs"], str(out / "manifest.json")) == inputs
