"""Rollout overhead: raw `vllm.LLM.generate` vs the `paced rollout` code path, one engine.

Both sides get the same prompts (built-in arithmetic problems) and sampling (K samples each,
same temperature, top_p, max_new_tokens). Raw: one `LLM.generate` call, one request per
problem with n=K and a per-problem seed. Rollout: `paced.jobs.rollout.rollout` with the same
engine (K seeded n=1 requests per problem, fixed batches, grading, a Parquet commit per batch).
Engine start is excluded from both timings; both are warmed up first; runs are interleaved.
Prints the median generated tokens/s of each and their ratio (goal: rollout/raw >= 0.9); also
raw with the rollout's request shape (K seeded n=1 requests per prompt), to separate the cost
of the request shape from that of batching, grading and commits.

    .venv/bin/python bench/rollout_overhead.py [--problems 1024] [-k 8] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def raw_generate(backend, prompts: list[str], ids: list[str], k: int, temperature: float, max_new_tokens: int,
                 per_sample: bool) -> int:
    """Generated tokens of one raw `LLM.generate` call: n=K per prompt, or (per_sample) the
    rollout's request shape, K n=1 requests per prompt with the rollout's seeds."""
    from vllm import SamplingParams

    from paced.backends.base import derive_seed
    from paced.jobs.rollout import sample_seed

    def params(n, seed):
        return SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens, seed=seed)

    if per_sample:
        inputs = [p for p in prompts for _ in range(k)]
        requests = [params(1, sample_seed(0, pid, j)) for pid in ids for j in range(k)]
    else:
        inputs, requests = prompts, [params(k, derive_seed(0, pid)) for pid in ids]
    outputs = backend.llm.generate(inputs, requests, use_tqdm=False)
    return sum(len(c.token_ids) for out in outputs for c in out.outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=1024)
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (median is kept)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from paced.backends.vllm_backend import VLLMBackend
    from paced.cli import main as paced
    from paced.jobs.rollout import RolloutConfig, rollout
    from paced.store.home import open_home
    from paced.store.problems import read_problems
    from paced.tasks.models import build_random_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_model(Path(tmp) / "model")
        home_dir = Path(tmp) / "home"
        paced(["import", "builtin:arithmetic", "--n", str(args.problems), "--dataset", "bench",
               "--home", str(home_dir)])
        home = open_home(home_dir)
        problems = read_problems(home, "bench")
        prompts, ids = problems["prompt"].to_pylist(), problems["id"].to_pylist()
        backend = VLLMBackend(model)

        def timed(fn) -> float:
            t0 = time.perf_counter()
            tokens = fn()
            return tokens / (time.perf_counter() - t0)

        def ours(r: int, limit=None) -> int:  # round r: fresh samples in a folder of their own
            config = RolloutConfig(k=args.k, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                   seed=0, round=r, batch_size=args.batch_size, grader_workers=1)
            return rollout(home, None, "bench", config, student_id="bench", backend=backend, limit=limit,
                           progress=False)["tokens"]

        runs = {"raw": [], "raw_per_sample": [], "rollout": []}
        gen = (args.k, args.temperature, args.max_new_tokens)
        try:
            raw_generate(backend, prompts[:64], ids[:64], *gen, per_sample=False)  # warm-up
            ours(0, limit=64)
            for r in range(1, args.repeats + 1):  # interleaved, so load changes hit every side
                runs["raw"].append(timed(lambda: raw_generate(backend, prompts, ids, *gen, per_sample=False)))
                runs["raw_per_sample"].append(timed(lambda: raw_generate(backend, prompts, ids, *gen,
                                                                         per_sample=True)))
                runs["rollout"].append(timed(lambda r=r: ours(r)))
        finally:
            backend.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"problems": args.problems, "k": args.k, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
              **{f"{k}_tokens_per_second": round(v, 1) for k, v in med.items()},
              "ratio": round(med["rollout"] / med["raw"], 3),
              "ratio_same_requests": round(med["rollout"] / med["raw_per_sample"], 3),
              "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
