"""The chunked Lightning Attention Triton kernels (`triton_ops.lightning.chunk`) against the reference.

Properties, on Hypothesis-drawn shapes, decays, scales and packings:
- o, final_state and the gradients of q, k, v and initial_state match `lightning_attn_ref` under the tolerance rule
  (the fp64 run of the reference on the same low-precision inputs is the truth, the reference's own low-precision
  run sets the allowance), with and without an initial state and a final-state gradient;
- packed ragged sequences (cu_seqlens) match the reference, which runs each sequence alone (no state leaks);
- every way of cutting sequences into parallel segments (segment_len) gives the same answer, and the backward
  gives the same gradients whether it reuses the forward's segment start states or recomputes them;
- T = 1, T not a multiple of the 64-token chunk, very weak (log_decay ~ -1e-4) and strong (~ -8) decays;
- the public op `hypenet.ops.lightning_attn(..., backend="triton")` runs these kernels under autograd;
- on a GPU: bf16 at larger shapes, a 65536-token sequence whose fp32 state must not drift from fp64, and a packed
  forward captured in a CUDA graph that replays correctly after cu_seqlens changes in place.
Outputs are NaN-poisoned before each run (tests/conftest.py), so an unwritten element fails.

Allowance: the rule's atol is a few units in the last place of the tensor's largest entry in the input dtype. The
kernels round matmul operands (decayed scores, decayed values and, in bf16, the state) to the input dtype, as every
tensor-core implementation does; the reference rounds only its output, so an element whose reference happens to
round almost exactly would otherwise allow no error at all. Norm-wise errors are checked tightly besides.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch
from hypothesis import given, strategies as st

import hypenet.ops
from hypenet.ops.reference.lightning import lightning_attn_ref
from tests.conftest import triton_device
from tests.strategies import cu_seqlens as cu_seqlens_strategy, log_decays, randn
from tests.tolerance import assert_close_to_ref, relative_error
from triton_ops.lightning import chunk

F64 = torch.float64
# atol of the rule, in units of the largest |truth| of each tensor (see the module docstring), and the bound on
# the norm-wise relative error.
ATOL_OF_MAX = {torch.float32: 2.0 ** -19, torch.float16: 2.0 ** -8, torch.bfloat16: 2.0 ** -6}
NORM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass
class Case:
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: torch.dtype
    lengths: Optional[list[int]]  # packed sequences (B == 1, T == sum) or None
    with_initial: bool
    with_dfinal: bool
    strength: float  # log decays drawn in [-strength, 0)
    scale: float
    segment_len: Optional[int]
    seed: int
    reuse_forward: bool = True  # the backward takes the forward's start states and packed tables (as the op does)

    @property
    def N(self) -> int:
        return self.B if self.lengths is None else len(self.lengths)


def _offsets(lengths: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _make_inputs(case: Case, device: str) -> dict:
    shape_k, shape_v = (case.B, case.T, case.H, case.K), (case.B, case.T, case.H, case.V)
    state_shape = (case.N, case.H, case.K, case.V)
    return {
        "q": randn(shape_k, case.dtype, device, case.seed),
        "k": randn(shape_k, case.dtype, device, case.seed + 1),
        "v": randn(shape_v, case.dtype, device, case.seed + 2),
        "log_decay": log_decays(case.H, case.strength, case.seed).to(device),
        "initial_state": randn(state_shape, torch.float32, device, case.seed + 3) if case.with_initial else None,
        "cu_seqlens": _offsets(case.lengths, device) if case.lengths is not None else None,
        "do": randn(shape_v, case.dtype, device, case.seed + 4),
        "dfinal": randn(state_shape, torch.float32, device, case.seed + 5) if case.with_dfinal else None,
    }


def _reference(x: dict, scale: float, to_fp64: bool) -> dict:
    """o, final_state and the gradients of q, k, v, initial_state from the reference (inputs upcast to fp64, or
    as they are: fp32 inside, outputs in the input dtype)."""
    cast = (lambda t: t.to(F64)) if to_fp64 else (lambda t: t)
    leaves = {name: cast(x[name]).detach().requires_grad_() for name in ("q", "k", "v")}
    if x["initial_state"] is not None:
        leaves["initial_state"] = cast(x["initial_state"]).detach().requires_grad_()
    o, final = lightning_attn_ref(leaves["q"], leaves["k"], leaves["v"], x["log_decay"], scale,
                                  leaves.get("initial_state"), True, x["cu_seqlens"])
    outputs, grads = [o], [cast(x["do"])]
    if x["dfinal"] is not None:
        outputs.append(final)
        grads.append(cast(x["dfinal"]))
    names = list(leaves)
    got = torch.autograd.grad(outputs, [leaves[n] for n in names], grads)
    result = {"o": o.detach(), "final_state": final.detach()}
    result.update({f"d{n}": g for n, g in zip(names, got)})
    return result


def _kernels(x: dict, scale: float, segment_len: Optional[int], reuse_forward: bool = True,
             cuda_output_stage: bool = False) -> dict:
    """Forward and backward through the launchers; reuse_forward: the backward gets what the forward returned
    for it (start states and packed tables), else it recomputes them; cuda_output_stage: the scans run the CUDA
    kernel (tests/ops/test_lightning_chunk_cuda.py)."""
    o, final, starts, tables = chunk.lightning_chunk_train_fwd(x["q"], x["k"], x["v"], x["log_decay"], scale,
                                                               x["initial_state"], x["cu_seqlens"], True,
                                                               segment_len=segment_len,
                                                               cuda_output_stage=cuda_output_stage)
    dq, dk, dv, dinitial = chunk.lightning_chunk_bwd(x["q"], x["k"], x["v"], x["log_decay"], scale,
                                                     x["initial_state"], x["cu_seqlens"], x["do"], x["dfinal"],
                                                     segment_len=segment_len,
                                                     start_states=starts if reuse_forward else None,
                                                     packed_tables=tables if reuse_forward else None,
                                                     cuda_output_stage=cuda_output_stage)
    result = {"o": o, "final_state": final, "dq": dq, "dk": dk, "dv": dv}
    if x["initial_state"] is not None:
        result["dinitial_state"] = dinitial
    else:
        assert dinitial is None
    return result


def _assert_matches(got: dict, lowp: dict, fp64: dict, dtype: torch.dtype) -> None:
    assert set(got) == set(fp64), f"outputs {sorted(got)} != reference outputs {sorted(fp64)}"
    for name, truth in fp64.items():
        out = got[name]
        assert not torch.isnan(truth).any(), f"{name}: the fp64 reference has NaN"
        # The fp32 reference can overflow exp() in the weights of zero-padded rows of a partial chunk under strong
        # decay (inf * 0 = NaN); there the allowance falls back to atol alone instead of passing vacuously.
        reference_lowp = torch.where(torch.isnan(lowp[name]), truth.to(lowp[name].dtype), lowp[name])
        expected_dtype = torch.float32 if name in ("final_state", "dinitial_state") else dtype
        assert out.dtype == expected_dtype, f"{name}: dtype {out.dtype}, expected {expected_dtype}"
        atol = ATOL_OF_MAX[dtype] * float(truth.abs().max()) + 1e-30
        assert_close_to_ref(out, reference_lowp, truth, c=2.0, atol=atol, name=name)
        assert relative_error(out, truth) <= NORM_TOL[dtype], f"{name}: norm-wise error {relative_error(out, truth)}"


def _check_case(case: Case, device: str, cuda_output_stage: bool = False) -> None:
    x = _make_inputs(case, device)
    scale = case.scale
    got = _kernels(x, scale, case.segment_len, case.reuse_forward, cuda_output_stage)
    _assert_matches(got, _reference(x, scale, to_fp64=False), _reference(x, scale, to_fp64=True), case.dtype)


# ------------------------------------------------------------------------------------------------ strategies

CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 tl.dot is wrong: bf16 runs on the GPU only
STRENGTHS = [1e-3, 1.0, 8.0]  # very weak, model-like, very strong decay


@st.composite
def dense_cases(draw, dtypes, head_dims, max_batch, max_heads, max_tokens, segment_lens, equal_dims=False):
    K = draw(st.sampled_from(head_dims))
    return Case(B=draw(st.integers(1, max_batch)), T=draw(st.integers(1, max_tokens)),
                H=draw(st.integers(1, max_heads)), K=K, V=K if equal_dims else draw(st.sampled_from(head_dims)),
                dtype=draw(st.sampled_from(dtypes)), lengths=None, with_initial=draw(st.booleans()),
                with_dfinal=draw(st.booleans()), strength=draw(st.sampled_from(STRENGTHS)),
                scale=draw(st.sampled_from([K ** -0.5, 1.0, 0.05])), segment_len=draw(st.sampled_from(segment_lens)),
                seed=draw(st.integers(0, 2**16)), reuse_forward=draw(st.booleans()))


@st.composite
def packed_cases(draw, dtypes, head_dims, max_heads, max_tokens, max_sequences, segment_lens):
    offsets, total = draw(cu_seqlens_strategy(max_tokens, max_sequences))
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    K = draw(st.sampled_from(head_dims))
    return Case(B=1, T=total, H=draw(st.integers(1, max_heads)), K=K, V=K, dtype=draw(st.sampled_from(dtypes)),
                lengths=lengths, with_initial=draw(st.booleans()), with_dfinal=draw(st.booleans()),
                strength=draw(st.sampled_from(STRENGTHS)), scale=K ** -0.5,
                segment_len=draw(st.sampled_from(segment_lens)), seed=draw(st.integers(0, 2**16)),
                reuse_forward=draw(st.booleans()))


# ------------------------------------------------------------------------------------------------ CPU / any device

@given(case=dense_cases(CPU_DTYPES, [16, 32], max_batch=2, max_heads=2, max_tokens=150,
                        segment_lens=[None, 64, 128]))
def test_dense_batch_matches_reference(case: Case):
    _check_case(case, triton_device())


@given(case=packed_cases(CPU_DTYPES, [16, 32], max_heads=2, max_tokens=200, max_sequences=4,
                         segment_lens=[None, 64]))
def test_packed_sequences_match_reference(case: Case):
    _check_case(case, triton_device())


@pytest.mark.parametrize("T, segment_len, strength", [
    (1, None, 1.0),  # a single token
    (64, None, 1e-4),  # exactly one chunk, nearly no decay
    (65, 64, 8.0),  # one token past the chunk, strong decay, two segments
    (200, 64, 1e-4),  # four segments, the last one partial
])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_edge_lengths_and_decays(T, segment_len, strength, dtype):
    case = Case(B=1, T=T, H=2, K=16, V=32, dtype=dtype, lengths=None, with_initial=True, with_dfinal=True,
                strength=strength, scale=0.25, segment_len=segment_len, seed=T)
    _check_case(case, triton_device())


def test_segmenting_does_not_change_the_result():
    """One pass per sequence and 64-token segments are the same computation up to fp32 rounding."""
    case = Case(B=1, T=150, H=1, K=32, V=32, dtype=torch.float32, lengths=[37, 113], with_initial=True,
                with_dfinal=True, strength=0.01, scale=0.2, segment_len=None, seed=7)
    x = _make_inputs(case, triton_device())
    whole = _kernels(x, case.scale, None)
    cut = _kernels(x, case.scale, 64)
    for name in whole:
        torch.testing.assert_close(cut[name], whole[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("lengths", [None, [37, 113]])
def test_backward_reuses_the_forward_start_states(lengths):
    """The forward returns its segment start states in the shape `start_states_shape` predicts; the backward
    given them computes what it computes from scratch (up to fp32 rounding: the forward decays v, the recomputation
    k), and it does use them: shifted start states move dq and nothing else; start states of another shape or on
    another device are refused, naming the argument."""
    device = triton_device()
    case = Case(B=1, T=150, H=2, K=32, V=32, dtype=torch.float32, lengths=lengths, with_initial=True,
                with_dfinal=True, strength=0.01, scale=0.2, segment_len=64, seed=17)
    x = _make_inputs(case, device)
    starts = chunk.lightning_chunk_train_fwd(x["q"], x["k"], x["v"], x["log_decay"], case.scale, x["initial_state"],
                                             x["cu_seqlens"], False, segment_len=64)[2]
    assert starts is not None and starts.shape == chunk.start_states_shape(x["q"], x["v"], x["cu_seqlens"],
                                                                           segment_len=64)
    reused = _kernels(x, case.scale, 64, reuse_forward=True)
    recomputed = _kernels(x, case.scale, 64, reuse_forward=False)
    for name in recomputed:
        torch.testing.assert_close(reused[name], recomputed[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    dq, dk, dv, dinitial = chunk.lightning_chunk_bwd(x["q"], x["k"], x["v"], x["log_decay"], case.scale,
                                                     x["initial_state"], x["cu_seqlens"], x["do"], x["dfinal"],
                                                     segment_len=64, start_states=starts + 1.0)
    assert (dq - reused["dq"]).abs().max() > 1e-3
    for name, got in (("dk", dk), ("dv", dv), ("dinitial_state", dinitial)):
        torch.testing.assert_close(got, reused[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    for wrong in (starts[1:], starts.to("meta")):
        with pytest.raises(ValueError, match="start_states"):
            chunk.lightning_chunk_bwd(x["q"], x["k"], x["v"], x["log_decay"], case.scale, x["initial_state"],
                                      x["cu_seqlens"], x["do"], x["dfinal"], segment_len=64, start_states=wrong)


def test_backward_reuses_the_forward_packed_tables():
    """Packed batches: the forward returns its chunk tables in the shape `packed_tables_shape` predicts; the
    backward given them computes exactly what it computes after building them itself, and it does read them (the
    tables of other lengths with the same shape give other gradients); tables of another shape or dtype, or without
    cu_seqlens, are refused, naming the argument."""
    device = triton_device()
    case = Case(B=1, T=150, H=2, K=16, V=32, dtype=torch.float32, lengths=[37, 113], with_initial=True,
                with_dfinal=True, strength=0.01, scale=0.2, segment_len=64, seed=23)
    x = _make_inputs(case, device)

    def forward_tables(cu_seqlens):
        return chunk.lightning_chunk_train_fwd(x["q"], x["k"], x["v"], x["log_decay"], case.scale, x["initial_state"],
                                               cu_seqlens, False, segment_len=64)[3]

    def backward(cu_seqlens, tables):
        return chunk.lightning_chunk_bwd(x["q"], x["k"], x["v"], x["log_decay"], case.scale, x["initial_state"],
                                         cu_seqlens, x["do"], x["dfinal"], segment_len=64, packed_tables=tables)

    tables = forward_tables(x["cu_seqlens"])
    assert tables.dtype == torch.int32
    assert tables.shape == chunk.packed_tables_shape(x["q"], x["v"], x["cu_seqlens"], segment_len=64)
    rebuilt = backward(x["cu_seqlens"], None)
    for name, got, want in zip(("dq", "dk", "dv", "dinitial_state"), backward(x["cu_seqlens"], tables), rebuilt):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    swapped = torch.tensor([0, 113, 150], dtype=x["cu_seqlens"].dtype, device=device)
    wrong_dv = backward(x["cu_seqlens"], forward_tables(swapped))[2]  # K != V: the V-column scans use the tables
    assert (wrong_dv - rebuilt[2]).abs().max() > 1e-3
    for cu_seqlens, wrong in ((x["cu_seqlens"], tables[1:]), (x["cu_seqlens"], tables.to(torch.int64)),
                              (None, tables)):
        with pytest.raises(ValueError, match="packed_tables"):
            backward(cu_seqlens, wrong)


def test_chunk_table_lists_every_chunk_and_leads_the_table_buffer():
    """The packed plan's chunk table holds (first token, rows, sequence, flags: 1 first chunk, 2 last) per chunk in
    order, and it starts the int32 buffer as a contiguous [max_chunks, 4] view: the CUDA scan copies its entries as
    16-byte vectors."""
    device = triton_device()
    cu_seqlens = torch.tensor([0, 3, 70, 71], dtype=torch.int32, device=device)
    plan = chunk._plan_packed(71, cu_seqlens, 2, 16, None)
    assert plan.chunk_table.data_ptr() == plan.tables.data_ptr()
    assert plan.chunk_table.shape == (plan.max_chunks, 4) and plan.chunk_table.is_contiguous()
    expected = [[0, 3, 0, 3], [3, 64, 1, 1], [67, 3, 1, 2], [70, 1, 2, 3]]
    assert plan.chunk_table[:4].tolist() == expected


def test_no_start_states_without_segments_or_with_unequal_head_dims():
    device = triton_device()
    for K, V, segment_len in ((32, 32, None), (16, 32, 64)):
        x = _make_inputs(Case(1, 150, 2, K, V, torch.float32, None, False, False, 1.0, 0.25, segment_len, 0), device)
        starts = chunk.lightning_chunk_train_fwd(x["q"], x["k"], x["v"], x["log_decay"], 0.25, None, None, False,
                                                 segment_len=segment_len)[2]
        assert starts is None and chunk.start_states_shape(x["q"], x["v"], None, segment_len=segment_len) == (0,)
        with pytest.raises(ValueError, match="start_states must be None"):
            chunk.lightning_chunk_bwd(x["q"], x["k"], x["v"], x["log_decay"], 0.25, None, None, x["do"], None,
                                      segment_len=segment_len, start_states=torch.zeros(1, 2, K, V, device=device))


def check_empty_sequence(device: str, dtype: torch.dtype, K: int, cuda_output_stage: bool = False) -> None:
    """Launcher level (the public op refuses empty sequences): an empty packed sequence keeps its initial state as
    its final state, its d initial_state is its d final_state, and its neighbours do not change."""
    case = Case(B=1, T=150, H=2, K=K, V=K, dtype=dtype, lengths=[70, 80], with_initial=True,
                with_dfinal=True, strength=1.0, scale=0.25, segment_len=None, seed=5)
    x = _make_inputs(case, device)
    state_shape = (1, case.H, case.K, case.V)
    empty_initial = randn(state_shape, torch.float32, device, 98)
    empty_dfinal = randn(state_shape, torch.float32, device, 99)
    with_empty = dict(x, cu_seqlens=torch.tensor([0, 70, 70, 150], dtype=torch.int32, device=device),
                      initial_state=torch.cat([x["initial_state"][:1], empty_initial, x["initial_state"][1:]]),
                      dfinal=torch.cat([x["dfinal"][:1], empty_dfinal, x["dfinal"][1:]]))
    for segment_len in (None, 64):
        base = _kernels(x, case.scale, segment_len, cuda_output_stage=cuda_output_stage)
        got = _kernels(with_empty, case.scale, segment_len, cuda_output_stage=cuda_output_stage)
        expected = dict(base)
        for name, middle in (("final_state", empty_initial), ("dinitial_state", empty_dfinal)):
            expected[name] = torch.cat([base[name][:1], middle, base[name][1:]])
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name} (segment_len {segment_len}): {m}")


def test_empty_sequence_passes_its_state_through():
    check_empty_sequence(triton_device(), torch.float32, 16)


def test_more_sequences_than_a_table_block(monkeypatch):
    """The table kernels walk sequences and chunks in blocks of TABLE_BLOCK: offsets carry across blocks (a small
    block here, so that a short batch spans several)."""
    monkeypatch.setattr(chunk, "TABLE_BLOCK", 16)
    lengths = [1 + (37 * i) % 90 for i in range(40)]
    case = Case(B=1, T=sum(lengths), H=1, K=16, V=16, dtype=torch.float32, lengths=lengths, with_initial=True,
                with_dfinal=True, strength=1.0, scale=0.25, segment_len=None, seed=13)
    _check_case(case, triton_device())


def test_final_state_only_when_asked():
    device = triton_device()
    x = _make_inputs(Case(1, 3, 1, 16, 16, torch.float32, None, False, False, 1.0, 0.25, None, 0), device)
    o, final = chunk.lightning_chunk_fwd(x["q"], x["k"], x["v"], x["log_decay"], 0.25, None, None, False)
    assert final is None and o.shape == x["v"].shape


def check_public_op(case: Case, device: str, backend: str) -> None:
    """hypenet.ops.lightning_attn(backend=...) with an initial state and a final state: forward and autograd through
    the op's registration, against the reference (case.with_initial and case.with_dfinal must be set)."""
    x = _make_inputs(case, device)
    leaves = {n: x[n].detach().requires_grad_() for n in ("q", "k", "v", "initial_state")}
    o, final = hypenet.ops.lightning_attn(leaves["q"], leaves["k"], leaves["v"], x["log_decay"], scale=case.scale,
                                          initial_state=leaves["initial_state"], output_final_state=True,
                                          cu_seqlens=x["cu_seqlens"], backend=backend)
    grads = torch.autograd.grad([o, final], list(leaves.values()), [x["do"], x["dfinal"]])
    got = {"o": o.detach(), "final_state": final.detach()}
    got.update({f"d{n}": g for n, g in zip(leaves, grads)})
    _assert_matches(got, _reference(x, case.scale, False), _reference(x, case.scale, True), case.dtype)


