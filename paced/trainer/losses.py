"""Token-level distillation losses, masked to response tokens and computed in chunks.

Four losses, each `loss(student_logits [B,T,V], teacher_logits [B,T,V], mask [B,T]) -> [B]`:
the per-sequence mean of a per-token divergence over the tokens where `mask` is true (a row
with no such token gives 0). With s = softmax(student), t = softmax(teacher), per token:

- `forward_kl`: KL(t || s) = sum t (log t - log s)            (mode covering; off-policy)
- `reverse_kl`: KL(s || t) = sum s (log s - log t)            (mode seeking; on-policy)
- `jsd(beta=0.5)`: the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024):
  beta * KL(t || m) + (1 - beta) * KL(s || m) with m = beta * t + (1 - beta) * s.
  It is 0 at beta = 0 and at beta = 1 (m equals one of the two): it is *not* a way to get
  forward or reverse KL; use those losses for that.
- `akl(head_mass=0.5)`: adaptive KL (Wu et al., COLING 2025). Sort t descending; the head is
  the top tokens up to `head_mass` cumulative mass (the token that crosses it included, so
  the head holds at least one token for head_mass > 0; tokens tied in probability are all in
  or all out), the tail is the rest. With gaps
  g_head = sum_head |t - s| and g_tail = sum_tail |t - s| (treated as constants),
  akl = g_head / (g_head + g_tail) * KL(t||s) + g_tail / (g_head + g_tail) * KL(s||t);
  when both gaps are 0 (s == t) the mix is 1/2 each (both divergences are 0 then).

Numerics. Both models' logits are cast to float32 inside a chunk and go through log_softmax;
terms with zero probability on the left of a KL contribute 0 (0 log 0 = 0).

Vocabulary padding (-inf). A vocabulary entry whose *teacher* logit is -inf is outside the
distillation support: the student's logit there is set to -inf as well, so both distributions
are renormalised over the entries the teacher can emit, every loss stays finite, and the
student gets no gradient at those entries. (Left alone, reverse KL would be +inf wherever the
student puts mass the teacher forbids.) A student logit of -inf where the teacher has mass is
left as it is: forward KL and AKL are then +inf, their true value.

Memory. Only the masked positions are gathered, `chunk_size` tokens at a time; the float32
copies, the softmaxes and the gradient of one chunk exist at once, never of the whole batch.
The gradient with respect to the student logits z is computed analytically in the same sweep
(forward KL: s - t; reverse KL: s (log(s/t) - KL(s||t)); JSD: (1 - beta) s (log(s/m) - KL(s||m));
AKL: the gap-weighted mix of the first two) and written into one buffer of the logits' own
dtype and shape (bf16 logits stay bf16), which becomes `student_logits.grad` in backward
(scaled in place by the incoming gradient); with
`in_place=True` that buffer is the student logits' own storage, so the full logits never sit in
memory twice. Teacher logits are constants: they get no gradient. Backward may run once.

Weighted batches: `weighted_batch_loss` returns sum_i w_i L_i / sum_i w_i, or a skipped batch
when every weight is 0 (see `BatchLoss`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from paced.errors import InputError
from paced.trainer.chunks import BYTES_PER_ENTRY_LOGITS, auto_chunk_tokens

# AKL looks for the head among the teacher's top tokens first (see `_head_threshold`).
HEAD_TOPK = 32

# A row function takes float32 log-probabilities (student, teacher) [n, V] and whether the
# gradient is wanted; it returns the per-token loss [n] and d loss / d student logits [n, V].
LossGrad = tuple[torch.Tensor, torch.Tensor | None]  # per-row losses and, if wanted, their gradient
RowFn = Callable[[torch.Tensor, torch.Tensor, bool], LossGrad]


# ---------------------------------------------------------------- per-token divergences


def _kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(P||Q) per row from log-probs, with 0 log 0 = 0; also p and log(p/q) (0 where p = 0).

    Fast path first: with every log p finite no entry needs a guard. A row with some p = 0
    (log p = -inf) comes out NaN from 0 * (-inf - log q); only such rows are redone with a guard.
    """
    p = lp.exp()
    log_ratio = lp - lq
    kl = _row_dot(p, log_ratio)
    bad = kl.isnan()
    if bad.any():
        fixed = log_ratio[bad].masked_fill_(torch.isneginf(lp[bad]), 0.0)
        log_ratio[bad] = fixed
        kl[bad] = _row_dot(p[bad], fixed)
    return kl, p, log_ratio


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) without a [n, V] temporary (a batched matrix product)."""
    return torch.einsum("nv,nv->n", a, b)


def _seeking_grad(p: torch.Tensor, log_ratio: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """d KL(S||Q) / d z with S = softmax(z) and Q fixed: s * (log(s/q) - KL). Reuses log_ratio."""
    return log_ratio.sub_(kl.unsqueeze(-1)).mul_(p)


def _forward_rows(s_lp: torch.Tensor, t_lp: torch.Tensor, want_grad: bool) -> LossGrad:
    kl, t, _ = _kl_rows(t_lp, s_lp)
    return kl, (s_lp.exp().sub_(t) if want_grad else None)


def _reverse_rows(s_lp: torch.Tensor, t_lp: torch.Tensor, want_grad: bool) -> LossGrad:
    kl, s, log_ratio = _kl_rows(s_lp, t_lp)
    return kl, (_seeking_grad(s, log_ratio, kl) if want_grad else None)


def _jsd_rows(s_lp: torch.Tensor, t_lp: torch.Tensor, want_grad: bool, *, beta: float) -> LossGrad:
    # d/dz of the JSD is (1 - beta) times the reverse-KL gradient with m in place of t.
    if beta == 0.0 or beta == 1.0:  # m equals s or t: the divergence is exactly 0
        zero = s_lp.new_zeros(s_lp.shape[0])
        return zero, (torch.zeros_like(s_lp) if want_grad else None)
    lm = torch.logaddexp(t_lp + math.log(beta), s_lp + math.log1p(-beta))
    kl_t, _, _ = _kl_rows(t_lp, lm)
    kl_s, s, log_ratio = _kl_rows(s_lp, lm)
    loss = beta * kl_t + (1.0 - beta) * kl_s
    return loss, (_seeking_grad(s, log_ratio, kl_s).mul_(1.0 - beta) if want_grad else None)


def _akl_rows(s_lp: torch.Tensor, t_lp: torch.Tensor, want_grad: bool, *, head_mass: float) -> LossGrad:
    fkl, t, _ = _kl_rows(t_lp, s_lp)
    rkl, s, log_ratio = _kl_rows(s_lp, t_lp)
    w_head = _head_share(t, s, head_mass).unsqueeze(-1)
    loss = (w_head * fkl.unsqueeze(-1) + (1.0 - w_head) * rkl.unsqueeze(-1)).squeeze(-1)
    if not want_grad:
        return loss, None
    grad = _seeking_grad(s, log_ratio, rkl).mul_(1.0 - w_head)
    return loss, grad.add_(s.sub(t).mul_(w_head))


def _head_share(t: torch.Tensor, s: torch.Tensor, head_mass: float) -> torch.Tensor:
    """g_head / (g_head + g_tail) per row (1/2 where both gaps are 0)."""
    gap = (t - s).abs_()
    total = gap.sum(-1)
    if head_mass > 0:
        head = t >= _head_threshold(t, head_mass).unsqueeze(-1)
        g_head = _row_dot(gap, head.to(gap.dtype))
    else:
        g_head = torch.zeros_like(total)
    return torch.where(total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)


def _head_threshold(t: torch.Tensor, head_mass: float) -> torch.Tensor:
    """Per row, the probability of the token at which the descending cumulative mass first
    reaches `head_mass`: the head is every token at least that likely (ties all in or all out).

    A confident teacher has its head in its top few tokens, so `topk` first; only rows whose
    top `HEAD_TOPK` tokens hold less than `head_mass` are sorted in full.
    """
    k = min(t.shape[-1], HEAD_TOPK)
    tau, found = _crossing(t.topk(k, dim=-1).values, head_mass)
    missing = ~found
    if k < t.shape[-1] and missing.any():
        tau[missing] = _crossing(t[missing].sort(dim=-1, descending=True).values, head_mass)[0]
    return tau


def _crossing(desc: torch.Tensor, head_mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(value where cumsum(desc) first reaches head_mass (else the last), whether it does)."""
    cum = desc.cumsum(-1)
    first = (cum < head_mass).sum(-1, keepdim=True).clamp_max(desc.shape[-1] - 1)
    return desc.gather(-1, first).squeeze(-1), cum[:, -1] >= head_mass


