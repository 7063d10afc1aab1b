"""Will frontier weighting pay for this student? `paced diagnose`.

    paced diagnose --student DIR --teacher DIR --student-id ID --dataset NAME --heldout NAME \\
        [--regime off-policy|on-policy|both] [--per-bin 32] [--dim 4096] [--out diagnose.png]

Per pass-rate bin of the student's newest snapshot (p̂ = 0, 0 < p̂ ≤ ⅓, ⅓ < p̂ < ⅔, ⅔ ≤ p̂ < 1,
p̂ = 1), up to `--per-bin` problems drawn at random (a bin with fewer than 4 shows n/a): the
signal-to-noise ratio of their distillation gradients (‖mean‖² over the total variance,
estimated without the 1/n bias, so ≈ 0 for pure noise whatever the bin's size)
and the cosine of their mean gradient with the held-out direction (the gradient of the
cross-entropy of the held-out set's gold answers). Off-policy: forward KL on the teacher's
references (problems without one are left out); on-policy: reverse KL on one student sample.
Gradients are count-sketched to --dim numbers (--params REGEX: only matching parameters, for
models too large to sketch whole).

stdout: JSON (per regime and bin: problems, snr, alignment; and the one-line verdict);
stderr: the table; --out: a PNG of both measures by bin.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from paced.curriculum.signal import BIN_LABELS, BINS, MIN_PROBLEMS, compute_bin_signal, pass_rate_bin, verdict
from paced.errors import InputError
from paced.store.home import open_home

REGIMES = {"off-policy": "forward", "on-policy": "reverse"}


@dataclass(frozen=True)
class DiagnoseConfig:
    student: str
    teacher: str
    student_id: str
    dataset: str
    heldout: str
    regime: str = "both"
    per_bin: int = 32
    heldout_limit: int = 64
    dim: int = 4096
    params: str | None = None
    seed: int = 0
    max_new_tokens: int = 32
    max_length: int = 1024

    def __post_init__(self):
        if self.regime not in (*REGIMES, "both"):
            raise InputError(f"`regime` must be off-policy, on-policy or both, got {self.regime!r}")
        for name, least in (("per_bin", 2), ("heldout_limit", 1), ("max_new_tokens", 1), ("max_length", 2)):
            if getattr(self, name) < least:
                raise InputError(f"`{name}` must be >= {least}, got {getattr(self, name)}")
        if not 2 <= self.dim <= 1 << 24:
            raise InputError(f"`dim` must be in [2, 16777216], got {self.dim}")

    @property
    def regimes(self) -> list[str]:
        return list(REGIMES) if self.regime == "both" else [self.regime]


def read_references(home, dataset: str) -> dict[str, str]:
    """problem_id -> the first verified teacher reference (any teacher), from the reference batches."""
    import pyarrow.parquet as pq

    from paced.store.shards import reference_files

    refs: dict[str, str] = {}
    for path in reference_files(home, dataset):
        table = pq.read_table(path, columns=["problem_id", "response"])
        for pid, response in zip(table["problem_id"].to_pylist(), table["response"].to_pylist(), strict=True):
            refs.setdefault(pid, response)
    return refs


def choose_problems(home, config: DiagnoseConfig) -> dict[str, list[dict]]:
    """bin -> up to --per-bin problems (prompt, answer, reference) of the newest snapshot, drawn at random."""
    from paced.store.problems import read_problems
    from paced.store.snapshots import read_snapshot_rows

    snapshot, _ = read_snapshot_rows(home, config.student_id, None, config.dataset)
    measured = snapshot.filter(np.asarray(snapshot["n"]) > 0)
    bins = pass_rate_bin(measured["pass_rate"].to_numpy())
    problems = {r["id"]: r for r in read_problems(home, config.dataset).to_pylist()}
    refs = read_references(home, config.dataset)
    rng = np.random.default_rng(config.seed)
    chosen = {}
    for name in BINS:
        ids = [pid for pid, b in zip(measured["problem_id"].to_pylist(), bins, strict=True) if b == name]
        order = rng.permutation(len(ids))
        chosen[name] = [{**problems[ids[i]],
                         "reference": refs.get(ids[i])} for i in order[: config.per_bin * 4]
                        if ids[i] in problems]
    return chosen


def measure(config: DiagnoseConfig, home) -> dict:
    import torch

    from paced.trainer.checkpoint import load_model
    from paced.trainer.diagnose import GradientSketch, problem_gradients, sample_completions
    from paced.trainer.tokens import completion_ids

    torch.manual_seed(config.seed)
    student, tokenizer = load_model(config.student, torch.float32, "cpu")
    teacher, _ = load_model(config.teacher, torch.float32, "cpu")
    teacher.eval().requires_grad_(False)
    sketch = GradientSketch(student, config.dim, config.seed, config.params)
    from paced.store.problems import read_problems

    held = read_problems(home, config.heldout).slice(0, config.heldout_limit).to_pylist()
    held_grad = problem_gradients(student, None, tokenizer, [r["prompt"] for r in held],
                                  completion_ids(tokenizer, [r["answer"] for r in held]), "nll", sketch,
                                  config.max_length).mean(axis=0)
    chosen = choose_problems(home, config)
    result = {"config": asdict(config), "regimes": {}}
    for regime in config.regimes:
        rows = {b: [r for r in chosen[b] if regime == "on-policy" or r["reference"] is not None]
                for b in BINS}
        signals = []
        for name in BINS:
            picked = rows[name][:config.per_bin]
            if len(picked) < MIN_PROBLEMS:  # too few to estimate: n/a in the table
                signals.append(compute_bin_signal(name, np.zeros((len(picked), config.dim)), None))
                continue
            prompts = [r["prompt"] for r in picked]
            if regime == "on-policy":
                targets = sample_completions(student, tokenizer, prompts, config.max_new_tokens, config.seed)
            else:
                targets = completion_ids(tokenizer, [r["reference"] for r in picked])
            grads = problem_gradients(student, teacher, tokenizer, prompts, targets, REGIMES[regime], sketch,
                                      config.max_length)
            signals.append(compute_bin_signal(name, grads, held_grad))
        result["regimes"][regime] = {"bins": [asdict(s) for s in signals],
                                     "verdict": verdict(signals)}
    return result


def table_text(result: dict) -> str:
    lines = []
    for regime, r in result["regimes"].items():
        lines.append(f"{regime} (loss {REGIMES[regime]})")
        lines.append(f"  {'bin':<12} {'problems':>8} {'SNR':>10} {'held-out cos':>13} {'± sd':>6}")
        for b in r["bins"]:
            snr = "n/a" if b["snr"] is None else f"{b['snr']:.4f}"
            cos = "n/a" if b["alignment"] is None else f"{b['alignment']:+.3f}"
            sd = "" if b.get("alignment_sd") is None else f"{b['alignment_sd']:.3f}"
            lines.append(f"  {BIN_LABELS[b['bin']]:<12} {b['problems']:>8} {snr:>10} {cos:>13} {sd:>6}")
        lines.append(f"  => {r['verdict']}")
    return "\n".join(lines)


def write_plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / max(len(result["regimes"]), 1)
    for k, (regime, r) in enumerate(result["regimes"].items()):
        x = np.arange(len(BINS)) + k * width
        axes[0].bar(x, [b["snr"] or 0 for b in r["bins"]], width, label=regime)
        axes[1].bar(x, [b["alignment"] or 0 for b in r["bins"]], width, label=regime)
    for ax, title in zip(axes, ("gradient SNR by pass-rate bin", "cosine with the held-out gradient"),
                         strict=True):
        ax.set_xticks(np.arange(len(BINS)) + width / 2, [BIN_LABELS[b] for b in BINS], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(out)
    plt.close(fig)


def add_arguments(parser) -> None:
    from paced.store.home import add_home_argument

    add_home_argument(parser)
    parser.add_argument("--student", required=True, metavar="DIR", help="the student model folder")
    parser.add_argument("--teacher", required=True, metavar="DIR", help="the teacher model folder")
    parser.add_argument("--student-id", required=True,
                        help="whose newest pass-rate snapshot bins the problems")
    parser.add_argument("--dataset", required=True, help="the training problems (with teacher references)")
    parser.add_argument("--heldout", required=True, help="held-out problems: the direction to align with")
    parser.add_argument("--regime", default="both", choices=[*REGIMES, "both"], help="(default: both)")
    parser.add_argument("--per-bin", type=int, default=32, help="problems per bin (default: 32)")
    parser.add_argument("--heldout-limit", type=int, default=64, help="held-out problems used (default: 64)")
    parser.add_argument("--dim", type=int, default=4096, help="sketch dimension (default: 4096)")
    parser.add_argument("--params", default=None, metavar="REGEX", help="only parameters whose name matches")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="on-policy sample length (default: 32)")
    parser.add_argument("--out", default=None, metavar="PNG", help="write the chart here")


def run(args) -> int:
    config = DiagnoseConfig(**{k: v for k, v in vars(args).items() if k not in ("home", "out")})
    home = open_home(args.home, create=False)
    result = measure(config, home)
    print(table_text(result), file=sys.stderr)
    if args.out:
        write_plot(result, Path(args.out))
        result["plot"] = str(args.out)
    print(json.dumps(result), flush=True)
    return 0
