"""The CUDA output stage of chunked Lightning Attention (`torch.ops.hypenet_cuda.lightning_chunk_scan`, the
`cuda` backend of `hypenet.ops.lightning_attn`) against the reference.

Properties, on Hypothesis-drawn equal-length and packed batches (bf16, K == V in {64, 128}):
- o, final_state and the gradients of q, k, v and initial_state match `lightning_attn_ref` under the tolerance rule
  of tests/ops/test_lightning_chunk_triton.py, for every way of cutting sequences into segments (packed: ranges),
  with and without an initial state and a final-state gradient, T not a multiple of the chunk, weak and strong
  decays; packed ragged sequences do not leak state into each other, and an empty one passes its state through;
- the CUDA and Triton output stages round at the same points, so they agree far more closely than either agrees
  with the reference;
- a packed forward captured in a CUDA graph replays correctly after cu_seqlens changes in place;
- the public op with backend="cuda" runs it under autograd, and inputs it does not take are refused with a reason
  naming what is wrong (the reasons are checked on the CPU too).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

import hypenet.ops
from hypenet.ops import cuda_ext
from tests.conftest import HAS_CUDA
from tests.ops.test_lightning_chunk_triton import (Case, _check_case, _kernels, _make_inputs, _reference,
                                                   check_empty_sequence, check_packed_graph_replay, check_public_op,
                                                   dense_cases, packed_cases)
from tests.tolerance import relative_error


def cuda_scan_reason() -> str | None:
    if not HAS_CUDA:
        return "needs an NVIDIA GPU"
    if not cuda_ext.cuda_op_available("lightning_chunk_scan"):
        return f"hypenet._C has no lightning_chunk_scan ({cuda_ext.cuda_ext_error() or 'not built with it'})"
    return None


CUDA_SCAN_SKIP = cuda_scan_reason()
requires_cuda_scan = pytest.mark.skipif(CUDA_SCAN_SKIP is not None, reason=CUDA_SCAN_SKIP or "")


def bf16_case(**fields) -> Case:
    """A bf16 equal-length case, small by default; `fields` override."""
    defaults = dict(B=1, T=100, H=2, K=64, V=64, dtype=torch.bfloat16, lengths=None, with_initial=False,
                    with_dfinal=False, strength=1.0, scale=0.125, segment_len=None, seed=0)
    return Case(**{**defaults, **fields})


def test_unsupported_inputs_have_reasons():
    """The reasons that keep inputs off the CUDA scan name the dtype, the head dims or the initial state's dtype."""
    def reason(dtype=torch.bfloat16, K=64, V=64, state_dtype=None):
        q = torch.zeros(1, 8, 2, K, dtype=dtype)
        v = torch.zeros(1, 8, 2, V, dtype=dtype)
        initial_state = torch.zeros(1, 2, K, V, dtype=state_dtype) if state_dtype is not None else None
        return cuda_ext._lightning_chunk_scan_reason(q, q, v, initial_state)

    assert reason() is None
    assert "float16" in reason(dtype=torch.float16)
    assert "K=64, V=128" in reason(K=64, V=128)
    assert "K=32" in reason(K=32, V=32)
    assert reason(state_dtype=torch.float32) is None
    assert "initial_state" in reason(state_dtype=torch.float64)


def test_the_scan_runs_on_hopper_only():
    """The CUDA scan issues wgmma, which exists on sm_90 only: a build for sm_80 and sm_90a runs it on an H100 and
    gives an A100 or a Blackwell GPU a reason (Triton then runs); the step kernel takes any architecture built."""
    assert cuda_ext._arch_reason("lightning_chunk_scan", 0, (9, 0), ["80", "90"]) is None
    assert "sm_80" in cuda_ext._arch_reason("lightning_chunk_scan", 0, (8, 0), ["80", "90"])
    assert "sm_100" in cuda_ext._arch_reason("lightning_chunk_scan", 1, (10, 0), ["90", "100"])
    assert cuda_ext._arch_reason("lightning_attn_step", 0, (8, 0), ["80", "90"]) is None
    assert "HYPENET_CUDA_ARCHS" in cuda_ext._arch_reason("lightning_attn_step", 0, (8, 6), ["90"])


@pytest.mark.cuda
@requires_cuda_scan
@given(case=dense_cases([torch.bfloat16], [64, 128], max_batch=3, max_heads=4, max_tokens=1500,
                        segment_lens=[None, 64, 256], equal_dims=True))
def test_gpu_dense_batch_matches_reference(case: Case):
    _check_case(case, "cuda", cuda_output_stage=True)


