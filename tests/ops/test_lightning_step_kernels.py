"""The Lightning Attention decode-step kernels (CUDA `torch.ops.hypenet_cuda.lightning_attn_step` and its Triton
twin `triton_ops.lightning.step`) against the references.

Properties, on Hypothesis-drawn shapes, pools and slot orders:
- outputs and advanced states match the step reference (`lightning_attn_step_ref`) under the tolerance rule;
- T > 1 new tokens give the same outputs and final state as the chunked op (`lightning_attn_ref`) run over the
  same tokens from the same initial state;
- pool slots that no row names keep their exact bits;
- a row whose slot is outside the pool gets NaN outputs and touches no state (the kernels' last line of defence).
Outputs are NaN-poisoned before each run, so an unwritten element fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, strategies as st

from hypenet.ops.reference.lightning import lightning_attn_ref, lightning_attn_step_ref
from tests.conftest import HAS_CUDA, triton_device
from tests.strategies import log_decays, randn
from tests.tolerance import assert_close_to_ref

ON_GPU_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") == "gpu"
F64 = torch.float64
# Absolute slack on top of the rule: fp32 sums over K of O(1) terms differ from fp64 by ~K * 2^-24.
ATOL = 1e-4


@dataclass
class StepCase:
    B: int
    T: int
    H: int
    K: int
    V: int
    slots: list[int]  # state_indices; the pool has N >= max(slots) + 1 slots
    N: int
    index_dtype: torch.dtype
    transposed: bool  # q, k, v as [B, H, T, D] tensors viewed as [B, T, H, D] (non-contiguous)
    strength: float
    scale: float
    seed: int


@st.composite
def step_cases(draw, head_dims_k, head_dims_v=None, equal_dims=False, max_batch=3, max_heads=2, max_tokens=5):
    B = draw(st.integers(1, max_batch))
    K = draw(st.sampled_from(head_dims_k))
    V = K if equal_dims else draw(st.sampled_from(head_dims_v or head_dims_k))
    N = B + draw(st.integers(0, 3))
    slots = draw(st.permutations(range(N)))[:B]  # a subset of the pool, in any order
    return StepCase(B=B, T=draw(st.integers(1, max_tokens)), H=draw(st.integers(1, max_heads)), K=K, V=V,
                    slots=list(slots), N=N, index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                    transposed=draw(st.booleans()), strength=draw(st.sampled_from([1e-3, 0.5, 8.0])),
                    scale=draw(st.sampled_from([None, 0.3])), seed=draw(st.integers(0, 2**16)))


def make_inputs(case: StepCase, dtype: torch.dtype, device: str):
    """q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H]; state [N, H, K, V]; state_indices [B]."""
    B, T, H = case.B, case.T, case.H

    def tokens(D: int, seed: int) -> torch.Tensor:
        if case.transposed:
            return randn((B, H, T, D), dtype, device, seed).transpose(1, 2)
        return randn((B, T, H, D), dtype, device, seed)

    q, k, v = tokens(case.K, case.seed), tokens(case.K, case.seed + 1), tokens(case.V, case.seed + 2)
    log_decay = log_decays(H, case.strength, case.seed).to(device)
    state = randn((case.N, H, case.K, case.V), torch.float32, device, case.seed + 3)
    state_indices = torch.tensor(case.slots, dtype=case.index_dtype, device=device)
    return q, k, v, log_decay, state, state_indices


def check_step_kernel(step, case: StepCase, dtype: torch.dtype, device: str) -> None:
    """Runs `step(q, k, v, log_decay, state, scale, state_indices) -> o` and checks every property above."""
    q, k, v, log_decay, state, state_indices = make_inputs(case, dtype, device)
    scale = case.scale if case.scale is not None else case.K ** -0.5
    pool_before = state.clone()

    o = step(q, k, v, log_decay, state, scale, state_indices)

    # Step reference: in fp32 from the same low-precision inputs, and the fp64 truth.
    state_lowp, state_fp64 = pool_before.clone(), pool_before.double()
    o_lowp = lightning_attn_step_ref(q, k, v, log_decay, state_lowp, scale, state_indices)
    o_fp64 = lightning_attn_step_ref(q.double(), k.double(), v.double(), log_decay, state_fp64, scale,
                                     state_indices)
    assert o.dtype == q.dtype
    assert_close_to_ref(o, o_lowp, o_fp64, atol=ATOL, name="o vs step reference")
    assert_close_to_ref(state, state_lowp, state_fp64, atol=ATOL, name="state vs step reference")

    # The same tokens through the chunked op, starting from the same states.
    rows = state_indices.long()
    oc_lowp, final_lowp = lightning_attn_ref(q, k, v, log_decay, scale, pool_before[rows], True)
    oc_fp64, final_fp64 = lightning_attn_ref(q.double(), k.double(), v.double(), log_decay, scale,
                                             pool_before[rows].double(), True)
    assert_close_to_ref(o, oc_lowp, oc_fp64, atol=ATOL, name="o vs chunked op")
    assert_close_to_ref(state[rows], final_lowp, final_fp64, atol=ATOL, name="final state vs chunked op")

    untouched = torch.ones(case.N, dtype=torch.bool, device=device)
    untouched[rows] = False
    assert torch.equal(state[untouched], pool_before[untouched]), "a slot no row names was modified"


def check_bad_slot(step, dtype: torch.dtype, device: str, K: int = 64, V: int = 64) -> None:
    """Row 0 names a slot past the pool, row 1 a valid one: NaN for row 0, the pool intact except row 1's slot."""
    case = StepCase(B=2, T=2, H=2, K=K, V=V, slots=[0, 1], N=2, index_dtype=torch.int64, transposed=False,
                    strength=0.5, scale=0.3, seed=7)
    q, k, v, log_decay, state, _ = make_inputs(case, dtype, device)
    pool_before = state.clone()
    for bad in (2, -1):
        state_indices = torch.tensor([bad, 1], device=device)
        o = step(q, k, v, log_decay, state, 0.3, state_indices)
        assert torch.isnan(o[0]).all(), f"slot {bad} outside the pool must give NaN outputs"
        assert not torch.isnan(o[1]).any()
        assert torch.equal(state[0], pool_before[0]), f"slot {bad} outside the pool modified slot 0"
        state.copy_(pool_before)


