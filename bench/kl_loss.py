"""Distillation losses side by side, CPU or CUDA: paced (logits, in-place, fused head) vs TRL vs Liger.

One training step per method: both LM heads (student h_s W_s^T, teacher h_t W_t^T under
no_grad) + the loss + backward to the student's W_s and h_s, over --batch x --seq response
tokens, vocabulary --vocab, hidden --hidden, inputs in --dtype. Methods:

- `trl b=0|1|0.5`: TRL's `GKDTrainer.generalized_jsd_loss` on the full logits (written out
  below, verbatim; TRL itself need not be installed): beta 0 = forward KL, 1 = reverse KL,
  0.5 = JSD. TRL has no AKL.
- `paced logits` / `paced in_place`: `paced.trainer.losses.weighted_batch_loss` on the logits.
- `paced fused`: `paced.trainer.fused.fused_batch_loss` on hidden states + heads (never builds
  the [tokens, vocab] logits).
- `liger fused b=...` (Liger-Kernel's `LigerFusedLinearJSD`, never builds the logits) and
  `liger jsd b=...` (`LigerJSD` on the logits), when `liger_kernel` imports (CUDA only).

Time: median of --reps runs after one warm-up (CUDA events on a GPU, perf_counter on the CPU).
Memory above the inputs (h_s, W_s, h_t, W_t, mask): on CUDA `max_memory_allocated` during the
first timed run minus what was allocated before it; on the CPU every method runs in a fresh
process and the figure is its peak RSS minus its RSS with the inputs allocated. Both count the
logits, the loss's own buffers and the gradients of W_s and h_s. Agreement: against a float64
reference from the same (upcast) inputs, computed 512 tokens at a time (paced's row functions
evaluated in float64, with their analytic gradient; tests/trainer/test_losses.py checks those
against float64 autograd): `loss rel` = |loss / ref - 1|, `gW err` = ||gW - gW_ref|| /
||gW_ref||, `gh err` the same for h_s.

    .venv/bin/python bench/kl_loss.py                                   # CPU, 1024 x 32768, fp32
    python bench/kl_loss.py --device cuda --batch 4 --seq 2048 --vocab 151936 --hidden 1024 \\
        --dtype bfloat16 --json results.json                           # issue 17's size, on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

KWARGS = {"forward": {}, "reverse": {}, "jsd": {"beta": 0.5}, "akl": {"head_mass": 0.5}}
PEERS = [(0.0, "forward"), (1.0, "reverse"), (0.5, "jsd")]  # the beta that computes each loss
GIB = 2**30


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean"):
    """trl 1.16.0, trl/experimental/gkd/gkd_trainer.py, GKDTrainer.generalized_jsd_loss (Apache-2.0,
    the HuggingFace team), the num_items_in_batch branch and the comments left out."""
    import torch
    import torch.nn.functional as F

    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / (mask.sum() if labels is not None else jsd.size(0))
    return jsd.sum() if reduction == "sum" else jsd.mean() if reduction == "mean" else jsd


# ---------------------------------------------------------------- inputs, methods, reference


def make_inputs(spec: dict) -> dict:
    import torch

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    b, t, h, v = spec["batch"], spec["seq"], spec["hidden"], spec["vocab"]
    scale = spec["logit_std"] / math.sqrt(h)
    hidden = torch.randn(b, t, h, generator=g, device=device)
    w_s = torch.randn(v, h, generator=g, device=device) * scale
    w_t = 0.97 * w_s + math.sqrt(1 - 0.97**2) * torch.randn(v, h, generator=g, device=device) * scale
    return {"h_s": hidden.to(dtype).requires_grad_(), "W_s": w_s.to(dtype).requires_grad_(),
            "h_t": hidden.to(dtype), "W_t": w_t.to(dtype),
            "mask": torch.ones(b, t, dtype=torch.bool, device=device),
            "weights": torch.ones(b, device=device),
            "labels": torch.zeros(b, t, dtype=torch.long, device=device)}


def _heads(inp):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        teacher = F.linear(inp["h_t"], inp["W_t"])
    return F.linear(inp["h_s"], inp["W_s"]), teacher


def method_names(device: str, kinds: list[str], chunk_sizes: list[int]) -> list[str]:
    names = [f"trl b={b:g}" for b, kind in PEERS if kind in kinds]
    for path in ("logits", "in_place", "fused"):
        names += [f"paced {path} {kind}" for kind in kinds]
    names += [f"paced {path} forward cs={cs}" for cs in chunk_sizes for path in ("logits", "fused")]
    if device == "cuda":
        names += [f"liger {kind} b={b:g}" for kind in ("fused", "jsd") for b, k in PEERS if k in kinds]
    return names


def make_method(name: str, inp: dict):
    """(loss kind the method computes, step()) for a method name of `method_names`."""
    from paced.trainer.fused import HeadInput, fused_batch_loss
    from paced.trainer.losses import weighted_batch_loss

    parts = name.split()
    if parts[0] == "trl":
        beta = float(parts[1][2:])

        def trl():
            s, t = _heads(inp)
            return trl_generalized_jsd_loss(s, t, labels=inp["labels"], beta=beta)
        return dict((b, k) for b, k in PEERS)[beta], trl
    if parts[0] == "liger":
        return _liger_method(parts[1], float(parts[2][2:]), inp)
    path, kind = parts[1], parts[2]
    chunk = int(parts[3][3:]) if len(parts) > 3 else None
    if path == "fused":
        def fused():
            student, teacher = HeadInput(inp["h_s"], inp["W_s"]), HeadInput(inp["h_t"], inp["W_t"])
            return fused_batch_loss(student, teacher, inp["mask"], inp["weights"], loss=kind,
                                    chunk_size=chunk, **KWARGS[kind]).loss
        return kind, fused

    def logits():
        s, t = _heads(inp)
        return weighted_batch_loss(s, t, inp["mask"], inp["weights"], loss=kind, chunk_size=chunk,
                                   in_place=path == "in_place", **KWARGS[kind]).loss
    return kind, logits


def _liger_method(which: str, beta: float, inp: dict):
    import torch.nn.functional as F
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    from liger_kernel.transformers.jsd import LigerJSD

    kind = dict((b, k) for b, k in PEERS)[beta]
    flat = inp["h_s"].shape[-1]
    if which == "fused":
        module = LigerFusedLinearJSD(jsd_beta=beta)
        return kind, lambda: module(inp["h_s"].view(-1, flat), inp["W_s"], inp["h_t"].view(-1, flat),
                                    inp["W_t"], None)
    module = LigerJSD(beta=beta)

    def on_logits():
        s, t = _heads(inp)
        return module(F.log_softmax(s.view(-1, s.shape[-1]).float(), -1),
                      F.log_softmax(t.view(-1, t.shape[-1]).float(), -1))
    return kind, on_logits


def reference(kind: str, inp: dict, chunk: int = 512):
    """(mean token loss, dL/dW_s, dL/dh_s) in float64 from the upcast inputs, `chunk` tokens at a time."""
    import torch

    from paced.trainer.losses import row_function

    hs = inp["h_s"].detach().double().view(-1, inp["h_s"].shape[-1])
    ht = inp["h_t"].double().view(-1, hs.shape[-1])
    ws, wt = inp["W_s"].detach().double(), inp["W_t"].double()
    rows, n = row_function(kind, **KWARGS[kind]), hs.shape[0]
    total, gw, gh = 0.0, torch.zeros_like(ws), torch.zeros_like(hs)
    for lo in range(0, n, chunk):
        h = hs[lo:lo + chunk]
        loss, g = rows(torch.log_softmax(h @ ws.T, -1), torch.log_softmax(ht[lo:lo + chunk] @ wt.T, -1), True)
        total += float(loss.sum()) / n
        g /= n  # the analytic gradient of paced's row functions, evaluated in float64
        gw.addmm_(g.T, h)
        gh[lo:lo + chunk] = g @ ws
    return total, gw, gh


# ---------------------------------------------------------------- measuring


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, inp: dict, reps: int) -> dict:
    """Time and (CUDA) memory above the inputs of one method, in this process."""
    import torch

    cuda = inp["h_s"].device.type == "cuda"
    kind, step = make_method(name, inp)
    times, peak, loss = [], None, None
    for rep in range(reps + 1):
        inp["h_s"].grad = inp["W_s"].grad = None
        if cuda:
            torch.cuda.synchronize()
            if rep == 1:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            loss.backward()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            if rep == 1:
                peak = (torch.cuda.max_memory_allocated() - base) / GIB
        else:
            started = time.perf_counter()
            loss = step()
            loss.backward()
            times.append((time.perf_counter() - started) * 1e3)
    return {"method": name, "kind": kind, "ms": statistics.median(times[1:]), "peak_gib": peak,
            "loss": float(loss)}


def agree(row: dict, inp: dict, refs: dict) -> dict:
    """Add the agreement of the last run's loss and gradients with the float64 reference."""
    kind = row["kind"]
    if kind not in refs:
        refs[kind] = reference(kind, inp)
    ref_loss, ref_gw, ref_gh = refs[kind]
    gw, gh = inp["W_s"].grad.double(), inp["h_s"].grad.double().view_as(ref_gh)
    return {**row, "loss_rel": abs(row["loss"] / ref_loss - 1),
            "gw_err": float((gw - ref_gw).norm() / ref_gw.norm()),
            "gh_err": float((gh - ref_gh).norm() / ref_gh.norm())}


