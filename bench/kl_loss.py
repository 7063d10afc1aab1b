"""Chunked distillation losses vs the naive full-logit way (as TRL's GKD trainer computes it).

For each loss (forward, reverse, jsd, akl) and each vocabulary (default 32768, and the built-in
task's character vocabulary), one forward + backward of the weighted batch loss over
`--tokens` response tokens, run three ways:

- naive: log_softmax of both full [B,T,V] float32 tensors, the divergence as one elementwise
  [B,T,V] expression (`F.kl_div(..., log_target=True)`, the mixture via logsumexp for JSD, a
  full-tensor sort for AKL), the masked positions gathered (`x[mask]`), summed and weighted.
- chunked: `paced.trainer.losses.weighted_batch_loss` (the gradient in a new buffer).
- in-place: the same with `in_place=True` (the gradient written over the student logits).

The student logits come from a model's last layer, as in training: logits = hidden @ W with a
small hidden size (`--hidden`), W a parameter; backward runs through it to W.grad.

How memory is measured: every variant runs in a fresh Python process. The worker allocates the
inputs (hidden states, W, the student logits computed from them, teacher logits, mask,
weights), reads its resident set size (RSS, /proc/self/statm) as the baseline, runs the loss
forward + backward, and reports peak RSS (getrusage ru_maxrss) minus that baseline: the extra
memory the loss needs, including the gradient of the student logits it produces (a [tokens,
vocab] buffer in the logits' dtype, the `grad` column; naive and chunked both allocate one,
in-place reuses the logits). Between runs the logits are recomputed (the old ones freed first),
outside the timed part. Large CPU tensors are mmap'ed and returned to the OS when freed, so RSS
follows the live tensors (smaller blocks may stay with the allocator: counted, as they are
the process's memory). Time: the fastest of `--reps` runs after one warm-up run, same process:
loss forward + backward (including the small W.grad product). `loss rel` and `|grad| rel`
compare each chunked variant with naive (loss value, norm of W.grad).

    .venv/bin/python bench/kl_loss.py                      # 8192 tokens x 32768 vocab + tiny
    .venv/bin/python bench/kl_loss.py --tokens 2048 --vocab 8192 --losses forward,reverse

The default size does about 10 CPU-minutes of work (the naive AKL alone about 4) and needs
~17 GiB free memory for the naive JSD/AKL; `--tokens 2048` is about 4x less of both.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

LOSS_KWARGS = {"forward": {}, "reverse": {}, "jsd": {"beta": 0.5}, "akl": {"head_mass": 0.5}}


def _kl_div(lp, lq):
    """Elementwise KL(P||Q) terms of two full log-prob tensors, as TRL writes it."""
    import torch.nn.functional as F

    return F.kl_div(lq, lp, reduction="none", log_target=True)


def naive_loss(name, student, teacher, mask, weights, beta=0.5, head_mass=0.5):
    """The full-logit way: every [B,T,V] intermediate in float32 at once."""
    import torch
    import torch.nn.functional as F

    s_lp = F.log_softmax(student.float(), dim=-1)
    t_lp = F.log_softmax(teacher.float(), dim=-1)
    if name == "forward":
        elem = _kl_div(t_lp, s_lp)
    elif name == "reverse":
        elem = _kl_div(s_lp, t_lp)
    elif name == "jsd":
        mix = torch.logsumexp(torch.stack([s_lp + math.log(1 - beta), t_lp + math.log(beta)]), dim=0)
        elem = beta * _kl_div(t_lp, mix) + (1 - beta) * _kl_div(s_lp, mix)
    else:
        with torch.no_grad():
            t_p, s_p = t_lp.exp(), s_lp.exp()
            sorted_t, order = t_p.sort(dim=-1, descending=True)
            head = torch.empty_like(sorted_t, dtype=torch.bool).scatter_(
                -1, order, (sorted_t.cumsum(-1) - sorted_t) < head_mass)
            gap = (t_p - s_p).abs()
            g_head, total = (gap * head).sum(-1, keepdim=True), gap.sum(-1, keepdim=True)
            w = torch.where(total > 0, g_head / total, 0.5)
        elem = w * _kl_div(t_lp, s_lp) + (1 - w) * _kl_div(s_lp, t_lp)
    per_token = elem[mask].sum(-1)  # TRL: jsd = jsd[mask]
    counts = mask.sum(-1).clamp_min(1)
    token_w = (weights / counts).unsqueeze(-1).expand_as(mask)[mask]
    return (per_token * token_w).sum() / weights.sum()


def chunked_loss(name, student, teacher, mask, weights, chunk_size=None, in_place=False, **kw):
    from paced.trainer.losses import weighted_batch_loss

    out = weighted_batch_loss(
        student, teacher, mask, weights, loss=name, chunk_size=chunk_size, in_place=in_place, **kw
    )
    return out.loss


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict) -> dict:
    """Run one variant once for warm-up and `reps` times; report extra peak RSS and time."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    batch, vocab, hidden_size = spec["batch"], spec["vocab"], spec["hidden"]
    tokens = spec["tokens"] // batch
    dtype = getattr(torch, spec["dtype"])
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, tokens, hidden_size, generator=gen, dtype=dtype)
    w_std = 2.0 / math.sqrt(hidden_size)  # student logits with std ~2, like the teacher's
    lm_head = torch.randn(hidden_size, vocab, generator=gen, dtype=dtype).mul_(w_std).requires_grad_()
    teacher = torch.randn(batch, tokens, vocab, generator=gen, dtype=dtype).mul_(2.0)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[:, : int(tokens * spec["prompt_fraction"])] = False
    weights = torch.rand(batch, generator=gen) + 0.5
    kw = LOSS_KWARGS[spec["loss"]]
    if spec["variant"] == "naive":
        def fn(student):
            return naive_loss(spec["loss"], student, teacher, mask, weights, **kw)
    else:
        in_place = spec["variant"] == "in-place"
        def fn(student):
            return chunked_loss(spec["loss"], student, teacher, mask, weights, spec["chunk_size"],
                                in_place=in_place, **kw)
    student = hidden @ lm_head
    baseline = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for rep in range(spec["reps"] + 1):
        lm_head.grad = None
        if rep:
            del student
            student = hidden @ lm_head
        start = time.perf_counter()
        loss = fn(student)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "extra_bytes": peak - baseline, "peak_before_bytes": peak_before - baseline,
        "seconds": min(times[1:]), "loss": loss.item(), "grad_norm": lm_head.grad.float().norm().item(),
        "grad_bytes": student.numel() * student.element_size(),
    }


