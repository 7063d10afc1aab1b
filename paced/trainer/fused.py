"""The LM head fused with the distillation loss: the [tokens, vocab] logits never exist.

`fused_batch_loss(student, teacher, mask, weights, loss)` takes the student's last hidden
states and LM head (`HeadInput`: hidden [B,T,H], weight [V,H], optional bias [V]) and the
teacher's (a `HeadInput` too, or its logits [B,T,V]), and returns the same `BatchLoss` as
`losses.weighted_batch_loss` on the logits would: sum_i w_i L_i / sum_i w_i, L_i the mean
per-token divergence over row i's masked tokens. The divergences are the row functions of
`losses.py` (forward KL, reverse KL, JSD(beta), AKL): the same float32 log-softmax maths, the
same -inf support rule.

How. The masked positions are taken `chunk_size` tokens at a time (default: `chunks.py` from
the vocabulary and the free device memory). For one chunk: student logits = h W^T (+ b) in the
compute dtype (bf16 under the trainer's autocast, else the inputs' dtype), the teacher's the
same way (or its logits rows), both cast to float32; the row function gives the per-token loss
and d loss / d logits G [n, V] (analytic, as in `losses.py`); G is scaled by each token's
weight w_i / (n_i sum w) and turned at once into the gradients of the inputs: grad_h = G W
(written into the chunk's rows) and grad_W += G^T h (accumulated), grad_b += sum G. Then the
chunk's [n, V] tensors are freed. Memory: one chunk of logits temporaries plus grad_W, the
usual fused-linear-cross-entropy trick (Liger-Kernel's fused linear JSD does the same for
JSD). Backward only scales the stored gradients by the incoming one; it may run once.

Vocabulary: the shared vocabulary is the smaller of the two heads' (`vocab=` to choose); head
rows beyond it get no gradient, as `losses.py`'s slicing of the logits gives.

In the trainer, `fused_micro_batch` runs both models with `output_hidden_states=True` and
`logits_to_keep=1` (the model computes logits for one position only), checks that the head
applied to the last hidden state reproduces the model's own last logits (a model that scales or
soft-caps its logits fails with a clear error: use --loss-path logits), and calls
`fused_batch_loss`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from paced.errors import InputError
from paced.trainer.chunks import BYTES_PER_ENTRY_FUSED, CHUNK_BYTES_CAP_FUSED, auto_chunk_tokens
from paced.trainer.losses import LOSSES, BatchLoss, RowFn, batch_weights, row_function


@dataclass(frozen=True)
class HeadInput:
    """Last hidden states [B,T,H] and the LM head that turns them into logits: h W^T + b."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True)
class _Plan:
    """What the sweep needs besides the student tensors (non-tensor arguments of the Function)."""

    teacher_rows: Callable[[int, int], torch.Tensor]  # (lo, hi) -> float32 teacher logits [n, vocab]
    rows: RowFn
    step: int
    vocab: int
    dtype: torch.dtype  # compute dtype of the head matmuls


# ---------------------------------------------------------------- the sweep


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b; in one addmm when the dtypes agree, else through a temporary in a's dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


