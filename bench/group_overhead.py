"""Grading inside the step: a group step's time vs the same number of on-policy samples without grading.

Both arms train the built-in student with reverse KL on its own samples, 32 samples per step:
`group` = `--group-size 8 --batch-size 4` (4 prompts × 8 samples, graded with the data set's
grader, weighted, committed as rollouts), `plain` = `--batch-size 32` (one sample per prompt, no
grading, no commit). Same seed, same manifest, in-group weights uniform (so both train every
sample), same steps. Prints seconds per step side by side, and the group step's time spent
grading and committing (goal: group ≤ 1.1× plain). Needs a data home with the built-in task
(`bench/paced_vs_uniform.py` prepares one).

    .venv/bin/python bench/group_overhead.py --home bench/out/group/home --steps 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def timed(obj, method: str, totals: dict, key: str) -> None:
    """Accumulate the wall time of `obj.method` calls in totals[key]."""
    inner = getattr(obj, method)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - started

    setattr(obj, method, wrapper)


def run(home: Path, manifest: Path, out: Path, steps: int, group: bool, seed: int) -> dict:
    from paced.jobs.train import group_io
    from paced.trainer.config import TrainConfig
    from paced.trainer.loop import train

    models = home / "models"
    config = TrainConfig(student=str(models / "student"), teacher=str(models / "teacher"),
                         source=str(manifest),
                         out=str(out), loss="reverse", steps=steps, batch_size=4 if group else 32, lr=1e-3,
                         seed=seed, max_new_tokens=8, progress=False, group_size=8 if group else 0,
                         group_scheme="uniform", grader_workers=1)
    io = group_io(config, str(home))
    totals: dict[str, float] = {}
    if io is not None:
        timed(io.grading, "grade", totals, "grading")
        timed(io.sink, "commit", totals, "commit")
    try:
        summary = train(config, group_io=io)
    finally:
        if io is not None:
            io.grading.close()
    per_step = summary["train_seconds"] / summary["steps"]
    return {"arm": "group" if group else "plain", "steps": summary["steps"], "seconds_per_step": per_step,
            "grading_per_step": totals.get("grading", 0.0) / summary["steps"],
            "commit_per_step": totals.get("commit", 0.0) / summary["steps"],
            "samples_per_step": (summary["group"]["samples"] / summary["steps"]) if group else 32,
            "generated_tokens": summary["generated_tokens"], "train_tokens": summary["train_tokens"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", required=True,
                   help="a data home with the built-in task, models and base snapshot")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2,
                   help="alternating runs of each arm (the best one counts)")
    args = p.parse_args()
    from paced.curriculum import WeightScheme
    from paced.jobs.manifest import ManifestInputs, snapshot_manifest, write_manifest_dir
    from paced.store.home import open_home

    base = Path(args.home).resolve()
    work = Path(tempfile.mkdtemp(prefix="group-overhead-"))
    try:
        home = work / "home"
        home.mkdir()
        for part in ("SCHEMA_VERSION.json", "problems", "references", "models"):
            (home / part).symlink_to(base / part)
        shutil.copytree(base / "snapshots" / "base", home / "snapshots" / "base")
        store = open_home(home)
        manifest, inputs = snapshot_manifest(store, ManifestInputs(student_id="base", dataset="arith",
                                                                   weights=WeightScheme(name="uniform")))
        write_manifest_dir(store, manifest, inputs, work / "m", 64)
        results: dict[str, list[dict]] = {"plain": [], "group": []}
        for r in range(args.repeats):
            for group in (False, True):
                shutil.rmtree(home / "rollouts", ignore_errors=True)
                res = run(home, work / "m", work / f"out-{r}-{group}", args.steps, group, seed=r)
                results[res["arm"]].append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {arm: min(runs, key=lambda x: x["seconds_per_step"]) for arm, runs in results.items()}
    print("| arm | samples / step | s / step | of which grading | of which commit |")
    print("|---|---|---|---|---|")
    for arm, res in best.items():
        print(f"| {arm} | {res['samples_per_step']:.0f} | {res['seconds_per_step']:.3f} | "
              f"{res['grading_per_step']:.4f} | {res['commit_per_step']:.4f} |")
    print(f"group / plain: {best['group']['seconds_per_step'] / best['plain']['seconds_per_step']:.2f}×")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
