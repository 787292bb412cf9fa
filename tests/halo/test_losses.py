"""The fused chunked losses equal the plain ones built on full logits: values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from halo.losses import (IGNORE_INDEX, chunked_token_stats, fused_linear_cross_entropy, fused_linear_kl)


def _inputs(seed, num_tokens, dim, vocab, teacher_dim=None):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=generator, dtype=torch.float64).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator, dtype=torch.float64) * 0.5).requires_grad_()
    teacher_dim = teacher_dim or dim
    teacher_hidden = torch.randn(num_tokens, teacher_dim, generator=generator, dtype=torch.float64)
    teacher_weight = torch.randn(vocab, teacher_dim, generator=generator, dtype=torch.float64) * 0.5
    return hidden, weight, teacher_hidden, teacher_weight, generator


def _assert_close(actual, expected, name):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=2e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


@given(seed=st.integers(0, 2**16), num_tokens=st.integers(1, 37), dim=st.integers(1, 12),
       vocab=st.integers(2, 50), chunk=st.integers(1, 40), ignore_share=st.floats(0.0, 0.7))
def test_fused_cross_entropy_matches_plain(seed, num_tokens, dim, vocab, chunk, ignore_share):
    hidden, weight, _, _, generator = _inputs(seed, num_tokens, dim, vocab)
    labels = torch.randint(0, vocab, (num_tokens,), generator=generator)
    labels[torch.rand(num_tokens, generator=generator) < ignore_share] = IGNORE_INDEX
    upstream = 1.7  # a non-unit incoming gradient checks that backward scales

    fused = fused_linear_cross_entropy(hidden.float(), weight.float(), labels, chunk_size=chunk)
    grad_h, grad_w = torch.autograd.grad(fused * upstream, (hidden, weight))

    valid = labels != IGNORE_INDEX
    plain = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX, reduction="sum") / valid.sum().clamp(min=1)
    ref_h, ref_w = torch.autograd.grad(plain * upstream, (hidden, weight))
    _assert_close(fused, plain, "loss")
    _assert_close(grad_h, ref_h, "grad hidden")
    _assert_close(grad_w, ref_w, "grad weight")


@given(seed=st.integers(0, 2**16), num_tokens=st.integers(1, 37), dim=st.integers(1, 12),
       teacher_dim=st.integers(1, 12), vocab=st.integers(2, 50), chunk=st.integers(1, 40),
       use_logits=st.booleans(), use_mask=st.booleans())
def test_fused_kl_matches_plain(seed, num_tokens, dim, teacher_dim, vocab, chunk, use_logits, use_mask):
    hidden, weight, teacher_hidden, teacher_weight, generator = _inputs(seed, num_tokens, dim, vocab, teacher_dim)
    mask = (torch.rand(num_tokens, generator=generator) < 0.7) if use_mask else None
    teacher_logits = teacher_hidden @ teacher_weight.T
    if use_logits:
        teacher_args = {"teacher_logits": teacher_logits.float()}
    else:
        teacher_args = {"teacher_hidden": teacher_hidden.float(), "teacher_weight": teacher_weight.float()}
    upstream = 0.6

    fused = fused_linear_kl(hidden.float(), weight.float(), mask=mask, chunk_size=chunk, **teacher_args)
    grad_h, grad_w = torch.autograd.grad(fused * upstream, (hidden, weight))

    log_p = torch.log_softmax(teacher_logits, -1)
    log_q = torch.log_softmax(hidden @ weight.T, -1)
    token_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    keep = mask if mask is not None else torch.ones(num_tokens, dtype=torch.bool)
    plain = (token_kl * keep).sum() / keep.sum().clamp(min=1)
    ref_h, ref_w = torch.autograd.grad(plain * upstream, (hidden, weight))
    _assert_close(fused, plain, "kl")
    _assert_close(grad_h, ref_h, "grad hidden")
    _assert_close(grad_w, ref_w, "grad weight")


def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    hidden, weight, *_ = _inputs(0, 20, 8, 30)
    same = fused_linear_kl(hidden.float(), weight.float(), teacher_hidden=hidden.float().detach(),
                           teacher_weight=weight.float().detach(), chunk_size=7)
    assert abs(float(same.detach())) < 1e-6
    other = fused_linear_kl(hidden.float(), weight.float(), teacher_hidden=hidden.float().detach() * -1,
                            teacher_weight=weight.float().detach(), chunk_size=7)
    assert float(other.detach()) > 0.01


def test_bf16_inputs_give_gradients_in_their_dtype():
    hidden, weight, *_ = _inputs(1, 16, 8, 20)
    h16 = hidden.detach().bfloat16().requires_grad_()
    labels = torch.randint(0, 20, (16,))
    loss = fused_linear_cross_entropy(h16, weight.float().detach().requires_grad_(), labels, chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32 and h16.grad.dtype == torch.bfloat16
    assert torch.isfinite(h16.grad.float()).all()


def test_token_stats_match_plain():
    hidden, weight, *_ = _inputs(2, 25, 6, 40)
    labels = torch.randint(0, 40, (25,))
    labels[3] = IGNORE_INDEX
    nll, correct, valid = chunked_token_stats(hidden.float(), weight.float(), labels, chunk_size=6)
    logits = (hidden @ weight.T).detach()
    ref = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * (labels != IGNORE_INDEX)
    _assert_close(nll, ref, "nll")
    assert torch.equal(correct, (logits.argmax(-1) == labels) & (labels != IGNORE_INDEX))
    assert valid.sum() == 24


@pytest.mark.parametrize("teacher_args, match", [
    (dict(teacher_hidden=torch.zeros(5, 4), teacher_weight=torch.zeros(10, 4), chunk_size=0), "chunk_size"),
    (dict(teacher_logits=torch.zeros(5, 9)), "teacher_logits"),
    (dict(teacher_hidden=torch.zeros(5, 4)), "teacher_weight"),
    (dict(teacher_logits=torch.zeros(5, 10), teacher_hidden=torch.zeros(5, 4)), "not both"),
    (dict(teacher_logits=torch.zeros(5, 10), mask=torch.ones(5)), "mask"),
])
def test_bad_kl_arguments_raise(teacher_args, match):
    with pytest.raises(ValueError, match=match):
        fused_linear_kl(torch.zeros(5, 4), torch.zeros(10, 4), **teacher_args)


def test_bad_cross_entropy_labels_raise():
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(torch.zeros(5, 4), torch.zeros(10, 4), torch.zeros(4, dtype=torch.long))
