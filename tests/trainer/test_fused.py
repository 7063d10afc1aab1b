"""The fused head + loss against a float64 reference on the full logits: values and gradients of
the hidden states, head weight and bias; the chunk choice; that the logits never exist."""

from __future__ import annotations

import pytest
import torch
from test_losses import KWARGS, reference
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from paced.errors import InputError
from paced.trainer.chunks import CHUNK_BYTES_CAP, CHUNK_BYTES_CAP_FUSED, compute_chunk_tokens
from paced.trainer.fused import HeadInput, fused_batch_loss
from paced.trainer.losses import LOSSES, weighted_batch_loss

B, T, H, V, VT = 3, 7, 5, 13, 15  # the teacher's vocabulary is larger: the shared one is V


def make_inputs(seed: int, bias: bool = True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 1.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g)).to(dtype).requires_grad_() if bias else None
    h_t = torch.randn(B, T, H, generator=g).to(dtype)
    w_t = (torch.randn(VT, H, generator=g) * 1.5).to(dtype)
    b_t = torch.randn(VT, generator=g).to(dtype)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = False
    mask[-1] = False  # a row without response tokens
    weights = torch.tensor([0.5, 2.0, 1.0])
    return HeadInput(h, w, b), HeadInput(h_t, w_t, b_t), mask, weights


def ref_value_and_grads(name, student: HeadInput, teacher: HeadInput, mask, weights):
    """The batch loss from full float64 logits by autograd, and d/d (h, W, b)."""
    leaves = [x for x in (student.hidden, student.weight, student.bias) if x is not None]
    doubled = [x.detach().double().requires_grad_() for x in leaves]
    h, w = doubled[0], doubled[1]
    s = h @ w.T + (doubled[2] if len(doubled) == 3 else 0.0)
    t = (teacher.hidden.double() @ teacher.weight.double().T + teacher.bias.double())[..., :V]
    per_seq = reference(name, s, t, mask, **KWARGS[name])
    w64 = weights.double()
    loss = (w64 * per_seq).sum() / w64.sum()
    grads = torch.autograd.grad(loss, doubled)
    return loss.detach(), per_seq.detach(), grads