def test_public_op_runs_the_triton_kernels():
    """hypenet.ops.lightning_attn(backend="triton"): forward and autograd through the op's registration."""
    case = Case(B=1, T=90, H=2, K=16, V=16, dtype=torch.float32, lengths=[20, 70], with_initial=True,
                with_dfinal=True, strength=1.0, scale=0.25, segment_len=None, seed=11)
    check_public_op(case, triton_device(), "triton")


def test_unsupported_inputs_are_named():
    device = triton_device()
    q = torch.zeros(1, 4, 2, 48, device=device)
    reason = chunk.unsupported_reason(q, q, q)
    assert reason is not None and "48" in reason
    q16 = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16, device=device)
    if device == "cpu":  # the interpreter's bf16 dot is wrong: refused, never silently run
        assert "bf16" in (chunk.unsupported_reason(q16, q16, q16) or "")
    else:
        assert chunk.unsupported_reason(q16, q16, q16) is None
    with pytest.raises(ValueError, match="segment_len"):
        x = torch.zeros(1, 4, 1, 16, device=device)
        chunk.lightning_chunk_fwd(x, x, x, torch.zeros(1, device=device), 1.0, None, None, False, segment_len=100)


# ------------------------------------------------------------------------------------------------ GPU only

# The GPU cases keep K == V (the model's layout) and few dtypes: every new combination compiles ~10 kernels.
@pytest.mark.cuda
@given(case=dense_cases([torch.bfloat16, torch.float16], [64, 128], max_batch=3, max_heads=4, max_tokens=1500,
                        segment_lens=[None, 256], equal_dims=True))