def worker(spec: dict) -> dict:
    """CPU: one method in a fresh process; memory = peak RSS over the RSS with the inputs."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    inp = make_inputs(spec)
    base = _rss()
    row = measure(spec["method"], inp, spec["reps"])
    row["peak_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / GIB
    return agree(row, inp, {})  # after the peak is read: the reference's memory is not counted


def run_all(args, names: list[str]) -> list[dict]:
    spec = {k: getattr(args, k) for k in ("device", "batch", "seq", "hidden", "vocab", "dtype", "reps",
                                          "logit_std", "threads")}
    rows, refs, inp = [], {}, None
    for name in names:
        if args.device == "cpu":
            proc = subprocess.run([sys.executable, __file__, "--worker",
                                   json.dumps({**spec, "method": name})],
                                  capture_output=True, text=True, check=False)
            row = json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 else \
                {"method": name, "error": proc.stderr.strip().splitlines()[-1][:200]}
        else:
            inp = inp or make_inputs(spec)
            try:
                row = agree(measure(name, inp, args.reps), inp, refs)
            except Exception as err:  # noqa: BLE001 - one method failing (OOM, no Triton) must not stop the rest
                row = {"method": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
            _free_cuda()
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['method']} | error: {row['error']} |||||"
    peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.3f}"
    return (f"| {row['method']} | {row['kind']} | {row['ms']:.1f} | {peak} | {row['loss_rel']:.1e} | "
            f"{row['gw_err']:.1e} | {row['gh_err']:.1e} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=4, help="sequences")
    p.add_argument("--seq", type=int, default=256, help="response tokens per sequence")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--losses", default="forward,reverse,jsd,akl")
    p.add_argument("--chunk-sizes", default="",
                   help="extra rows: paced forward with these chunks, e.g. 512,2048")
    p.add_argument("--only", default="",
                   help="only methods whose name contains one of these (comma-separated)")
    p.add_argument("--reps", type=int, default=5, help="timed runs after one warm-up (the median is shown)")
    p.add_argument("--logit-std", type=float, default=4.0, help="standard deviation of the logits")
    p.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0: torch's default)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    chunks = [int(x) for x in args.chunk_sizes.split(",") if x]
    names = method_names(args.device, args.losses.split(","), chunks)
    names = [n for n in names if not args.only or any(s in n for s in args.only.split(","))]
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"cpu, {args.threads or torch.get_num_threads()} threads")
    print(f"{args.batch * args.seq} tokens x {args.vocab} vocab, hidden {args.hidden}, {args.dtype}, "
          f"{where}, torch {torch.__version__}; median of {args.reps} after a warm-up\n")
    print("| method | loss | ms | GiB above inputs | loss rel | gW err | gh err "
          "|\n|---|---|---|---|---|---|---|")
    rows = run_all(args, names)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": where, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