def fused_value_and_grads(name, student, teacher, mask, weights, **kw):
    for x in (student.hidden, student.weight, student.bias):
        if x is not None:
            x.grad = None
    out = fused_batch_loss(student, teacher, mask, weights, loss=name, **kw, **KWARGS[name])
    out.loss.backward()
    grads = [x.grad for x in (student.hidden, student.weight, student.bias) if x is not None]
    return out, grads


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_gradients_match_float64_reference(name, chunk_size, bias):
    student, teacher, mask, weights = make_inputs(seed=1, bias=bias)
    want, want_seq, want_grads = ref_value_and_grads(name, student, teacher, mask, weights)
    got, got_grads = fused_value_and_grads(name, student, teacher, mask, weights, chunk_size=chunk_size)
    assert_close(got.loss.double(), want, rtol=1e-5, atol=1e-6)
    assert_close(got.per_sequence.double(), want_seq, rtol=1e-5, atol=1e-6)
    assert got.weight_sum == pytest.approx(3.5) and not got.skipped
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g.double(), w, rtol=1e-4, atol=1e-6)
    assert not got_grads[0][:, 0].any() and not got_grads[0][-1].any()  # unmasked tokens: no gradient


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_teacher_logits_give_the_same_as_the_teacher_head(name):
    student, teacher, mask, weights = make_inputs(seed=2)
    by_head, grads_head = fused_value_and_grads(name, student, teacher, mask, weights, chunk_size=3)
    logits = teacher.hidden @ teacher.weight.T + teacher.bias
    by_logits, grads_logits = fused_value_and_grads(name, student, logits, mask, weights, chunk_size=3)
    assert_close(by_logits.loss, by_head.loss)
    for a, b in zip(grads_head, grads_logits, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_the_logits_path_and_a_scaled_backward(name):
    student, teacher, mask, weights = make_inputs(seed=3, bias=False)
    got, (g_h, g_w) = fused_value_and_grads(name, student, teacher, mask, weights)
    s = student.hidden @ student.weight.T
    t = (teacher.hidden @ teacher.weight.T + teacher.bias)[..., :V]
    student.hidden.grad = student.weight.grad = None
    logits = weighted_batch_loss(s, t, mask, weights, loss=name, **KWARGS[name])
    (logits.loss * 3.0).backward()  # the incoming gradient scales every input gradient
    assert_close(got.loss, logits.loss)
    assert_close(g_h * 3.0, student.hidden.grad, rtol=1e-4, atol=1e-6)
    assert_close(g_w * 3.0, student.weight.grad, rtol=1e-4, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_the_full_logits_never_exist():
    g = torch.Generator().manual_seed(4)
    tokens, hidden, vocab = 64, 8, 96
    student = HeadInput(torch.randn(2, tokens, hidden, generator=g, requires_grad=True),
                        torch.randn(vocab, hidden, generator=g, requires_grad=True))
    teacher = HeadInput(torch.randn(2, tokens, hidden, generator=g), torch.randn(vocab, hidden, generator=g))
    mask = torch.ones(2, tokens, dtype=torch.bool)
    with _LargestTensor() as seen:
        out = fused_batch_loss(student, teacher, mask, [1.0, 1.0], loss="akl", chunk_size=8)
        out.loss.backward()
    # the largest: one chunk of logits, the head's gradient or the hidden states; never all logits
    assert seen.largest == max(8 * vocab, vocab * hidden, 2 * tokens * hidden)
    assert seen.largest < 2 * tokens * vocab / 10


def test_no_grad_all_zero_weights_and_bad_inputs():
    student, teacher, mask, weights = make_inputs(seed=5)
    with torch.no_grad():
        out = fused_batch_loss(student, teacher, mask, weights, loss="jsd", beta=0.3)
    want, _, _ = ref_value_and_grads("jsd", student, teacher, mask, weights)
    assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    assert fused_batch_loss(student, teacher, mask, [0.0, 0.0, 0.0]).skipped
    with pytest.raises(InputError, match="unknown loss"):
        fused_batch_loss(student, teacher, mask, weights, loss="kl")
    with pytest.raises(InputError, match="beta"):
        fused_batch_loss(student, teacher, mask, weights, loss="jsd", beta=2.0)
    with pytest.raises(InputError, match="mask"):
        fused_batch_loss(student, teacher, mask[:, :3], weights)
    with pytest.raises(InputError, match="vocab must be"):
        fused_batch_loss(student, teacher, mask, weights, vocab=V + 1)
    with pytest.raises(InputError, match="weights must be"):
        fused_batch_loss(student, teacher, mask, [1.0, -1.0, 1.0])


def test_a_subnormal_weight_sum_gives_finite_gradients():
    student, teacher, mask, _ = make_inputs(seed=7)
    tiny = [0.0, 2.9e-39, 0.0]  # a float32 subnormal: 1 / sum would overflow
    got, grads = fused_value_and_grads("akl", student, teacher, mask, tiny)
    one_hot, want = fused_value_and_grads("akl", student, teacher, mask, [0.0, 1.0, 0.0])
    assert_close(got.loss, one_hot.loss)
    for g, w in zip(grads, want, strict=True):
        assert torch.isfinite(g).all()
        assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_bfloat16_under_autocast_stays_close_to_float64():
    student, teacher, mask, weights = make_inputs(seed=6)
    want, _, want_grads = ref_value_and_grads("forward", student, teacher, mask, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, grads = fused_value_and_grads("forward", student, teacher, mask, weights, chunk_size=4)
    assert grads[1].dtype == torch.float32  # float32 parameters keep float32 gradients
    assert_close(got.loss.double(), want, rtol=0.05, atol=0.02)
    assert_close(grads[1].double(), want_grads[1], rtol=0.1, atol=0.02)


def test_chunk_tokens_from_free_memory():
    assert compute_chunk_tokens(32768, None, 32) == 64  # the CPU: 2^21 entries
    assert compute_chunk_tokens(151_936, 100 * 2**30, 24) == CHUNK_BYTES_CAP // (151_936 * 24) == 294
    assert compute_chunk_tokens(151_936, 100 * 2**30, 32, CHUNK_BYTES_CAP_FUSED) == 110
    assert compute_chunk_tokens(151_936, 2**30, 24) == 2**28 // (151_936 * 24)  # a quarter of what is free
    assert compute_chunk_tokens(10**9, 2**20, 32) == 1
