"""Held-out accuracy by difficulty, greedy and mean@k sampled, and forgetting vs a base model.

    paced evaluate --model OUT/final --base models/student --dataset arith-heldout \
        --mastered-student STUDENT_ID --mastered-dataset arith

For every `--dataset`: greedy accuracy (temperature 0, one sample) and mean@k (k samples at
`--temperature`, the share correct), overall and by difficulty, for the model and, side by
side, the base model; for problems whose metadata names a `module` (`builtin:mathematics`), also
by module and difficulty. `--chat-template` renders prompts with the model's chat template (an
instruct model such as `paced tasks real-model`'s). **Forgetting**: on the problems the base
student had mastered (p̂ = 1 in its newest snapshot for `--mastered-dataset`), the base model's
greedy accuracy minus the model's. One JSON object on stdout.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from paced.backends.engine import (
    DEFAULT_ENGINE,
    EngineOptions,
    add_engine_arguments,
    engine_options,
    open_backend,
)
from paced.errors import InputError
from paced.store.home import Home, open_home
from paced.store.problems import dataset_info, read_problems
from paced.store.snapshots import read_snapshot


@dataclass(frozen=True)
class EvalConfig:
    k: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 16
    seed: int = 0
    limit: int | None = None  # problems per data set (the first by id)
    backend: str | None = None  # auto: vllm when importable
    sampled: bool = True  # also report mean@k
    chat_template: bool = False  # render each prompt as a user turn with the model's chat template
    engine: EngineOptions = DEFAULT_ENGINE  # vLLM engine options

    def __post_init__(self):
        if self.k < 1:
            raise InputError(f"`k` must be >= 1, got {self.k}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"`limit` must be >= 1, got {self.limit}")


def _mean_by(correct: list[float], keys: list) -> dict:
    groups: dict = defaultdict(list)
    for c, key in zip(correct, keys):
        groups[key].append(c)
    return {str(k): round(float(np.mean(v)), 6) for k, v in sorted(groups.items(), key=lambda x: str(x[0]))}


def compute_accuracy(correct: np.ndarray, difficulty: list, modules: list | None = None) -> dict:
    """Overall and per-difficulty mean of `correct` (a per-problem share in [0, 1]); per module
    and difficulty too when `modules` names any."""
    values = correct.tolist()
    levels = ["all" if d is None else int(d) for d in difficulty]
    out = {"problems": int(len(correct)), "accuracy": round(float(np.mean(correct)), 6) if len(correct)
           else None, "by_difficulty": _mean_by(values, levels)}
    if modules and any(m is not None for m in modules):
        out["by_module"] = {str(m): _mean_by([v for v, mm in zip(values, modules) if mm == m],
                                             [lv for lv, mm in zip(levels, modules) if mm == m])
                            for m in sorted({m for m in modules}, key=str)}
    return out


def problem_modules(problems: pa.Table) -> list:
    """Each problem's `module` from its metadata (None where it names none)."""
    modules = []
    for meta in problems["metadata"].to_pylist():
        module = json.loads(meta).get("module") if meta else None
        modules.append(module if isinstance(module, str) else None)
    return modules


def _grade_share(backend, problems: pa.Table, grader: str, params, seeds) -> np.ndarray:
    """Per problem, the share of its samples graded correct."""
    from paced.grading import GradingPool

    outs = backend.generate(problems["prompt"].to_pylist(), params, seeds=seeds)
    answers = problems["answer"].to_pylist()
    flat = [(c.text, a) for comps, a in zip(outs, answers) for c in comps]
    with GradingPool(grader) as pool:
        verdicts = pool.grade(flat)
    hits = np.array([v.outcome == "correct" for v in verdicts], dtype=np.float64)
    return hits.reshape(len(answers), -1).mean(axis=1)


def evaluate_backend(backend, sets: dict[str, tuple[pa.Table, str]], cfg: EvalConfig) -> dict:
    """Greedy (and mean@k) accuracy of one loaded model on each named problem set."""
    from paced.backends import SamplingConfig

    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                            chat_template=cfg.chat_template)
    sampled = SamplingConfig(n=cfg.k, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                             seed=cfg.seed, chat_template=cfg.chat_template)
    report = {}
    for name, (problems, grader) in sets.items():
        if problems.num_rows == 0:
            report[name] = {"greedy": compute_accuracy(np.zeros(0), [])}
            continue
        seeds = [cfg.seed + i for i in range(problems.num_rows)]
        difficulty, modules = problems["difficulty"].to_pylist(), problem_modules(problems)
        entry = {"greedy": compute_accuracy(_grade_share(backend, problems, grader, greedy, seeds),
                                            difficulty, modules)}
        if cfg.sampled:
            entry[f"mean@{cfg.k}"] = compute_accuracy(
                _grade_share(backend, problems, grader, sampled, seeds), difficulty, modules)
        report[name] = entry
    return report