# ---------------------------------------------------------------------------------------------- Triton twin

def triton_step(q, k, v, log_decay, state, scale, state_indices):
    from triton_ops.lightning.step import lightning_attn_step
    return lightning_attn_step(q, k, v, log_decay, state, scale, state_indices)


def triton_dtypes(device: str) -> list[torch.dtype]:
    # The interpreter mis-rounds bf16: bf16 on the GPU only.
    return [torch.float32, torch.float16, torch.bfloat16] if device == "cuda" else [torch.float32, torch.float16]


TRITON_DIMS_CPU = [16, 24, 32]
TRITON_DIMS_GPU = [16, 24, 64, 100, 128, 256]


@given(data=st.data())
def test_triton_step_matches_references(data):
    triton_dev = triton_device()
    dims = TRITON_DIMS_GPU if triton_dev == "cuda" else TRITON_DIMS_CPU
    big = triton_dev == "cuda" and ON_GPU_PROFILE
    case = data.draw(step_cases(dims, max_batch=8 if big else 3, max_heads=4 if big else 2))
    dtype = data.draw(st.sampled_from(triton_dtypes(triton_dev)))
    check_step_kernel(triton_step, case, dtype, triton_dev)


def test_triton_step_default_indices_is_arange(triton_dev):
    case = StepCase(B=3, T=2, H=2, K=16, V=24, slots=[0, 1, 2], N=3, index_dtype=torch.int64, transposed=False,
                    strength=0.5, scale=0.3, seed=3)
    q, k, v, log_decay, state, state_indices = make_inputs(case, torch.float32, triton_dev)
    state_default = state.clone()
    o = triton_step(q, k, v, log_decay, state, 0.3, state_indices)
    o_default = triton_step(q, k, v, log_decay, state_default, 0.3, None)
    assert torch.equal(o, o_default) and torch.equal(state, state_default)


def test_triton_step_bad_slot_gives_nan(triton_dev):
    check_bad_slot(triton_step, torch.float32, triton_dev, K=16, V=16)


def test_triton_step_unsupported_reason():
    from triton_ops.lightning.step import unsupported_reason
    q = torch.zeros(1, 1, 1, 16)
    assert unsupported_reason(q, q, q, torch.zeros(1, 1, 16, 16)) is None
    assert "float64" in unsupported_reason(q.double(), q, q, torch.zeros(1, 1, 16, 16))
    big = torch.zeros(1, 1, 1, 512)
    assert "K, V <=" in unsupported_reason(big, big, big, torch.zeros(1, 1, 512, 512))


# ---------------------------------------------------------------------------------------------- CUDA kernel