def _sweep(hidden, weight, bias, token_w, plan: _Plan, want: tuple[bool, bool, bool]):
    """Per-token losses [n] float32 and, where `want` says, (grad_hidden, grad_weight, grad_bias)
    of sum_n token_w[n] loss[n]. Autocast is off inside: the float32 sums stay float32."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _sweep_chunks(hidden, weight, bias, token_w, plan, want)


def _sweep_chunks(hidden, weight, bias, token_w, plan, want):
    vocab, n = plan.vocab, hidden.shape[0]
    w = weight.detach()[:vocab].to(plan.dtype)
    b = bias.detach()[:vocab].to(plan.dtype) if bias is not None else None
    per_token = torch.empty(n, dtype=torch.float32, device=hidden.device)
    g_h = torch.empty_like(hidden) if want[0] else None
    g_w = torch.zeros_like(weight) if want[1] else None
    g_b = torch.zeros_like(bias) if want[2] and bias is not None else None
    any_grad = any(want)
    for lo in range(0, n, plan.step):
        hi = min(n, lo + plan.step)
        h = hidden.detach()[lo:hi].to(plan.dtype)
        s_logits = F.linear(h, w, b).float()
        t_logits = plan.teacher_rows(lo, hi)
        if t_logits.amin(-1).isneginf().any():  # teacher -inf entries: outside the support
            s_logits = s_logits.masked_fill(t_logits.isneginf(), float("-inf"))
        s_lp = F.log_softmax(s_logits, -1)
        del s_logits  # each [n, V] temporary freed as soon as it is used: the chunk's peak is lower
        t_lp = F.log_softmax(t_logits, -1)
        del t_logits
        loss, g = plan.rows(s_lp, t_lp, any_grad)
        del s_lp, t_lp
        per_token[lo:hi] = loss
        if not any_grad:
            continue
        g = g.mul_(token_w[lo:hi].unsqueeze(-1))
        if g_b is not None:
            g_b[:vocab] += g.sum(0).to(g_b.dtype)
        g = g.to(plan.dtype)
        if g_h is not None:
            g_h[lo:hi] = g @ w
        if g_w is not None:
            _accumulate(g_w[:vocab], g.T, h)
        del g, h
    return per_token, (g_h, g_w, g_b)


class _FusedHeadLoss(torch.autograd.Function):
    """(sum_n token_w[n] loss[n], per-token losses): the gradients are computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_w, plan):
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        per_token, grads = _sweep(hidden, weight, bias, token_w, plan, want)
        ctx.grads, ctx.used = grads, False
        ctx.mark_non_differentiable(per_token)
        return (per_token * token_w).sum(), per_token

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_per_token):
        if ctx.used:
            raise RuntimeError("backward through a paced fused distillation loss can run only once")
        ctx.used = True
        grads, ctx.grads = ctx.grads, None
        if grad_loss is None:
            return None, None, None, None, None
        scaled = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in grads]
        return scaled[0], scaled[1], scaled[2], None, None


# ---------------------------------------------------------------- the public loss


def _check(student: HeadInput, teacher, mask, vocab: int | None) -> int:
    h = student.hidden
    if h.dim() != 3 or student.weight.dim() != 2 or h.shape[-1] != student.weight.shape[1]:
        raise InputError(f"student hidden must be [batch, tokens, H] and its head weight [vocab, H]: got "
                         f"{tuple(h.shape)} and {tuple(student.weight.shape)}")
    if tuple(mask.shape) != tuple(h.shape[:2]):
        raise InputError(f"mask {tuple(mask.shape)} does not match the student's [batch, tokens] "
                         f"{tuple(h.shape[:2])}")
    t_shape = teacher.hidden.shape if isinstance(teacher, HeadInput) else teacher.shape
    t_vocab = teacher.vocab if isinstance(teacher, HeadInput) else teacher.shape[-1]
    if len(t_shape) != 3 or tuple(t_shape[:2]) != tuple(h.shape[:2]):
        raise InputError(f"teacher input {tuple(t_shape)} does not match the student's [batch, tokens] "
                         f"{tuple(h.shape[:2])}")
    shared = min(student.vocab, t_vocab)
    if vocab is not None and not 1 <= vocab <= shared:
        raise InputError(f"vocab must be in [1, {shared}] (the smaller of the two vocabularies), got {vocab}")
    return vocab or shared


def _teacher_rows(teacher, flat_index: torch.Tensor, vocab: int, dtype: torch.dtype):
    """(lo, hi) -> the teacher's float32 logits of masked tokens lo..hi-1, one chunk at a time."""
    if isinstance(teacher, HeadInput):
        h = teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1])
        w = teacher.weight.detach()[:vocab].to(dtype)
        b = teacher.bias.detach()[:vocab].to(dtype) if teacher.bias is not None else None
        return lambda lo, hi: F.linear(h.index_select(0, flat_index[lo:hi]).to(dtype), w, b).float()
    logits = teacher.detach().reshape(-1, teacher.shape[-1])
    return lambda lo, hi: logits.index_select(0, flat_index[lo:hi])[:, :vocab].float()


def _compute_dtype(student: HeadInput) -> torch.dtype:
    device = student.hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(student.hidden.dtype, student.weight.dtype)


