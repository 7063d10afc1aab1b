"""How good a self-distillation teacher is: the starting student's greedy held-out accuracy when
its prompt shows the reference answer through a `--teacher-prompt-template`.

    .venv/bin/python bench/self_template.py --home bench/out/group/home

Each template is rendered with the problem's prompt and answer, as the trainer renders the
teacher's side; `{prompt}` alone is the student as it is. Needs a data home with the built-in
task's models and held-out set (`bench/paced_vs_uniform.py` prepares one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

TEMPLATES = ["{prompt}", "{prompt}{answer}+0={prompt}", "{answer}+0={prompt}", "{prompt}{answer}={prompt}",
             "0+{answer}={prompt}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", required=True)
    p.add_argument("--model", default="student", help="model folder under HOME/models")
    p.add_argument("--dataset", default="arith-heldout")
    args = p.parse_args()
    from paced.backends.base import SamplingConfig
    from paced.backends.hf_backend import HFBackend
    from paced.grading.verifiers import get_verifier
    from paced.store.home import open_home
    from paced.store.problems import dataset_info, read_problems

    home = open_home(args.home, create=False)
    problems = read_problems(home, args.dataset)
    prompts, answers = problems["prompt"].to_pylist(), problems["answer"].to_pylist()
    levels = problems["difficulty"].to_pylist()
    verifier = get_verifier(dataset_info(home, args.dataset)["grader"])
    print("| teacher prompt | held-out acc (%) | by digits (%) |\n|---|---|---|")
    with HFBackend(Path(args.home) / "models" / args.model) as backend:
        for template in TEMPLATES:
            texts = [template.format(prompt=q, answer=a) for q, a in zip(prompts, answers, strict=True)]
            out = backend.generate(texts, SamplingConfig(n=1, temperature=0, max_new_tokens=8))
            ok = [str(verifier.function(o[0].text, a)) == "correct" for o, a in zip(out, answers,
                                                                                    strict=True)]
            pairs = list(zip(ok, levels, strict=True))
            by = " / ".join(f"{100 * sum(k for k, d in pairs if d == level) / levels.count(level):.0f}"
                            for level in sorted(set(levels)))
            print(f"| `{template}` | {100 * sum(ok) / len(ok):.1f} | {by} |")


if __name__ == "__main__":
    main()
