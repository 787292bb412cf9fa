"""The fused chunked losses equal the plain ones built on full logits: values and gradients."""

from functools import partial

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


def _assert_close_to_scale(actual, expected, name, share):
    """Every element within ``share`` of the largest magnitude in ``expected``."""
    expected = expected.detach().double()
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=share * float(expected.abs().max()),
                               msg=lambda m: f"{name}: {m}")


def _bf16_grid(generator, shape, scale):
    """float32 values +-scale * (1 + k/128) plus noise under half a bfloat16 step, ``scale`` a power of two.

    Rounding to bfloat16 takes the noise off, so the bfloat16 path multiplies other values than the float32
    one. The rounded values have 8 significant bits on one grid per tensor, so their products sum exactly in
    float32 in any order (for d up to 256): a reference's float32 logits are bitwise those of the fused loop,
    and the two round the same float32 gradient of the logits to bfloat16.
    """
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    grid = 1 + torch.randint(0, 128, shape, generator=generator) / 128
    noise = (torch.rand(shape, generator=generator) - 0.5) * 2**-9
    return ((grid + noise) * sign * scale).float()


def _bf16(tensor):
    return tensor.bfloat16().float()


def _bf16_logits(hidden, weight):
    """float32 logits of the bfloat16-rounded operands (exact for ``_bf16_grid`` inputs)."""
    return (_bf16(hidden).double() @ _bf16(weight).double().T).float()


def _cross_entropy_terms(logits, labels):
    """Summed token cross entropy and its float32 gradient w.r.t. the logits, as the fused loop computes them."""
    valid = labels != IGNORE_INDEX
    targets = labels.clamp(min=0)
    log_normalizer = torch.logsumexp(logits, dim=-1)
    loss_sum = ((log_normalizer - logits.gather(1, targets[:, None]).squeeze(1)) * valid).sum()
    grad_logits = ((logits - log_normalizer[:, None]).exp() - F.one_hot(targets, logits.shape[1])) * valid[:, None]
    return loss_sum, grad_logits


def _kl_terms(logits, teacher_logits, keep):
    """Summed token KL(p_teacher || p_student) and its float32 gradient w.r.t. the student logits, as the fused loop
    computes them."""
    student_log_probs = torch.log_softmax(logits, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits, dim=-1)
    teacher_probs = teacher_log_probs.exp()
    loss_sum = (torch.linalg.vecdot(teacher_probs, teacher_log_probs - student_log_probs) * keep).sum()
    return loss_sum, (student_log_probs.exp() - teacher_probs) * keep[:, None]


def _bf16_reference(hidden, weight, terms, count, upstream):
    """The bfloat16 path without chunks: float32 logits of bfloat16-rounded operands, the float32 loss and logits
    gradient from ``terms``, and that gradient rounded to bfloat16 for the two gradient products.

    Returns (loss, grad hidden, grad weight) of ``loss * upstream``, the loss a mean over ``count`` tokens.
    """
    loss_sum, grad_logits = terms(_bf16_logits(hidden, weight))
    grad_logits = _bf16(grad_logits).double() * (upstream / count)
    return loss_sum / count, grad_logits @ _bf16(weight).double(), grad_logits.T @ _bf16(hidden).double()


def _loss_and_grads(loss_fn, hidden, weight, upstream):
    loss = loss_fn(hidden, weight)
    return (loss, *torch.autograd.grad(loss * upstream, (hidden, weight)))


