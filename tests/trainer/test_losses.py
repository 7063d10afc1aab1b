"""The distillation losses against a naive full-tensor float64 reference: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from paced.errors import InputError
from paced.trainer.losses import (
    LOSSES,
    akl,
    forward_kl,
    jsd,
    reverse_kl,
    weighted_batch_loss,
)

NEG_INF = float("-inf")
KWARGS = {"forward": {}, "reverse": {}, "jsd": {"beta": 0.3}, "akl": {"head_mass": 0.5}}


# ---------------------------------------------------------------- the naive reference


def _ref_kl(lp, lq):
    """KL(P||Q) per row, float64 autograd, 0 log 0 = 0 (entries with p = 0 dropped)."""
    p = lp.exp()
    keep = p > 0
    return (p * (torch.where(keep, lp, 0.0) - torch.where(keep, lq, 0.0))).sum(-1)


def _ref_head(t, head_mass):
    """Head = tokens whose teacher mass strictly above them is < head_mass (O(V^2), no sort)."""
    above = (t.unsqueeze(-2) > t.unsqueeze(-1)).to(t.dtype)  # [.., j, k]: t_k > t_j
    return (above * t.unsqueeze(-2)).sum(-1) < head_mass


def reference(name, student, teacher, mask, **kw):
    """Per-sequence loss on the full [B,T,V] tensors in float64, differentiable by autograd."""
    s, t = student.double(), teacher.double()
    s = s.masked_fill(torch.isneginf(t), NEG_INF)  # the documented support rule
    slp, tlp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    if name == "forward":
        tok = _ref_kl(tlp, slp)
    elif name == "reverse":
        tok = _ref_kl(slp, tlp)
    elif name == "jsd":
        beta = kw["beta"]
        lm = torch.log(beta * tlp.exp() + (1 - beta) * slp.exp())
        tok = beta * _ref_kl(tlp, lm) + (1 - beta) * _ref_kl(slp, lm)
    else:
        tp, sp = tlp.exp(), slp.exp()
        head = _ref_head(tp, kw["head_mass"])
        gap = (tp - sp).abs().detach()
        g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
        total = g_head + g_tail
        w = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
        tok = w * _ref_kl(tlp, slp) + (1 - w) * _ref_kl(slp, tlp)
    m = mask.bool()
    return torch.stack([tok[b][m[b]].mean() if m[b].any() else tok.new_zeros(()) for b in range(len(m))])


def make_batch(seed, batch=3, tokens=7, vocab=11, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, tokens, vocab, generator=g) * scale).to(dtype).requires_grad_()
    teacher = (torch.randn(batch, tokens, vocab, generator=g) * scale).to(dtype)
    mask = torch.rand(batch, tokens, generator=g) < 0.7
    mask[:, 0] = False  # a prompt token
    mask[-1] = False  # a row with no response token at all
    return student, teacher, mask


def value_and_grad(fn, student, teacher, mask, upstream, **kw):
    student.grad = None
    per_seq = fn(student, teacher, mask, **kw)
    (per_seq * upstream).sum().backward()
    return per_seq.detach().double(), student.grad.double()


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_loss_and_gradient_match_naive_reference(name, chunk_size):
    student, teacher, mask = make_batch(seed=1)
    upstream = torch.tensor([0.5, 2.0, 1.0])
    got, got_grad = value_and_grad(
        LOSSES[name], student, teacher, mask, upstream, chunk_size=chunk_size, **KWARGS[name]
    )
    want, want_grad = _ref_value_and_grad(name, student, teacher, mask, upstream)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    assert got[-1] == 0 and not got_grad[-1].any()  # the row with no masked token
    assert not got_grad[:, 0].any()  # prompt tokens get no gradient


def _ref_value_and_grad(name, student, teacher, mask, upstream):
    student.grad = None
    per_seq = reference(name, student, teacher, mask, **KWARGS[name])
    (per_seq * upstream.double()).sum().backward()
    return per_seq.detach(), student.grad.double()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_reference_across_beta(beta):
    student, teacher, mask = make_batch(seed=2)
    upstream = torch.ones(3)
    got, got_grad = value_and_grad(jsd, student, teacher, mask, upstream, beta=beta, chunk_size=2)
    student.grad = None
    want = reference("jsd", student, teacher, mask, beta=beta)
    want.sum().backward()
    assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert_close(got_grad, student.grad.double(), rtol=1e-4, atol=1e-6)


def test_forward_and_reverse_kl_are_not_the_jsd_at_its_endpoints():
    student, teacher, mask = make_batch(seed=3)
    with torch.no_grad():
        fkl, rkl = forward_kl(student, teacher, mask), reverse_kl(student, teacher, mask)
        ends = [jsd(student, teacher, mask, beta=b) for b in (0.0, 1.0)]
    assert (fkl[:-1] > 0.1).all() and (rkl[:-1] > 0.1).all()
    for end in ends:  # the generalised JSD vanishes at beta = 0 and beta = 1
        assert not end.any()
        assert not torch.allclose(fkl[:-1], end[:-1]) and not torch.allclose(rkl[:-1], end[:-1])
    assert not torch.allclose(fkl, rkl)


def test_akl_mixes_by_head_and_tail_gaps_on_a_hand_example():
    t = torch.tensor([0.6, 0.3, 0.1]).log().view(1, 1, 3)  # head = {0}: 0.6 already >= 0.5
    s = torch.tensor([0.4, 0.3, 0.3]).log().view(1, 1, 3)
    mask = torch.ones(1, 1, dtype=torch.bool)
    g_head, g_tail = 0.2, 0.2
    fkl = 0.6 * math.log(0.6 / 0.4) + 0.1 * math.log(0.1 / 0.3)
    rkl = 0.4 * math.log(0.4 / 0.6) + 0.3 * math.log(0.3 / 0.1)
    want = g_head / (g_head + g_tail) * fkl + g_tail / (g_head + g_tail) * rkl
    assert akl(s, t, mask).item() == pytest.approx(want, rel=1e-5)
    # all mass in the head (head_mass=1) is forward KL; an empty head (0) is reverse KL
    assert akl(s, t, mask, head_mass=1.0).item() == pytest.approx(fkl, rel=1e-5)
    assert akl(s, t, mask, head_mass=0.0).item() == pytest.approx(rkl, rel=1e-5)


def test_akl_head_search_agrees_with_reference_for_peaked_and_flat_teachers():
    # vocab > HEAD_TOPK: peaked rows find their head among the top tokens, flat rows need a sort
    student, teacher, mask = make_batch(seed=17, batch=2, tokens=6, vocab=300, scale=1.0)
    teacher = teacher.clone()
    teacher[0] *= 8.0  # peaked: a few tokens hold half the mass
    upstream = torch.tensor([1.0, 2.0])
    mask[-1] = True
    got, got_grad = value_and_grad(akl, student, teacher, mask, upstream, chunk_size=4)
    want, want_grad = _ref_value_and_grad("akl", student, teacher, mask, upstream)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)


def test_akl_keeps_tied_teacher_tokens_together_and_is_zero_when_student_equals_teacher():
    t = torch.tensor([0.3, 0.3, 0.3, 0.1]).log().view(1, 1, 4)  # 0.5 is crossed inside a tie
    s = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().view(1, 1, 4)
    mask = torch.ones(1, 1, dtype=torch.bool)
    fkl = sum(a * math.log(a / b) for a, b in [(0.3, 0.1), (0.3, 0.2), (0.3, 0.3), (0.1, 0.4)])
    rkl = sum(b * math.log(b / a) for a, b in [(0.3, 0.1), (0.3, 0.2), (0.3, 0.3), (0.1, 0.4)])
    g_head, g_tail = 0.2 + 0.1 + 0.0, 0.3  # all three tied tokens are head
    want = (g_head * fkl + g_tail * rkl) / (g_head + g_tail)
    assert akl(s, t, mask).item() == pytest.approx(want, rel=1e-5)
    same = t.clone().requires_grad_()
    loss = akl(same, t, mask)
    loss.sum().backward()
    assert loss.item() == 0.0 and not same.grad.any()


# ---------------------------------------------------------------- padding, edges, dtypes


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_teacher_minus_inf_entries_are_padding_excluded_from_both_distributions(name):
    student, teacher, mask = make_batch(seed=4, vocab=9)
    padded = teacher.clone()
    padded[..., [2, 7]] = NEG_INF  # e.g. vocabulary padding the teacher can never emit
    upstream = torch.tensor([1.0, 3.0, 1.0])
    got, got_grad = value_and_grad(LOSSES[name], student, padded, mask, upstream, chunk_size=3,
                                   **KWARGS[name])
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    assert not got_grad[..., [2, 7]].any()
    # the same as the loss on the vocabulary without those entries
    keep = [i for i in range(9) if i not in (2, 7)]
    small = student.detach()[..., keep].clone().requires_grad_()
    want, want_grad = value_and_grad(LOSSES[name], small, teacher[..., keep], mask, upstream, **KWARGS[name])
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_close(got_grad[..., keep], want_grad, rtol=1e-5, atol=1e-6)


def test_student_minus_inf_where_teacher_has_mass_makes_forward_kl_infinite():
    student, teacher, mask = make_batch(seed=5)
    student = student.detach().clone()
    student[..., 0] = NEG_INF
    with torch.no_grad():
        assert torch.isinf(forward_kl(student, teacher, mask)[:-1]).all()
        assert torch.isfinite(reverse_kl(student, teacher, mask)).all()
        assert torch.isfinite(jsd(student, teacher, mask)).all()


def test_vocab_size_mismatch_is_an_input_error_naming_both_sizes():
    student, teacher, mask = make_batch(seed=6, vocab=11)
    with pytest.raises(InputError, match=r"student vocab size 11 != teacher vocab size 12"):
        forward_kl(student, torch.zeros(3, 7, 12), mask)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, t, m: forward_kl(s, t, m[:, :3]),
        lambda s, t, m: forward_kl(s[0], t[0], m[0]),
        lambda s, t, m: jsd(s, t, m, beta=1.5),
        lambda s, t, m: akl(s, t, m, head_mass=-0.1),
        lambda s, t, m: forward_kl(s, t, m, chunk_size=0),
        lambda s, t, m: weighted_batch_loss(s, t, m, torch.ones(3), loss="kl"),
        lambda s, t, m: weighted_batch_loss(s, t, m, torch.ones(2)),
        lambda s, t, m: weighted_batch_loss(s, t, m, torch.tensor([1.0, -1.0, 1.0])),
        lambda s, t, m: weighted_batch_loss(s, t, m, torch.tensor([1.0, math.nan, 1.0])),
    ],
)
def test_bad_arguments_are_input_errors(call):
    student, teacher, mask = make_batch(seed=7)
    with pytest.raises(InputError):
        call(student, teacher, mask)


def test_all_masked_batch_gives_zero_loss_and_zero_gradient():
    student, teacher, mask = make_batch(seed=8)
    got, grad = value_and_grad(forward_kl, student, teacher, torch.zeros_like(mask), torch.ones(3))
    assert not got.any() and not grad.any()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_logits_give_a_bf16_gradient_close_to_float32(name):
    student, teacher, mask = make_batch(seed=9, dtype=torch.bfloat16)
    upstream = torch.ones(3)
    got, got_grad = value_and_grad(LOSSES[name], student, teacher, mask, upstream, **KWARGS[name])
    assert student.grad.dtype == torch.bfloat16
    s32 = student.detach().float().requires_grad_()
    want, want_grad = value_and_grad(LOSSES[name], s32, teacher.float(), mask, upstream, **KWARGS[name])
    assert_close(got, want)  # the loss itself is computed in float32 in both cases
    assert_close(got_grad, want_grad, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_chunked_equals_unchunked_and_no_grad_path(name):
    student, teacher, mask = make_batch(seed=10, batch=4, tokens=9, vocab=13)
    mask[-1] = True
    upstream = torch.arange(1.0, 5.0)
    whole = value_and_grad(LOSSES[name], student, teacher, mask, upstream, chunk_size=10_000, **KWARGS[name])
    for chunk_size in (1, 2, 5, None):
        parts = value_and_grad(LOSSES[name], student, teacher, mask, upstream, chunk_size=chunk_size,
                               **KWARGS[name])
        assert_close(parts, whole, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert_close(LOSSES[name](student, teacher, mask, **KWARGS[name]).double(), whole[0])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_autocast_does_not_change_the_float32_computation(name):
    student, teacher, mask = make_batch(seed=20)
    upstream = torch.ones(3)
    want = value_and_grad(LOSSES[name], student, teacher, mask, upstream, **KWARGS[name])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as a bf16 trainer runs its step
        got = value_and_grad(LOSSES[name], student, teacher, mask, upstream, **KWARGS[name])
    assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("in_place", [False, True])
def test_non_contiguous_logits_work(in_place):
    leaf, teacher, mask = make_batch(seed=11, tokens=8)

    def inputs():
        if in_place:  # a model output laid out [T,B,V] in memory: non-contiguous, not a view
            return leaf.transpose(0, 1) * 1.0, teacher.transpose(0, 1), mask.transpose(0, 1)
        return (leaf * 1.0)[:, :-1], teacher[:, 1:], mask[:, 1:]  # the next-token shift: a view

    reference("forward", *inputs()).sum().backward()
    want, leaf.grad = leaf.grad.clone(), None
    student, t, m = inputs()
    assert not student.is_contiguous()
    forward_kl(student, t, m, chunk_size=3, in_place=in_place).sum().backward()
    assert_close(leaf.grad, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_gives_the_same_gradient_and_reuses_the_logits_storage(name, dtype):
    leaf, teacher, mask = make_batch(seed=18, dtype=dtype)
    upstream = torch.tensor([1.0, 0.5, 2.0])
    want, want_grad = value_and_grad(LOSSES[name], leaf, teacher, mask, upstream, chunk_size=4,
                                     **KWARGS[name])
    leaf.grad = None
    logits = leaf * 1.0  # as a model's output: not a leaf
    storage = logits.data_ptr()
    per_seq = LOSSES[name](logits, teacher, mask, chunk_size=4, in_place=True, **KWARGS[name])
    (per_seq * upstream).sum().backward()
    assert_close(per_seq.detach().double(), want)
    assert_close(leaf.grad.double(), want_grad, rtol=0, atol=0)  # the very same numbers
    assert logits.data_ptr() == storage and torch.equal(logits, leaf.grad)


def test_in_place_refuses_a_leaf_and_fails_loudly_if_the_logits_were_saved_elsewhere():
    leaf, teacher, mask = make_batch(seed=19)
    with pytest.raises(InputError, match="leaf"):
        forward_kl(leaf, teacher, mask, in_place=True)
    with pytest.raises(InputError, match="view"):
        forward_kl((leaf * 1.0)[:, 1:], teacher[:, 1:], mask[:, 1:], in_place=True)
    logits = leaf * 1.0
    other = (logits * logits).mean()  # saves the logits for its own backward
    loss = forward_kl(logits, teacher, mask, in_place=True).sum() + other
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_backward_twice_is_refused_rather_than_wrong():
    student, teacher, mask = make_batch(seed=12)
    loss = forward_kl(student, teacher, mask).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_teacher_gets_no_gradient():
    student, teacher, mask = make_batch(seed=13)
    teacher.requires_grad_()
    reverse_kl(student, teacher, mask).sum().backward()
    assert teacher.grad is None and student.grad is not None


# ---------------------------------------------------------------- weighted batches


@settings(max_examples=30, deadline=None)
@given(
    weights=st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=3, max_size=3),
    scale=st.floats(0.01, 100.0),
    name=st.sampled_from(sorted(LOSSES)),
)
def test_weighted_batch_loss_is_the_weighted_mean_and_scale_free(weights, scale, name):
    student, teacher, mask = make_batch(seed=14)
    mask[-1, 2:] = True
    w = torch.tensor(weights)
    out = weighted_batch_loss(student, teacher, mask, w, loss=name, chunk_size=4, **KWARGS[name])
    if w.sum() == 0:  # (weights that round to 0 in float32 count as 0)
        assert out.skipped and out.loss is None
        return
    per_seq = LOSSES[name](student, teacher, mask, **KWARGS[name]).detach()
    assert_close(out.per_sequence, per_seq)
    assert_close(out.loss.detach(), (w * per_seq).sum() / w.sum())
    scaled = weighted_batch_loss(student, teacher, mask, w * scale, loss=name, **KWARGS[name])
    assert_close(scaled.loss.detach(), out.loss.detach())
    out.loss.backward()
    grad = student.grad.clone()
    student.grad = None
    scaled.loss.backward()
    assert_close(student.grad, grad, rtol=1e-4, atol=1e-7)
    student.grad = None


def test_one_hot_weights_select_one_sequence_and_zero_the_others_gradient():
    student, teacher, mask = make_batch(seed=15)
    out = weighted_batch_loss(student, teacher, mask, torch.tensor([0.0, 2.5, 0.0]), loss="reverse")
    assert_close(out.loss.detach(), out.per_sequence[1])
    out.loss.backward()
    assert student.grad[1].any() and not student.grad[0].any()


def test_all_zero_weights_skip_the_batch_without_computing_it():
    student, teacher, mask = make_batch(seed=16)
    out = weighted_batch_loss(student, teacher, mask, torch.zeros(3), loss="akl")
    assert out.skipped and out.loss is None and out.per_sequence is None and out.weight_sum == 0.0
    assert student.grad is None


# ---------------------------------------------------------------- the built-in tiny models


def test_losses_train_the_tiny_model_like_the_reference():
    from paced.tasks.models import ModelSize, build_tokenizer, init_model

    tok = build_tokenizer()
    size = ModelSize(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64)
    student, teacher = init_model(tok, size, seed=0), init_model(tok, size, seed=1)
    batch = tok(["12+345=357", "7+8=15"], padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool() & (torch.arange(batch["input_ids"].shape[1]) >= 4)
    with torch.no_grad():
        t_logits = teacher(**batch).logits
    grads = []
    for fn in (
        lambda s: reference("akl", s, t_logits, mask, head_mass=0.5),
        lambda s: akl(s, t_logits, mask, chunk_size=3),
        lambda s: akl(s, t_logits, mask, in_place=True),
    ):
        student.zero_grad()
        fn(student(**batch).logits).mean().backward()
        grads.append(student.model.embed_tokens.weight.grad.clone())
    assert t_logits.shape[-1] == len(tok)
    for grad in grads[1:]:
        assert_close(grad, grads[0].float(), rtol=1e-4, atol=1e-6)