def cuda_step_reason() -> str | None:
    if not HAS_CUDA:
        return "needs an NVIDIA GPU"
    from hypenet.ops.cuda_ext import cuda_op_available, cuda_ext_error
    if not cuda_op_available("lightning_attn_step"):
        return f"hypenet._C has no lightning_attn_step ({cuda_ext_error() or 'not built with it'})"
    return None


CUDA_STEP_SKIP = cuda_step_reason()
requires_cuda_step = pytest.mark.skipif(CUDA_STEP_SKIP is not None, reason=CUDA_STEP_SKIP or "")


def cuda_step(q, k, v, log_decay, state, scale, state_indices):
    # at::empty in C++ escapes the NaN-poisoned torch.empty: free a NaN block of the output's size first, so the
    # caching allocator hands the same bytes to the kernel's output.
    B, T, H, _ = q.shape
    poison = torch.full((B, T, H, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    del poison
    return torch.ops.hypenet_cuda.lightning_attn_step(q, k, v, log_decay, state, state_indices, scale)


@pytest.mark.cuda
@requires_cuda_step
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@given(data=st.data())
def test_cuda_step_matches_references(dtype, data):
    big = ON_GPU_PROFILE
    case = data.draw(step_cases([64, 128], equal_dims=True, max_batch=12 if big else 4, max_heads=4 if big else 2,
                                max_tokens=6))
    check_step_kernel(cuda_step, case, dtype, "cuda")


@pytest.mark.cuda
@requires_cuda_step
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_step_bad_slot_gives_nan(dtype):
    check_bad_slot(cuda_step, dtype, "cuda", K=128, V=128)


@pytest.mark.cuda
@requires_cuda_step
def test_cuda_step_agrees_with_triton_at_serving_shape():
    """B=8, H=16, K=V=128 bf16 decode: the two kernels compute the same function (both fp32 inside)."""
    case = StepCase(B=8, T=1, H=16, K=128, V=128, slots=[9, 3, 0, 7, 12, 5, 1, 10], N=13,
                    index_dtype=torch.int32, transposed=False, strength=0.5, scale=128 ** -0.5, seed=11)
    q, k, v, log_decay, state, state_indices = make_inputs(case, torch.bfloat16, "cuda")
    state_triton = state.clone()
    o_cuda = cuda_step(q, k, v, log_decay, state, case.scale, state_indices)
    o_triton = triton_step(q, k, v, log_decay, state_triton, case.scale, state_indices)
    torch.testing.assert_close(state, state_triton, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_cuda.float(), o_triton.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@requires_cuda_step
@pytest.mark.parametrize("bad", ["head_dim", "dtype", "state_layout", "cpu_state"])
def test_cuda_step_binding_rejects_what_it_cannot_run(bad):
    """The binding's checks raise (RuntimeError from TORCH_CHECK) instead of launching on bad inputs."""
    K = 96 if bad == "head_dim" else 64
    dtype = F64 if bad == "dtype" else torch.bfloat16
    q = torch.randn(2, 1, 2, K, device="cuda", dtype=dtype)
    state = torch.randn(2, 2, K, K, device="cuda")
    if bad == "state_layout":
        state = state.transpose(2, 3)
    if bad == "cpu_state":
        state = state.cpu()
    with pytest.raises(RuntimeError, match="hypenet_cuda"):
        torch.ops.hypenet_cuda.lightning_attn_step(q, q, q, torch.full((2,), -0.5, device="cuda"), state,
                                                   torch.arange(2, device="cuda"), 0.1)
    torch.cuda.synchronize()


@pytest.mark.cuda
@requires_cuda_step
def test_cuda_step_through_public_op():
    """hypenet.ops.lightning_attn_step(backend="cuda") reaches the kernel and matches the reference backend."""
    from hypenet import ops
    case = StepCase(B=3, T=2, H=4, K=128, V=128, slots=[2, 0, 4], N=5, index_dtype=torch.int64, transposed=False,
                    strength=0.5, scale=0.2, seed=5)
    q, k, v, log_decay, state, state_indices = make_inputs(case, torch.bfloat16, "cuda")
    state_ref = state.clone()
    o = ops.lightning_attn_step(q, k, v, log_decay, state, scale=0.2, state_indices=state_indices, backend="cuda")
    o_ref = ops.lightning_attn_step(q, k, v, log_decay, state_ref, scale=0.2, state_indices=state_indices,
                                    backend="reference")
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=1e-2, atol=1e-2)