def _check_bf16_path(loss_fn, hidden, weight, reference, upstream):
    """Under CPU bfloat16 autocast the fused loss and gradients equal ``reference`` tightly (which they would not
    in float32) and the float32 ones to within a few bfloat16 steps of the largest element."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _loss_and_grads(loss_fn, hidden, weight, upstream)
    high = _loss_and_grads(loss_fn, hidden, weight, upstream)
    for name, actual, fp32, expected in zip(("loss", "grad hidden", "grad weight"), low, high, reference):
        _assert_close(actual, expected, name)
        _assert_close_to_scale(actual, fp32, name, share=2**-4)


def _partial_last_chunk(chunk, full_chunks, remainder):
    """A token count that ``chunk`` does not divide."""
    return chunk * full_chunks + 1 + remainder % (chunk - 1)


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


@given(seed=st.integers(0, 2**16), chunk=st.integers(2, 16), full_chunks=st.integers(0, 2),
       remainder=st.integers(0, 14), dim=st.integers(4, 12), vocab=st.integers(8, 50), ignore_share=st.floats(0.0, 0.7))
def test_fused_cross_entropy_under_bf16_autocast(seed, chunk, full_chunks, remainder, dim, vocab, ignore_share):
    num_tokens = _partial_last_chunk(chunk, full_chunks, remainder)
    generator = torch.Generator().manual_seed(seed)
    hidden = _bf16_grid(generator, (num_tokens, dim), 1.0).requires_grad_()
    weight = _bf16_grid(generator, (vocab, dim), 2**-2).requires_grad_()
    labels = torch.randint(0, vocab, (num_tokens,), generator=generator)
    labels[1:][torch.rand(num_tokens - 1, generator=generator) < ignore_share] = IGNORE_INDEX  # token 0 counts
    upstream = 1.7
    count = (labels != IGNORE_INDEX).sum()
    reference = _bf16_reference(hidden.detach(), weight.detach(), partial(_cross_entropy_terms, labels=labels), count,
                                upstream)
    _check_bf16_path(partial(fused_linear_cross_entropy, labels=labels, chunk_size=chunk), hidden, weight, reference,
                     upstream)


@given(seed=st.integers(0, 2**16), chunk=st.integers(2, 16), full_chunks=st.integers(0, 2),
       remainder=st.integers(0, 14), dim=st.integers(4, 12), teacher_dim=st.integers(4, 12),
       vocab=st.integers(8, 50), use_logits=st.booleans(), use_mask=st.booleans())
def test_fused_kl_under_bf16_autocast(seed, chunk, full_chunks, remainder, dim, teacher_dim, vocab, use_logits,
                                      use_mask):
    num_tokens = _partial_last_chunk(chunk, full_chunks, remainder)
    generator = torch.Generator().manual_seed(seed)
    hidden = _bf16_grid(generator, (num_tokens, dim), 1.0).requires_grad_()
    weight = _bf16_grid(generator, (vocab, dim), 2**-2).requires_grad_()
    teacher_hidden = _bf16_grid(generator, (num_tokens, teacher_dim), 1.0)
    teacher_weight = _bf16_grid(generator, (vocab, teacher_dim), 2**-2)
    mask = torch.rand(num_tokens, generator=generator) < 0.7 if use_mask else None
    keep = mask if mask is not None else torch.ones(num_tokens, dtype=torch.bool)
    if use_logits:  # given logits are used as they are, not rounded
        teacher_logits = torch.randn(num_tokens, vocab, generator=generator)
        teacher_args = {"teacher_logits": teacher_logits}
    else:
        teacher_logits = _bf16_logits(teacher_hidden, teacher_weight)
        teacher_args = {"teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight}
    upstream = 0.6
    reference = _bf16_reference(hidden.detach(), weight.detach(),
                                partial(_kl_terms, teacher_logits=teacher_logits, keep=keep), keep.sum().clamp(min=1),
                                upstream)
    _check_bf16_path(partial(fused_linear_kl, mask=mask, chunk_size=chunk, **teacher_args), hidden, weight, reference,
                     upstream)


@pytest.mark.cuda
@pytest.mark.parametrize("loss_kind", ["kl_teacher_hidden", "kl_teacher_logits", "cross_entropy"])
def test_cuda_bf16_autocast_matches_reference(loss_kind):
    """The CUDA path (bfloat16 operands, float32 output) against the reference, on the device with HALO's dtypes:
    float32 student hidden states and master lm_head weight, bfloat16 teacher hidden states and weight."""
    num_tokens, dim, teacher_dim, vocab, chunk = 300, 64, 48, 1000, 128
    generator = torch.Generator().manual_seed(3)
    hidden = _bf16_grid(generator, (num_tokens, dim), 1.0).cuda().requires_grad_()
    weight = _bf16_grid(generator, (vocab, dim), 2**-4).cuda().requires_grad_()
    teacher_hidden = _bf16_grid(generator, (num_tokens, teacher_dim), 1.0).bfloat16().cuda()
    teacher_weight = _bf16_grid(generator, (vocab, teacher_dim), 2**-4).bfloat16().cuda()
    labels = torch.randint(0, vocab, (num_tokens,), generator=generator).cuda()
    labels[::7] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    upstream = 1.3
    if loss_kind == "cross_entropy":
        loss_fn = partial(fused_linear_cross_entropy, labels=labels, chunk_size=chunk)
        terms = partial(_cross_entropy_terms, labels=labels)
    else:
        teacher_logits = _bf16_logits(teacher_hidden, teacher_weight)
        teacher_args = ({"teacher_logits": teacher_logits} if loss_kind == "kl_teacher_logits" else
                        {"teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight})
        loss_fn = partial(fused_linear_kl, mask=mask, chunk_size=chunk, **teacher_args)
        terms = partial(_kl_terms, teacher_logits=teacher_logits, keep=mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grad_h, grad_w = _loss_and_grads(loss_fn, hidden, weight, upstream)
    ref_loss, ref_h, ref_w = _bf16_reference(hidden.detach(), weight.detach(), terms, mask.sum(), upstream)
    assert loss.dtype == grad_h.dtype == grad_w.dtype == torch.float32
    _assert_close(loss, ref_loss, "loss")
    # cuBLAS sums the float32 products in its own order; the margin also covers a logits-gradient element that a
    # last-bit difference in the device's softmax rounds to the neighbouring bfloat16 value.
    _assert_close_to_scale(grad_h, ref_h, "grad hidden", share=1e-3)
    _assert_close_to_scale(grad_w, ref_w, "grad weight", share=1e-3)


def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    hidden, weight, *_ = _inputs(0, 20, 8, 30)
    same = fused_linear_kl(hidden.float(), weight.float(), teacher_hidden=hidden.float().detach(),
                           teacher_weight=weight.float().detach(), chunk_size=7)
    assert abs(float(same.detach())) < 1e-6
    other = fused_linear_kl(hidden.float(), weight.float(), teacher_hidden=hidden.float().detach() * -1,
                            teacher_weight=weight.float().detach(), chunk_size=7)
    assert float(other.detach()) > 0.01


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_inputs_give_gradients_in_their_dtype(autocast):
    hidden, weight, teacher_hidden, teacher_weight, _ = _inputs(1, 16, 8, 20)
    h16 = hidden.detach().bfloat16().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    labels = torch.randint(0, 20, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = [fused_linear_cross_entropy(h16, w32, labels, chunk_size=5),
                  fused_linear_kl(h16, w32, teacher_hidden=teacher_hidden.bfloat16(),
                                  teacher_weight=teacher_weight.bfloat16(), chunk_size=5)]
    for loss in losses:
        grad_h, grad_w = torch.autograd.grad(loss, (h16, w32))
        assert loss.dtype == torch.float32 and grad_h.dtype == torch.bfloat16 and grad_w.dtype == torch.float32
        assert torch.isfinite(grad_h.float()).all() and torch.isfinite(grad_w).all()


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
    for bad_label in (10, -1):
        with pytest.raises(ValueError, match=rf"labels must be in \[0, vocab = 10\) or -100, got \[{bad_label}\]"):
            fused_linear_cross_entropy(torch.zeros(5, 4), torch.zeros(10, 4),
                                       torch.tensor([1, bad_label, IGNORE_INDEX, 0, 9]))
