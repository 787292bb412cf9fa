"""The row-wise softmax loss Triton kernels (`triton_ops.softmax_losses`) against float64 references.

Properties, on Hypothesis-drawn rows, vocabulary sizes, tile widths and logit scales (flat to peaked softmaxes):
- kl_rows: row_kl and the gradient match `kl_reference` under the tolerance rule (its float64 run on the same
  inputs is the truth, its float32 run, rounded to the gradient dtype, sets the allowance), for float32 and bf16
  teacher logits, float32 and bf16 gradients, masked-out rows, vocabularies smaller than a tile or not a multiple of
  it, and -inf logits (a padded vocabulary shared by both models, a teacher with zero-probability entries);
  masked-out rows get an exactly zero gradient and still their KL;
- ce_rows: row_loss and the gradient match `ce_reference` likewise, ignored rows (-100) are exactly zero;
- every kept row of either gradient sums to ~0 (both softmaxes sum to one);
- n = 0 returns empty results without launching a kernel; bad inputs raise a ValueError naming the argument.
Outputs are NaN-poisoned before each run (tests/conftest.py), so an unwritten element fails.

Allowance on top of the rule: the float32 rounding of a log-probability, LOG_PROB_ERRORS units of eps32 times the
size of the numbers it is computed from (the logits and the log-normaliser). A probability p carries it times p, a
KL or a loss carries it once; a gradient rounded to bf16/fp16 may also be one unit in the last place off, and a
probability below float32's normal range may flush to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import example, given, strategies as st

from tests.conftest import triton_device
from tests.tolerance import assert_close_to_ref
from triton_ops import softmax_losses
from triton_ops.softmax_losses import IGNORE_INDEX, ce_rows, kl_rows

F32_EPS = 2.0 ** -24
F32_TINY = 2.0 ** -126
LOG_PROB_ERRORS = 4  # measured under the interpreter: kernels at most ~2.3 units, torch's float32 reference ~3.3
# One unit in the last place, relative to the value: the GPU rounds a float32 gradient to nearest (half a unit, or
# one when kernel and reference float32 values straddle a rounding boundary); the Triton interpreter truncates to
# bf16 (up to one unit).
ROUNDING = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
# -inf logits and masked tile lanes make NaN and inf in lanes that tl.where then discards; the interpreter computes
# them with numpy, which warns about each.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

BLOCKS = [None, 16, 128, 1024]  # None: the launcher's choice (one tile for every V drawn on the CPU)
MAX_TILES = 32  # per row: the interpreter runs each tile's ops one by one


def kl_reference(student: torch.Tensor, teacher: torch.Tensor, row_mask: torch.Tensor):
    """(row_kl, grad) by torch.log_softmax in the dtype of the inputs; 0 * log(0 / q) counts as 0."""
    student_log_probs = torch.log_softmax(student, -1)
    teacher_log_probs = torch.log_softmax(teacher, -1)
    teacher_probs = teacher_log_probs.exp()
    terms = torch.where(teacher_probs > 0, teacher_probs * (teacher_log_probs - student_log_probs), 0.0)
    return terms.sum(-1), (student_log_probs.exp() - teacher_probs) * row_mask[:, None]


def ce_reference(logits: torch.Tensor, targets: torch.Tensor):
    """(row_loss, grad) by torch.log_softmax in the dtype of the logits."""
    valid = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)
    log_probs = torch.log_softmax(logits, -1)
    row_loss = -log_probs.gather(1, safe_targets[:, None]).squeeze(1) * valid
    onehot = torch.nn.functional.one_hot(safe_targets, logits.shape[1]).to(logits.dtype)
    return row_loss, (log_probs.exp() - onehot) * valid[:, None]


def _log_prob_error(*logits: torch.Tensor) -> float:
    """The allowed float32 error of a log-probability: eps32 times max |logit - logsumexp| <= 2 max |logit| + log V."""
    largest = max(float(t[t.isfinite()].abs().max()) for t in logits)
    return LOG_PROB_ERRORS * F32_EPS * (2 * largest + math.log(logits[0].shape[1]) + 1)


def _assert_grad_matches(grad: torch.Tensor, ref_fp32: torch.Tensor, ref_fp64: torch.Tensor,
                         probs_fp64: torch.Tensor, log_prob_error: float) -> None:
    """probs_fp64: the sum of the probabilities that make each gradient element (p_s + p_t, or p)."""
    atol = ROUNDING[grad.dtype] * ref_fp64.abs() + log_prob_error * probs_fp64 + F32_TINY
    assert_close_to_ref(grad, ref_fp32.to(grad.dtype), ref_fp64, c=2.0, atol=atol, name="grad")


def _assert_rows_sum_to_zero(grad: torch.Tensor, rows: torch.Tensor, log_prob_error: float) -> None:
    """A softmax minus a distribution sums to 0: each of the two sums of probabilities is 1 up to its rounding."""
    got = grad[rows].double()
    allowed = ROUNDING[grad.dtype] * got.abs().sum(-1) + 2 * log_prob_error
    row_sums = got.sum(-1).abs()
    assert (row_sums <= allowed).all(), f"row sums {row_sums.tolist()} exceed {allowed.tolist()}"


def _randn(shape, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------------------ kl_rows

@dataclass
class KLCase:
    n: int
    V: int
    scale: float  # logits ~ N(0, scale^2): 0.1 is a near-uniform softmax, 30 puts nearly all mass on one entry
    teacher_near_student: bool  # teacher = student + noise / 4 (a small KL) instead of independent logits
    padded: int  # trailing columns that are -inf in both models (a padded vocabulary)
    teacher_zeros: float  # share of the teacher's other columns set to -inf (a truncated teacher); its last
    # unpadded column stays finite, so at 0.99 whole leading tiles are -inf
    teacher_dtype: torch.dtype
    grad_dtype: torch.dtype
    block_v: Optional[int]
    seed: int


def _draw_rows(draw, max_rows: int, vocabs: st.SearchStrategy, blocks: list) -> dict:
    """The fields both cases share: rows, vocabulary, tile width (at most MAX_TILES per row), scale, padding, seed."""
    V = draw(vocabs)
    return {"n": draw(st.integers(1, max_rows)), "V": V, "scale": draw(st.floats(0.1, 30.0)),
            "padded": draw(st.integers(0, min(V - 1, 9))),
            "block_v": draw(st.sampled_from([b for b in blocks if b is None or V <= MAX_TILES * b])),
            "seed": draw(st.integers(0, 2**16))}


@st.composite
def kl_cases(draw, max_rows: int, vocabs: st.SearchStrategy, blocks: list):
    return KLCase(**_draw_rows(draw, max_rows, vocabs, blocks), teacher_near_student=draw(st.booleans()),
                  teacher_zeros=draw(st.sampled_from([0.0, 0.0, 0.5, 0.99])),
                  teacher_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                  grad_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])))


def _kl_inputs(case: KLCase, device: str):
    student = _randn((case.n, case.V), case.seed, case.scale)
    noise = _randn((case.n, case.V), case.seed + 1, case.scale)
    teacher = student + noise / 4 if case.teacher_near_student else noise
    g = torch.Generator().manual_seed(case.seed + 2)
    zeros = torch.rand((case.n, case.V), generator=g) < case.teacher_zeros
    zeros[:, case.V - case.padded - 1] = False
    teacher[zeros] = float("-inf")
    if case.padded:
        student[:, -case.padded:] = float("-inf")
        teacher[:, -case.padded:] = float("-inf")
    row_mask = torch.rand(case.n, generator=g) < 0.7
    return (student.float().to(device), teacher.to(case.teacher_dtype).to(device), row_mask.to(device))


def _check_kl(case: KLCase, device: str) -> None:
    student, teacher, row_mask = _kl_inputs(case, device)
    row_kl, grad = kl_rows(student, teacher, row_mask, case.grad_dtype, block_v=case.block_v)
    assert row_kl.dtype == torch.float32 and grad.dtype == case.grad_dtype
    kl_fp32, grad_fp32 = kl_reference(student, teacher.float(), row_mask)
    kl_fp64, grad_fp64 = kl_reference(student.double(), teacher.double(), row_mask)
    log_prob_error = _log_prob_error(student, teacher.float())
    assert_close_to_ref(row_kl, kl_fp32, kl_fp64, c=2.0, atol=log_prob_error, name="row_kl")
    probs = student.double().softmax(-1) + teacher.double().softmax(-1)
    _assert_grad_matches(grad, grad_fp32, grad_fp64, probs, log_prob_error)
    assert torch.equal(grad[~row_mask], torch.zeros_like(grad[~row_mask])), "masked-out rows must get a zero grad"
    _assert_rows_sum_to_zero(grad, row_mask, log_prob_error)


@example(case=KLCase(n=1, V=1, scale=1.0, teacher_near_student=False, padded=0, teacher_zeros=0.0,
                     teacher_dtype=torch.float32, grad_dtype=torch.float32, block_v=None, seed=0))
@example(case=KLCase(n=3, V=256, scale=30.0, teacher_near_student=True, padded=0, teacher_zeros=0.0,
                     teacher_dtype=torch.float32, grad_dtype=torch.float32, block_v=64, seed=1))
@example(case=KLCase(n=4, V=1000, scale=5.0, teacher_near_student=True, padded=7, teacher_zeros=0.5,
                     teacher_dtype=torch.bfloat16, grad_dtype=torch.bfloat16, block_v=128, seed=2))
@example(case=KLCase(n=3, V=300, scale=3.0, teacher_near_student=False, padded=4, teacher_zeros=0.99,
                     teacher_dtype=torch.float32, grad_dtype=torch.float32, block_v=16, seed=4))
@example(case=KLCase(n=2, V=3000, scale=0.1, teacher_near_student=False, padded=0, teacher_zeros=0.0,
                     teacher_dtype=torch.float32, grad_dtype=torch.bfloat16, block_v=128, seed=3))
@given(case=kl_cases(max_rows=8, vocabs=st.integers(1, 3000), blocks=BLOCKS))
def test_kl_rows_matches_reference(case: KLCase):
    _check_kl(case, triton_device())


def test_kl_rows_student_zero_where_teacher_is_not():
    """A student that gives 0 to a teacher token has an infinite KL but a finite gradient."""
    device = triton_device()
    student = torch.tensor([[0.0, float("-inf"), 1.0]], device=device)
    teacher = torch.tensor([[0.0, 0.5, 1.0]], device=device)
    keep = torch.ones(1, dtype=torch.bool, device=device)
    row_kl, grad = kl_rows(student, teacher, keep, torch.float32)
    assert row_kl.item() == float("inf")
    _, grad_fp64 = kl_reference(student.double(), teacher.double(), keep)
    torch.testing.assert_close(grad.double(), grad_fp64, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ ce_rows

@dataclass
class CECase:
    n: int
    V: int
    scale: float
    padded: int  # trailing -inf columns, never a target
    ignored: float  # share of rows whose target is IGNORE_INDEX
    grad_dtype: torch.dtype
    block_v: Optional[int]
    seed: int


@st.composite
def ce_cases(draw, max_rows: int, vocabs: st.SearchStrategy, blocks: list):
    return CECase(**_draw_rows(draw, max_rows, vocabs, blocks), ignored=draw(st.sampled_from([0.0, 0.4])),
                  grad_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))


def _check_ce(case: CECase, device: str) -> None:
    logits = _randn((case.n, case.V), case.seed, case.scale)
    if case.padded:
        logits[:, -case.padded:] = float("-inf")
    g = torch.Generator().manual_seed(case.seed + 1)
    targets = torch.randint(0, case.V - case.padded, (case.n,), generator=g)
    targets[torch.rand(case.n, generator=g) < case.ignored] = IGNORE_INDEX
    logits, targets = logits.float().to(device), targets.to(device)

    row_loss, grad = ce_rows(logits, targets, case.grad_dtype, block_v=case.block_v)
    assert row_loss.dtype == torch.float32 and grad.dtype == case.grad_dtype
    loss_fp32, grad_fp32 = ce_reference(logits, targets)
    loss_fp64, grad_fp64 = ce_reference(logits.double(), targets)
    log_prob_error = _log_prob_error(logits)
    assert_close_to_ref(row_loss, loss_fp32, loss_fp64, c=2.0, atol=log_prob_error, name="row_loss")
    _assert_grad_matches(grad, grad_fp32, grad_fp64, logits.double().softmax(-1), log_prob_error)
    ignored = targets == IGNORE_INDEX
    assert torch.equal(row_loss[ignored], torch.zeros_like(row_loss[ignored])), "ignored rows must have loss 0"
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored])), "ignored rows must get a zero grad"
    _assert_rows_sum_to_zero(grad, ~ignored, log_prob_error)


@example(case=CECase(n=1, V=1, scale=1.0, padded=0, ignored=0.0, grad_dtype=torch.float32, block_v=None, seed=0))
@example(case=CECase(n=5, V=512, scale=30.0, padded=3, ignored=0.4, grad_dtype=torch.bfloat16, block_v=128,
                     seed=1))
@example(case=CECase(n=2, V=3000, scale=0.1, padded=0, ignored=0.0, grad_dtype=torch.float32, block_v=None, seed=2))
@given(case=ce_cases(max_rows=8, vocabs=st.integers(1, 3000), blocks=BLOCKS))
def test_ce_rows_matches_reference(case: CECase):
    _check_ce(case, triton_device())


# ------------------------------------------------------------------------------------------------ edge cases

def test_no_rows_launches_nothing(monkeypatch):
    device = triton_device()

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"a kernel was launched with grid {grid} for zero rows")

    monkeypatch.setattr(softmax_losses, "kl_rows_kernel", NoLaunch())
    monkeypatch.setattr(softmax_losses, "ce_rows_kernel", NoLaunch())
    logits = torch.zeros(0, 7, device=device)
    row_kl, grad = kl_rows(logits, logits.bfloat16(), torch.zeros(0, dtype=torch.bool, device=device), torch.bfloat16)
    assert row_kl.shape == (0,) and grad.shape == (0, 7) and grad.dtype == torch.bfloat16
    row_loss, grad = ce_rows(logits, torch.zeros(0, dtype=torch.int64, device=device), torch.float32)
    assert row_loss.shape == (0,) and grad.shape == (0, 7) and grad.dtype == torch.float32


def _kl_args(device: str, **changes) -> dict:
    args = {"student_logits": torch.zeros(3, 5, device=device), "teacher_logits": torch.zeros(3, 5, device=device),
            "row_mask": torch.ones(3, dtype=torch.bool, device=device), "grad_dtype": torch.bfloat16}
    args.update({name: make(device) for name, make in changes.items()})
    return args


def _ce_args(device: str, **changes) -> dict:
    args = {"logits": torch.zeros(3, 5, device=device),
            "targets": torch.tensor([0, IGNORE_INDEX, 4], device=device), "grad_dtype": torch.float32}
    args.update({name: make(device) for name, make in changes.items()})
    return args


KL_BAD_INPUTS = {
    "student 1-D": ({"student_logits": lambda d: torch.zeros(5, device=d)}, ["student_logits", "(5,)"]),
    "student no columns": ({"student_logits": lambda d: torch.zeros(3, 0, device=d)}, ["student_logits", "(3, 0)"]),
    "student bf16": ({"student_logits": lambda d: torch.zeros(3, 5, dtype=torch.bfloat16, device=d)},
                     ["student_logits", "bfloat16"]),
    "student strided": ({"student_logits": lambda d: torch.zeros(5, 3, device=d).T}, ["student_logits", "contiguous"]),
    "student off-device": ({"student_logits": lambda d: torch.zeros(3, 5, device="meta")}, ["student_logits", "meta"]),
    "teacher float64": ({"teacher_logits": lambda d: torch.zeros(3, 5, dtype=torch.float64, device=d)},
                        ["teacher_logits", "float64"]),
    "teacher strided": ({"teacher_logits": lambda d: torch.zeros(3, 10, device=d)[:, ::2]},
                        ["teacher_logits", "contiguous"]),
    "teacher other V": ({"teacher_logits": lambda d: torch.zeros(3, 6, device=d)},
                        ["teacher_logits", "(3, 6)", "(3, 5)"]),
    "teacher other n": ({"teacher_logits": lambda d: torch.zeros(2, 5, device=d)},
                        ["teacher_logits", "(2, 5)", "(3, 5)"]),
    "mask length": ({"row_mask": lambda d: torch.ones(4, dtype=torch.bool, device=d)}, ["row_mask", "(4,)", "[3]"]),
    "mask dtype": ({"row_mask": lambda d: torch.ones(3, device=d)}, ["row_mask", "torch.float32"]),
    "mask off-device": ({"row_mask": lambda d: torch.ones(3, dtype=torch.bool, device="meta")}, ["row_mask", "meta"]),
    "grad dtype": ({"grad_dtype": lambda d: torch.float64}, ["grad_dtype", "float64"]),
    "tile width": ({"block_v": lambda d: 48}, ["block_v", "48"]),
}

CE_BAD_INPUTS = {
    "logits 3-D": ({"logits": lambda d: torch.zeros(1, 3, 5, device=d)}, ["logits", "(1, 3, 5)"]),
    "logits fp16": ({"logits": lambda d: torch.zeros(3, 5, dtype=torch.float16, device=d)}, ["logits", "float16"]),
    "logits strided": ({"logits": lambda d: torch.zeros(5, 3, device=d).T}, ["logits", "contiguous"]),
    "targets int32": ({"targets": lambda d: torch.zeros(3, dtype=torch.int32, device=d)}, ["targets", "int32"]),
    "targets length": ({"targets": lambda d: torch.zeros(2, dtype=torch.int64, device=d)}, ["targets", "(2,)", "[3]"]),
    "target too large": ({"targets": lambda d: torch.tensor([0, 5, 1], device=d)}, ["targets", "V = 5", "[5]"]),
    "target negative": ({"targets": lambda d: torch.tensor([-1, IGNORE_INDEX, -7], device=d)},
                        ["targets", "2 out of range", "[-1, -7]"]),
    "grad dtype": ({"grad_dtype": lambda d: torch.int32}, ["grad_dtype", "int32"]),
}


def _assert_value_error_names(launcher, args: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        launcher(**args)
    for fragment in fragments:
        assert fragment in str(error.value), f"{fragment!r} missing from {str(error.value)!r}"


@pytest.mark.parametrize("changes, fragments", KL_BAD_INPUTS.values(), ids=KL_BAD_INPUTS.keys())
def test_kl_rows_rejects_bad_inputs(changes, fragments):
    _assert_value_error_names(kl_rows, _kl_args(triton_device(), **changes), fragments)


@pytest.mark.parametrize("changes, fragments", CE_BAD_INPUTS.values(), ids=CE_BAD_INPUTS.keys())
def test_ce_rows_rejects_bad_inputs(changes, fragments):
    _assert_value_error_names(ce_rows, _ce_args(triton_device(), **changes), fragments)


# ------------------------------------------------------------------------------------------------ GPU only

GPU_VOCABS = st.sampled_from([32000, 151936, 152064 + 7, 262144])


@pytest.mark.cuda
@given(case=kl_cases(max_rows=64, vocabs=GPU_VOCABS, blocks=[None]))
def test_gpu_kl_rows_matches_reference(case: KLCase):
    _check_kl(case, "cuda")


@pytest.mark.cuda
@given(case=ce_cases(max_rows=64, vocabs=GPU_VOCABS, blocks=[None]))
def test_gpu_ce_rows_matches_reference(case: CECase):
    _check_ce(case, "cuda")