# ---------------------------------------------------------------- the chunked sweep


def _chunks(mask: torch.Tensor, step: int) -> Iterator[tuple[torch.Tensor, slice | None]]:
    """Masked positions in flattened [B*T] order, `step` at a time: (index, slice or None).

    The slice is set when the chunk's positions are consecutive (all of a response span), so
    its rows can be read and written as a view instead of gathered.
    """
    flat = mask.reshape(-1).nonzero().squeeze(-1)
    bounds = flat.cpu()
    for start in range(0, flat.numel(), step):
        idx = flat[start:start + step]
        lo, hi = int(bounds[start]), int(bounds[start + idx.numel() - 1])
        yield idx, (slice(lo, hi + 1) if hi - lo + 1 == idx.numel() else None)


def _read_rows(x: torch.Tensor, idx: torch.Tensor, span: slice | None) -> torch.Tensor:
    """Rows `idx` of x viewed as [B*T, V], without copying x (a view when `span` is set)."""
    if not x.is_contiguous():
        return x[idx // x.shape[1], idx % x.shape[1]]
    return x.view(-1, x.shape[-1])[span] if span is not None else x.view(-1, x.shape[-1]).index_select(0, idx)


def _write_rows(x: torch.Tensor, idx: torch.Tensor, span: slice | None, rows: torch.Tensor) -> None:
    if not x.is_contiguous():
        x[idx // x.shape[1], idx % x.shape[1]] = rows.to(x.dtype)
    elif span is not None:
        x.view(-1, x.shape[-1])[span].copy_(rows)
    else:
        x.view(-1, x.shape[-1]).index_copy_(0, idx, rows.to(x.dtype))


def _sweep(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, rows: RowFn,
           chunk_size: int | None, want_grad: bool, in_place: bool = False) -> LossGrad:
    """Per-token losses [B,T] (float32, 0 off the mask) and, if wanted, d sum / d student
    (written over `student` itself when `in_place`: each chunk is read before it is written).

    Autocast is off inside: a trainer's bf16 autocast must not turn the float32 sums into bf16.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        return _sweep_float32(student, teacher, mask, rows, chunk_size, want_grad, in_place)


def _sweep_float32(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, rows: RowFn,
                   chunk_size: int | None, want_grad: bool, in_place: bool) -> LossGrad:
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=student.device)
    grad = None
    if want_grad:  # every row written when every position is masked: no need to zero it first
        everything = bool(mask.all())
        grad = student if in_place else torch.empty_like(student) if everything else torch.zeros_like(student)
        if in_place and not everything:
            grad[~mask] = 0
    step = chunk_size or auto_chunk_tokens(student.shape[-1], student.device, BYTES_PER_ENTRY_LOGITS)
    for idx, span in _chunks(mask, step):
        t_logits = _read_rows(teacher, idx, span).float()
        s_logits = _read_rows(student, idx, span).float()
        if t_logits.amin(-1).isneginf().any():  # teacher -inf entries: outside the support
            s_logits = s_logits.masked_fill(t_logits.isneginf(), float("-inf"))
        loss, g = rows(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), want_grad)
        per_token.view(-1)[idx] = loss
        if want_grad:
            _write_rows(grad, idx, span, g)
    return per_token, grad


class _ChunkedTokenLoss(torch.autograd.Function):
    """Per-token losses [B,T] whose student gradient was computed in the forward sweep.

    In place, the student logits are overwritten by their gradient and returned, marked dirty,
    as a second output (so autograd knows; any other node that saved them fails loudly).
    """

    @staticmethod
    def forward(ctx, student, teacher, mask, rows, chunk_size, in_place):
        per_token, grad = _sweep(student, teacher, mask, rows, chunk_size, True, in_place)
        ctx.used = False
        ctx.set_materialize_grads(False)  # no [B,T,V] zeros for the overwritten logits' gradient
        if not in_place:
            ctx.grad = grad
            return per_token
        ctx.mark_dirty(student)
        ctx.save_for_backward(student)
        return per_token, student

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_per_token, *_ignored):
        if ctx.used:
            raise RuntimeError("backward through a paced distillation loss can run only once")
        ctx.used = True
        grad = ctx.saved_tensors[0] if ctx.saved_tensors else ctx.grad
        ctx.grad = None
        if grad_per_token is None:  # the losses were not used
            return None, None, None, None, None, None
        grad.mul_(grad_per_token.to(grad.dtype).unsqueeze(-1))
        return grad, None, None, None, None, None


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> None:
    if student.dim() != 3 or teacher.dim() != 3:
        raise InputError(
            "logits must be [batch, tokens, vocab]: got student "
            f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    if student.shape[-1] != teacher.shape[-1]:
        raise InputError(
            f"student vocab size {student.shape[-1]} != teacher vocab size {teacher.shape[-1]}: "
            "distillation needs one shared vocabulary; slice both logits to the shared tokenizer's "
            "size (or pad the smaller with -inf)",
            detail={"student_vocab": student.shape[-1], "teacher_vocab": teacher.shape[-1]},
        )
    if student.shape[:2] != teacher.shape[:2] or tuple(mask.shape) != tuple(student.shape[:2]):
        raise InputError(
            f"batch/token shapes differ: student {tuple(student.shape[:2])}, teacher "
            f"{tuple(teacher.shape[:2])}, mask {tuple(mask.shape)}"
        )
    if not student.is_floating_point() or not teacher.is_floating_point():
        raise InputError(f"logits must be floating point, got {student.dtype} and {teacher.dtype}")


def _per_sequence(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, rows: RowFn,
                  chunk_size: int | None, in_place: bool) -> torch.Tensor:
    """The shared body of every loss: check, sweep in chunks, average over each row's tokens."""
    _check_inputs(student, teacher, mask)
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}")
    mask = mask.to(device=student.device, dtype=torch.bool)
    teacher = teacher.detach()
    if torch.is_grad_enabled() and student.requires_grad:
        if in_place and (student.is_leaf or student._base is not None):
            raise InputError(
                "in_place=True needs student logits computed by a model, not a leaf tensor and "
                "not a view (e.g. logits[:, :-1]; torch cannot overwrite those here): pass the "
                "model's own output, or use in_place=False"
            )
        per_token = _ChunkedTokenLoss.apply(student, teacher, mask, rows, chunk_size, in_place)
        per_token = per_token[0] if in_place else per_token
    else:
        per_token, _ = _sweep(student, teacher, mask, rows, chunk_size, want_grad=False)
    return per_token.sum(-1) / mask.sum(-1).clamp_min(1)


# ---------------------------------------------------------------- public losses


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
               chunk_size: int | None = None, in_place: bool = False) -> torch.Tensor:
    """KL(teacher || student) per token, mean over each row's masked tokens: [B] float32.

    Every loss takes `chunk_size` (tokens per chunk; None: `paced.trainer.chunks` picks it from the
    vocabulary and the device's free memory) and `in_place`: when a gradient is computed, write
    it over the student logits instead of a new buffer, saving one [B,T,V] tensor (as Liger's
    fused cross-entropy does). The logits are then gone after this call: read what you need from them first.
    """
    return _per_sequence(student_logits, teacher_logits, mask, _forward_rows, chunk_size, in_place)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
               chunk_size: int | None = None, in_place: bool = False) -> torch.Tensor:
    """KL(student || teacher) per token, mean over each row's masked tokens: [B] float32."""
    return _per_sequence(student_logits, teacher_logits, mask, _reverse_rows, chunk_size, in_place)


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.5,
        chunk_size: int | None = None, in_place: bool = False) -> torch.Tensor:
    """Generalised JSD: beta KL(t||m) + (1-beta) KL(s||m), m = beta t + (1-beta) s. [B] float32.

    beta = 0.5 is the symmetric Jensen-Shannon divergence; beta = 0 and beta = 1 give exactly 0.
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise InputError(f"jsd beta must be in [0, 1], got {beta}")
    rows = functools.partial(_jsd_rows, beta=beta)
    return _per_sequence(student_logits, teacher_logits, mask, rows, chunk_size, in_place)


def akl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
        head_mass: float = 0.5, chunk_size: int | None = None, in_place: bool = False) -> torch.Tensor:
    """Adaptive KL (Wu et al., 2025): forward and reverse KL mixed by head/tail gaps. [B] float32."""
    head_mass = float(head_mass)
    if not 0.0 <= head_mass <= 1.0:
        raise InputError(f"akl head_mass must be in [0, 1], got {head_mass}")
    rows = functools.partial(_akl_rows, head_mass=head_mass)
    return _per_sequence(student_logits, teacher_logits, mask, rows, chunk_size, in_place)


# The registry is a dict from the name a config uses to the function.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "forward": forward_kl, "reverse": reverse_kl, "jsd": jsd, "akl": akl,
}


def row_function(loss: str, *, beta: float = 0.5, head_mass: float = 0.5) -> RowFn:
    """The per-token divergence of LOSSES[loss] as a `RowFn` (for `paced.trainer.fused`)."""
    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
    if loss == "jsd":
        if not 0.0 <= float(beta) <= 1.0:
            raise InputError(f"jsd beta must be in [0, 1], got {beta}")
        return functools.partial(_jsd_rows, beta=float(beta))
    if loss == "akl":
        if not 0.0 <= float(head_mass) <= 1.0:
            raise InputError(f"akl head_mass must be in [0, 1], got {head_mass}")
        return functools.partial(_akl_rows, head_mass=float(head_mass))
    return _forward_rows if loss == "forward" else _reverse_rows


@dataclass(frozen=True)
class BatchLoss:
    """A weighted batch loss.

    `loss`: the scalar sum_i w_i L_i / sum_i w_i to backpropagate, or None when `skipped`.
    `per_sequence`: L_i, detached [B] float32 (None when skipped: nothing was computed).
    `weight_sum`: sum_i w_i. `skipped`: every weight is 0, so there is nothing to learn from
    this batch; the trainer should skip the step (no backward, no optimizer step) and count it.
    """

    loss: torch.Tensor | None
    per_sequence: torch.Tensor | None
    weight_sum: float
    skipped: bool


def batch_weights(weights, batch: int, device) -> torch.Tensor:
    """The per-problem weights as a float32 [batch] tensor, or InputError (shape, sign, NaN)."""
    weights = torch.as_tensor(weights, dtype=torch.float32, device=device).detach()
    if weights.dim() != 1 or weights.shape[0] != batch:
        raise InputError(f"weights must be [batch] = [{batch}], got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise InputError(f"weights must be finite and >= 0, got {weights.tolist()}")
    return weights


def weighted_batch_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
    weights: Sequence[float] | torch.Tensor, loss: str = "forward",
    chunk_size: int | None = None, in_place: bool = False, **loss_kwargs,
) -> BatchLoss:
    """sum_i w_i L_i / sum_i w_i over the batch, L = LOSSES[loss]; skipped if all w_i are 0.

    `loss_kwargs` go to the loss (`beta=` for "jsd", `head_mass=` for "akl"); `chunk_size` and
    `in_place` as for `forward_kl`.
    """
    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
    weights = batch_weights(weights, student_logits.shape[0], student_logits.device)
    weight_sum = float(weights.sum())
    if weight_sum == 0.0:
        return BatchLoss(loss=None, per_sequence=None, weight_sum=0.0, skipped=True)
    per_seq = LOSSES[loss](
        student_logits, teacher_logits, mask, chunk_size=chunk_size, in_place=in_place, **loss_kwargs
    )
    value = (weights / weight_sum * per_seq).sum()  # normalised first: a subnormal sum cannot overflow 1/sum
    return BatchLoss(loss=value, per_sequence=per_seq.detach(), weight_sum=weight_sum, skipped=False)