@pytest.mark.cuda
@requires_cuda_scan
@given(case=packed_cases([torch.bfloat16], [64, 128], max_heads=4, max_tokens=3000, max_sequences=6,
                         segment_lens=[None, 64, 128]))
def test_gpu_packed_sequences_match_reference(case: Case):
    _check_case(case, "cuda", cuda_output_stage=True)


@pytest.mark.cuda
@requires_cuda_scan
@pytest.mark.parametrize("K", [64, 128])
def test_gpu_empty_sequence_passes_its_state_through(K):
    check_empty_sequence("cuda", torch.bfloat16, K, cuda_output_stage=True)


@pytest.mark.cuda
@requires_cuda_scan
def test_gpu_packed_forward_replays_in_a_cuda_graph():
    check_packed_graph_replay(cuda_output_stage=True)


@pytest.mark.cuda
@requires_cuda_scan
@pytest.mark.parametrize("T, segment_len, strength", [
    (1, None, 1.0),  # a single token
    (64, None, 1e-4),  # exactly one chunk, nearly no decay
    (65, 64, 8.0),  # one token past the chunk, strong decay, two segments
    (1000, 128, 1e-3),  # eight segments, the last one partial
])
def test_gpu_edge_lengths_and_decays(T, segment_len, strength):
    case = bf16_case(B=2, T=T, H=3, K=128, V=128, with_initial=True, with_dfinal=True, strength=strength,
                     scale=0.25, segment_len=segment_len, seed=T)
    _check_case(case, "cuda", cuda_output_stage=True)


@pytest.mark.cuda
@requires_cuda_scan
@pytest.mark.parametrize("K, lengths", [(64, None), (128, None), (128, [300, 77, 400])])
def test_gpu_cuda_and_triton_round_alike(K, lengths):
    """Both output stages round the same operands to bf16; their results differ by fp32 summation order and the
    odd bf16 rounding flip, well below their distance to the fp64 truth."""
    case = bf16_case(B=1 if lengths else 2, T=sum(lengths) if lengths else 777, H=4, K=K, V=K, lengths=lengths,
                     with_initial=True, with_dfinal=True, scale=K ** -0.5, segment_len=256 if lengths is None else 128,
                     seed=5)
    x = _make_inputs(case, "cuda")
    cuda = _kernels(x, case.scale, case.segment_len, cuda_output_stage=True)
    triton = _kernels(x, case.scale, case.segment_len)
    truth = _reference(x, case.scale, to_fp64=True)
    for name, got in cuda.items():
        apart = relative_error(got, triton[name])
        assert apart <= 0.5 * relative_error(triton[name], truth[name]) + 1e-6, f"{name}: CUDA vs Triton {apart}"


@pytest.mark.cuda
@requires_cuda_scan
@pytest.mark.parametrize("lengths", [None, [100, 3, 197]])
def test_gpu_public_op_runs_the_cuda_scan(lengths):
    """hypenet.ops.lightning_attn(backend="cuda"): forward and autograd through the op's registration, equal-length
    and packed."""
    case = bf16_case(B=1 if lengths else 2, T=300, K=128, V=128, lengths=lengths, with_initial=True, with_dfinal=True,
                     seed=9)
    check_public_op(case, "cuda", "cuda")


@pytest.mark.cuda
@requires_cuda_scan
def test_gpu_views_off_the_vector_alignment_give_the_aligned_result():
    """The kernel copies 16-byte vectors: q, k, v that start 2 bytes into their storage (contiguous views) are
    copied to aligned memory first, and the results equal those of the aligned tensors bit for bit."""
    case = bf16_case(T=130, seed=4)
    x = _make_inputs(case, "cuda")
    shifted = {}
    for name in ("q", "k", "v", "do"):
        storage = torch.empty(x[name].numel() + 1, dtype=x[name].dtype, device="cuda")
        shifted[name] = storage[1:].view_as(x[name]).copy_(x[name])
        assert shifted[name].data_ptr() % 16 != 0
    aligned = _kernels(x, case.scale, None, cuda_output_stage=True)
    unaligned = _kernels(dict(x, **shifted), case.scale, None, cuda_output_stage=True)
    for name, want in aligned.items():
        torch.testing.assert_close(unaligned[name], want, rtol=0, atol=0, msg=name)


@pytest.mark.cuda
@requires_cuda_scan
def test_gpu_public_op_refuses_what_the_cuda_scan_does_not_take():
    x = _make_inputs(bf16_case(dtype=torch.float16, seed=1), "cuda")
    with pytest.raises(ValueError, match="backend 'cuda'.*float16"):
        hypenet.ops.lightning_attn(x["q"], x["k"], x["v"], x["log_decay"], backend="cuda")