def mastered_problems(home: Home, student_id: str, dataset: str, snapshot_id: str | None = None) -> pa.Table:
    """Problems of `dataset` the student solved in every rollout of a snapshot (the newest: None)."""
    snap = read_snapshot(home, student_id, snapshot_id, dataset=dataset)
    ids = snap.filter(pc.equal(snap["pass_rate"], 1.0))["problem_id"]
    problems = read_problems(home, dataset)
    return problems.filter(pc.is_in(problems["id"], value_set=ids))


def load_sets(home: Home, datasets: list[str], cfg: EvalConfig, mastered: tuple[str, str, str | None] | None):
    sets = {}
    for name in datasets:
        table = read_problems(home, name)
        sets[name] = (table.slice(0, cfg.limit) if cfg.limit else table, dataset_info(home, name)["grader"])
    if mastered:
        student, dataset, snapshot_id = mastered
        table = mastered_problems(home, student, dataset,
                                  snapshot_id)  # may be empty: forgetting is then null
        sets["mastered"] = (table.slice(0, cfg.limit) if cfg.limit else table,
                            dataset_info(home, dataset)["grader"])
    return sets


def evaluate_model(model_dir: str, sets: dict, cfg: EvalConfig) -> dict:
    from paced.backends import model_id

    with open_backend(cfg.backend, model_dir, cfg.engine) as backend:
        return {"model_id": model_id(model_dir), "dir": str(model_dir),
                "sets": evaluate_backend(backend, sets, cfg)}


def forgetting(model: dict, base: dict) -> dict | None:
    if "mastered" not in model["sets"] or base is None:
        return None
    m = model["sets"]["mastered"]["greedy"]["accuracy"]
    b = base["sets"]["mastered"]["greedy"]["accuracy"]
    if m is None or b is None:
        return None
    return {"problems": model["sets"]["mastered"]["greedy"]["problems"], "base_greedy": b,
            "model_greedy": m, "drop": round(b - m, 6)}


def add_arguments(parser) -> None:
    from paced.store.home import add_home_argument

    parser.add_argument("--model", required=True,
                        help="model to evaluate: a folder (save_pretrained) or a Hugging "
                        "Face Hub id (org/name, from the Hugging Face cache)")
    parser.add_argument("--base", default=None, help="base model (folder or Hub id), reported side by side")
    parser.add_argument("--dataset", action="append", required=True, help="held-out data set (repeatable)")
    parser.add_argument("--mastered-student", default=None,
                        help="student id whose p̂=1 problems measure forgetting")
    parser.add_argument("--mastered-dataset", default=None, help="data set those problems come from")
    parser.add_argument("--mastered-snapshot", default=None,
                        help="that student's snapshot id (default: newest)")
    parser.add_argument("-k", "--k", type=int, default=8, help="samples per problem for mean@k")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N problems of each set")
    parser.add_argument("--greedy-only", action="store_true", help="skip mean@k")
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--chat-template", action="store_true",
                        help="render prompts with the model's chat template (as `paced rollout "
                             "--chat-template`)")
    add_engine_arguments(parser, ray=False)
    add_home_argument(parser)


def run(args) -> int:
    home = open_home(args.home, create=False)
    if bool(args.mastered_student) != bool(args.mastered_dataset):
        raise InputError("--mastered-student and --mastered-dataset go together")
    cfg = EvalConfig(args.k, args.temperature, args.max_new_tokens, args.seed, args.limit,
                     None if args.backend == "auto" else args.backend, not args.greedy_only,
                     args.chat_template, engine_options(args))
    mastered = (args.mastered_student, args.mastered_dataset,
                args.mastered_snapshot) if args.mastered_student else None
    sets = load_sets(home, args.dataset, cfg, mastered)
    model = evaluate_model(args.model, sets, cfg)
    base = evaluate_model(args.base, sets, cfg) if args.base else None
    print(json.dumps({"model": model, "base": base, "forgetting": forgetting(model, base)}), file=sys.stdout)
    return 0