def fused_batch_loss(student: HeadInput, teacher: HeadInput | torch.Tensor, mask, weights,
                     loss: str = "forward", chunk_size: int | None = None, vocab: int | None = None,
                     **loss_kwargs) -> BatchLoss:
    """sum_i w_i L_i / sum_i w_i from hidden states and heads (see the module docstring).

    `teacher`: a HeadInput, or the teacher's logits [B,T,V] (read one chunk of rows at a time).
    `loss_kwargs`: `beta=` for "jsd", `head_mass=` for "akl". `chunk_size`: tokens per chunk."""
    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}")
    rows = row_function(loss, **loss_kwargs)
    vocab = _check(student, teacher, mask, vocab)
    hidden = student.hidden
    weights = batch_weights(weights, hidden.shape[0], hidden.device)
    weight_sum = float(weights.sum())
    if weight_sum == 0.0:
        return BatchLoss(loss=None, per_sequence=None, weight_sum=0.0, skipped=True)
    mask = mask.to(device=hidden.device, dtype=torch.bool)
    flat = mask.reshape(-1).nonzero().squeeze(-1)
    row_of = flat // mask.shape[1]
    counts = mask.sum(-1)
    token_w = (weights / weight_sum / counts.clamp_min(1))[row_of]  # normalised first (subnormal weights)
    dtype = _compute_dtype(student)
    step = chunk_size or auto_chunk_tokens(vocab, hidden.device, BYTES_PER_ENTRY_FUSED, CHUNK_BYTES_CAP_FUSED)
    plan = _Plan(_teacher_rows(teacher, flat, vocab, dtype), rows, step, vocab, dtype)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
    tracked = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (picked, student.weight, student.bias))
    if tracked:
        value, per_token = _FusedHeadLoss.apply(picked, student.weight, student.bias, token_w, plan)
    else:
        per_token, _ = _sweep(picked, student.weight, student.bias, token_w, plan, (False, False, False))
        value = (per_token * token_w).sum()
    per_seq = torch.zeros(mask.shape[0], dtype=torch.float32, device=hidden.device)
    per_seq.index_add_(0, row_of, per_token.detach()).div_(counts.clamp_min(1))
    return BatchLoss(loss=value, per_sequence=per_seq, weight_sum=weight_sum, skipped=False)


# ---------------------------------------------------------------- the trainer's side


def head_of(model) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [V,H], bias or None) of a model's LM head (HF: get_output_embeddings()), or None
    when the model does not expose one or cannot compute logits for one position only."""
    model = getattr(model, "module", model)
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    return weight, getattr(layer, "bias", None)


def aligned_head_input(model, side) -> HeadInput:
    """The last hidden states predicting each completion token, lined up like `side.mask`, and
    the model's head; the model computes logits for its last position only (a check, below)."""
    out = model(input_ids=side.input_ids, attention_mask=side.attention_mask, use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    head = head_of(model)  # after the forward: a sharded (FSDP) model holds its whole weights now
    if head is None:
        raise InputError(f"{type(getattr(model, 'module', model)).__name__} exposes no LM head the fused "
                         "loss can use (get_output_embeddings() and logits_to_keep): use --loss-path logits")
    hidden = out.hidden_states[-1]
    _check_head(hidden[:, -1], head, out.logits[:, -1])
    index = side.index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return HeadInput(hidden.gather(1, index), *head)


def _check_head(last_hidden, head, last_logits) -> None:
    """The head on the last hidden state must give the model's own logits (no scaling/capping)."""
    with torch.no_grad():
        mine = F.linear(last_hidden, head[0].to(last_hidden.dtype),
                        None if head[1] is None else head[1].to(last_hidden.dtype)).float()
        theirs = last_logits.float()
        scale = theirs.abs().max().clamp_min(1.0)
        if not bool((mine - theirs).abs().max() <= 0.02 * scale):
            raise InputError("the model's logits are not its LM head applied to its last hidden state "
                             "(scaled or soft-capped logits?): the fused loss cannot reproduce them; "
                             "use --loss-path logits")


def fused_micro_batch(trainee, encoded, weights: list[float], loss: str, vocab: int):
    """The trainer's micro-batch loss on the fused path: (BatchLoss or None, tokens, the tensor to
    backpropagate). `trainee` is the trainer's Trainee, `encoded` the student side then (if it differs)
    the teacher side. A batch without weight gives a zero that still touches the head and the
    hidden states, so DDP's all-reduce covers every parameter on this process too."""
    config = trainee.config
    with trainee.runtime.autocast():
        with torch.no_grad():
            teacher = aligned_head_input(trainee.teacher, encoded[-1])
        student = aligned_head_input(trainee.student, encoded[0])
        if not any(w > 0 for w in weights):
            zero = student.hidden.sum() * 0.0 + student.weight.sum() * 0.0
            return None, 0, zero + (student.bias.sum() * 0.0 if student.bias is not None else 0.0)
        result = fused_batch_loss(student, teacher, encoded[0].mask, weights, loss=loss, vocab=vocab,
                                  chunk_size=config.loss_chunk_size, **config.loss_kwargs(loss))
    return result, int(encoded[0].mask.sum()), result.loss