def run_variant(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tiny_vocab() -> int:
    from paced.tasks.models import build_tokenizer

    return len(build_tokenizer())


def _mib(n: float) -> str:
    return f"{n / 2**20:7.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="response tokens in the batch")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary size of the big case")
    p.add_argument("--batch", type=int, default=8, help="sequences (tokens are split evenly)")
    p.add_argument("--hidden", type=int, default=16, help="hidden size of the student's last layer")
    p.add_argument("--losses", default="forward,reverse,jsd,akl")
    p.add_argument("--no-tiny", action="store_true", help="skip the built-in task's vocabulary")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: auto)")
    p.add_argument("--prompt-fraction", type=float, default=0.0, help="leading tokens masked out")
    p.add_argument("--reps", type=int, default=1, help="timed runs after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    vocabs = [args.vocab] + ([] if args.no_tiny else [_tiny_vocab()])
    print(f"tokens={args.tokens} batch={args.batch} hidden={args.hidden} dtype={args.dtype} "
          f"chunk_size={args.chunk_size or 'auto'} reps={args.reps} threads={args.threads or 'default'}")
    print("memory: extra peak RSS over the inputs, MiB; x: chunked / naive; rel: |chunked/naive - 1|")
    print(f"{'loss':8} {'vocab':>6} {'grad':>7} | {'naive':>7} {'chunk':>7} {'inplace':>7} {'mem x':>5} "
          f"{'inpl x':>6} | {'naive s':>7} {'chunk s':>7} {'inpl s':>7} {'time x':>6} {'inpl x':>6} | "
          f"{'loss rel':>8} {'grad rel':>8}", flush=True)
    for vocab in vocabs:
        for name in args.losses.split(","):
            base = {"loss": name, "vocab": vocab, "tokens": args.tokens, "batch": args.batch,
                    "hidden": args.hidden, "dtype": args.dtype, "chunk_size": args.chunk_size,
                    "reps": args.reps, "prompt_fraction": args.prompt_fraction, "threads": args.threads}
            naive, chunk, inpl = (run_variant({**base, "variant": v}) for v in ("naive", "chunked", "in-place"))
            rel = max(abs(r["loss"] / naive["loss"] - 1) for r in (chunk, inpl))
            grad_rel = max(abs(r["grad_norm"] / naive["grad_norm"] - 1) for r in (chunk, inpl))
            print(f"{name:8} {vocab:6d} {_mib(chunk['grad_bytes'])} | {_mib(naive['extra_bytes'])} "
                  f"{_mib(chunk['extra_bytes'])} {_mib(inpl['extra_bytes'])} "
                  f"{chunk['extra_bytes'] / naive['extra_bytes']:5.2f} {inpl['extra_bytes'] / naive['extra_bytes']:6.2f} | "
                  f"{naive['seconds']:7.2f} {chunk['seconds']:7.2f} {inpl['seconds']:7.2f} "
                  f"{chunk['seconds'] / naive['seconds']:6.2f} {inpl['seconds'] / naive['seconds']:6.2f} | "
                  f"{rel:8.1e} {grad_rel:8.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