def test_gpu_dense_batch_matches_reference(case: Case):
    _check_case(case, "cuda")


@pytest.mark.cuda
@given(case=packed_cases([torch.bfloat16], [64, 128], max_heads=4, max_tokens=3000, max_sequences=6,
                         segment_lens=[None, 128]))
def test_gpu_packed_sequences_match_reference(case: Case):
    _check_case(case, "cuda")


@pytest.mark.cuda
def test_gpu_long_sequence_state_does_not_drift():
    """65536 tokens, bf16, weak decays (memory of ~10^4 tokens): o, final_state and the gradients stay within the
    rule against fp64 although the default plan cuts the sequence into parallel segments."""
    case = Case(B=1, T=65536, H=2, K=128, V=128, dtype=torch.bfloat16, lengths=None, with_initial=True,
                with_dfinal=True, strength=1e-3, scale=128 ** -0.5, segment_len=None, seed=3)
    _check_case(case, "cuda")


def check_packed_graph_replay(cuda_output_stage: bool = False) -> None:
    """The packed tables are built on the device inside the call: a captured forward, replayed after cu_seqlens and
    the inputs change in place, equals an eager call on the new packing bit for bit (no host sync, nothing kept from
    capture time)."""
    first = Case(B=1, T=700, H=2, K=64, V=64, dtype=torch.bfloat16, lengths=[300, 100, 300], with_initial=True,
                 with_dfinal=False, strength=1.0, scale=0.125, segment_len=None, seed=21)
    batches = [_make_inputs(case, "cuda") for case in (first, replace(first, lengths=[50, 600, 50], seed=22))]
    log_decay = batches[0]["log_decay"]
    names = ("q", "k", "v", "initial_state", "cu_seqlens")
    static = {n: batches[0][n].clone() for n in names}

    def forward(x):
        return chunk.lightning_chunk_fwd(x["q"], x["k"], x["v"], log_decay, first.scale, x["initial_state"],
                                         x["cu_seqlens"], True, cuda_output_stage=cuda_output_stage)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels outside the capture
        forward(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, final = forward(static)
    for x in batches:
        for n in names:
            static[n].copy_(x[n])
        graph.replay()
        want_o, want_final = forward(x)
        torch.testing.assert_close(o, want_o, rtol=0, atol=0)
        torch.testing.assert_close(final, want_final, rtol=0, atol=0)


@pytest.mark.cuda
def test_gpu_packed_forward_replays_in_a_cuda_graph():
    check_packed_graph_replay()
