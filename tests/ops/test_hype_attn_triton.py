"""The HyPE attention Triton kernels (`triton_ops.hype_attention.{fwd,bwd,decode}`) against the reference.

Properties, on Hypothesis-drawn shapes, GQA ratios (1, 2, 4, 8), alphas and scales:
- o and the gradients of q, k, v match `hype_attn_ref` under the tolerance rule (the fp64 run of the reference on
  the same low-precision inputs is the truth, its low-precision run sets the allowance), causal and not, odd T
  and S, T = 1, T < S (chunked prefill: the queries are the last T positions), strided (non-contiguous) inputs;
- packed ragged sequences (cu_seqlens_q / cu_seqlens_k, T_n <= S_n) match the reference run per sequence;
- decode against a KV cache matches `hype_attn_decode_ref` and the last rows of the full op, for any number of
  cache slices; a paged cache gives bit-identical outputs to the contiguous cache holding the same tokens;
- the public ops `hypenet.ops.hype_attn(..., backend="triton")` (autograd) and `hype_attn_decode` run these
  kernels;
- on a GPU: bf16 at larger shapes (the TMA load path for contiguous inputs, the pointer path for strided ones)
  and s_t at positions past 1M (a paged cache whose block table reuses a few physical blocks).
Outputs are NaN-poisoned before each run (tests/conftest.py), so an unwritten element fails.

Allowance: the rule's atol is a few units in the last place of the tensor's largest entry (at least 1) in the input
dtype. The
kernels round the softmax probabilities (and dS) to the input dtype before the tensor-core products, as every
flash-attention kernel does; the reference rounds only its output, so an element whose reference happens to round
almost exactly would otherwise allow no error at all. Norm-wise errors are checked tightly besides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import given, strategies as st

import hypenet.ops
from hypenet.ops.reference.hype_attention import hype_attn_decode_ref, hype_attn_lse_ref, hype_attn_ref
from tests.conftest import HAS_CUDA, triton_device
from tests.strategies import randn
from tests.tolerance import assert_close_to_ref
from triton_ops.hype_attention import bwd, decode, fwd

F64 = torch.float64
# atol of the rule in units of the largest |truth| of each tensor (see the module docstring), and the bound on the
# norm-wise relative error.
ATOL_OF_MAX = {torch.float32: 2.0 ** -17, torch.float16: 2.0 ** -8, torch.bfloat16: 2.0 ** -5}
NORM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
LSE_ATOL_OF_MAX = 2.0 ** -12
GPU_DTYPES = [torch.bfloat16, torch.float16]  # fp32 on CUDA is refused (no tensor-core path): see fwd.inputs_reason
# The tests below that run on any device: fp32 / fp16 under the interpreter (its bf16 tl.dot is wrong), 16-bit on
# a GPU.
ANY_DTYPES = GPU_DTYPES if HAS_CUDA else [torch.float32, torch.float16]
EXACT_DTYPE = torch.float16 if HAS_CUDA else torch.float32  # the tests of one dtype
ALPHAS = [None, 500.0, 1.5]  # no scaling, the 2B model's, a steep one (s_t grows fast)


@dataclass
class Case:
    B: int
    T: int  # queries (per batch row; the packed total when lengths_q is given)
    S: int  # keys
    Hq: int
    Hkv: int
    D: int
    dtype: torch.dtype
    alpha: Optional[float]
    scale: Optional[float]
    causal: bool
    strided: bool  # inputs as [B, H, L, D] tensors viewed as [B, L, H, D]
    lengths_q: Optional[list[int]]  # packed sequences (B == 1)
    lengths_k: Optional[list[int]]
    seed: int


def _offsets(lengths: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _tensor(shape, dtype, device, seed, strided: bool) -> torch.Tensor:
    if not strided:
        return randn(shape, dtype, device, seed)
    B, L, H, D = shape
    return randn((B, H, L, D), dtype, device, seed).transpose(1, 2)


def _make_inputs(case: Case, device: str) -> dict:
    x = {"q": _tensor((case.B, case.T, case.Hq, case.D), case.dtype, device, case.seed, case.strided),
         "k": _tensor((case.B, case.S, case.Hkv, case.D), case.dtype, device, case.seed + 1, case.strided),
         "v": _tensor((case.B, case.S, case.Hkv, case.D), case.dtype, device, case.seed + 2, case.strided),
         "do": randn((case.B, case.T, case.Hq, case.D), case.dtype, device, case.seed + 3),
         "cu_seqlens_q": None, "cu_seqlens_k": None}
    if case.lengths_q is not None:
        x["cu_seqlens_q"] = _offsets(case.lengths_q, device)
        x["cu_seqlens_k"] = _offsets(case.lengths_k, device)
    return x


def _references(x: dict, case: Case, given_o: torch.Tensor) -> tuple[dict, dict]:
    """o, lse and the gradients of q, k, v from the reference, with the inputs as they are and upcast to fp64; the
    gradients are those a backward given `given_o` (the kernels' o) should produce.

    Like every flash-attention backward, the kernel forms dS = P * (dP - delta) with delta = rowsum(do * o) from the
    o it is given, rounded to the input dtype; where dP and delta nearly cancel, that rounding moves dq and dk far
    more than one rounding of the result would. With delta off by e per row (e = rowsum(do * (given_o - o)), from
    the fp64 o), dq and dk are exactly the gradients of sum(o * do) - sum(e * lse), e held constant
    (d lse_t / d logits = P_t)."""
    args = (case.alpha, case.scale, case.causal, x["cu_seqlens_q"], x["cu_seqlens_k"])
    forwards = []
    for cast in ((lambda t: t), (lambda t: t.to(F64))):
        leaves = [cast(x[n]).detach().requires_grad_() for n in ("q", "k", "v")]
        forwards.append((leaves, hype_attn_ref(*leaves, *args), hype_attn_lse_ref(*leaves[:2], *args), cast(x["do"])))
    exact_o, do64 = forwards[1][1].detach(), forwards[1][3]
    delta_error = ((given_o.to(F64) - exact_o) * do64).sum(-1).transpose(1, 2)  # [B, Hq, T], like lse
    results = []
    for leaves, o, lse, do in forwards:
        objective = (o * do).sum() - (delta_error.to(lse.dtype) * lse).sum()
        dq, dk, dv = torch.autograd.grad(objective, leaves)
        results.append({"o": o.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv})
    return results[0], results[1]


def _kernels(x: dict, case: Case) -> dict:
    o, lse = fwd.hype_attn_fwd(x["q"], x["k"], x["v"], case.alpha, case.scale, case.causal, x["cu_seqlens_q"],
                               x["cu_seqlens_k"])
    assert lse.dtype == torch.float32 and lse.shape == (case.B, case.Hq, case.T)
    dq, dk, dv = bwd.hype_attn_bwd(x["q"], x["k"], x["v"], o, lse, x["do"], case.alpha, case.scale, case.causal,
                                   x["cu_seqlens_q"], x["cu_seqlens_k"])
    return {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def _assert_matches(got: dict, lowp: dict, fp64: dict, dtype: torch.dtype) -> None:
    for name, out in got.items():
        truth = fp64[name]
        # lse is float32 whatever the inputs: only the fp32 sums and exponentials round it.
        is_lse = name == "lse"
        assert out.dtype == (torch.float32 if is_lse else dtype), f"{name}: dtype {out.dtype}"
        # The inputs are O(1): below magnitude 1 the allowance stays at the ulps of 1 (a gradient that is exactly 0
        # in fp64, e.g. dq with a single key, is round-off in any finite precision).
        atol = (LSE_ATOL_OF_MAX if is_lse else ATOL_OF_MAX[dtype]) * max(float(truth.abs().max()), 1.0)
        assert_close_to_ref(out, lowp[name], truth, c=2.0, atol=atol, name=name)
        err = float((out.double() - truth).norm())
        bound = NORM_TOL[dtype] * float(truth.norm()) + ATOL_OF_MAX[dtype] * truth.numel() ** 0.5
        assert err <= bound, f"{name}: norm-wise error {err:.3e} > {bound:.3e} (|truth| {float(truth.norm()):.3e})"


def _assert_matches_reference(x: dict, case: Case, got: dict) -> None:
    """got: o and any of lse, dq, dk, dv for these inputs, the gradients from a backward given got's o."""
    _assert_matches(got, *_references(x, case, got["o"]), case.dtype)


def _check_case(case: Case, device: str) -> None:
    x = _make_inputs(case, device)
    _assert_matches_reference(x, case, _kernels(x, case))


# ------------------------------------------------------------------------------------------------ strategies

@st.composite
def dense_cases(draw, dtypes, head_dims, max_batch, max_kv_heads, max_tokens, max_prefix):
    T = draw(st.integers(1, max_tokens))
    Hkv = draw(st.integers(1, max_kv_heads))
    return Case(B=draw(st.integers(1, max_batch)), T=T, S=T + draw(st.sampled_from([0, 0, 1, max_prefix])),
                Hq=Hkv * draw(st.sampled_from([1, 2, 4, 8])), Hkv=Hkv, D=draw(st.sampled_from(head_dims)),
                dtype=draw(st.sampled_from(dtypes)), alpha=draw(st.sampled_from(ALPHAS)),
                scale=draw(st.sampled_from([None, 0.3])), causal=draw(st.booleans()), strided=draw(st.booleans()),
                lengths_q=None, lengths_k=None, seed=draw(st.integers(0, 2**16)))


@st.composite
def packed_cases(draw, dtypes, head_dims, max_kv_heads, max_sequences, max_tokens, max_prefix):
    n = draw(st.integers(1, max_sequences))
    lengths_q = draw(st.lists(st.integers(1, max_tokens), min_size=n, max_size=n))
    prefixes = draw(st.lists(st.integers(0, max_prefix), min_size=n, max_size=n))
    lengths_k = [t + p for t, p in zip(lengths_q, prefixes)]
    Hkv = draw(st.integers(1, max_kv_heads))
    return Case(B=1, T=sum(lengths_q), S=sum(lengths_k), Hq=Hkv * draw(st.sampled_from([1, 2, 4, 8])), Hkv=Hkv,
                D=draw(st.sampled_from(head_dims)), dtype=draw(st.sampled_from(dtypes)),
                alpha=draw(st.sampled_from(ALPHAS)), scale=None, causal=draw(st.booleans()), strided=False,
                lengths_q=lengths_q, lengths_k=lengths_k, seed=draw(st.integers(0, 2**16)))


# ------------------------------------------------------------------------------------------------ CPU / any device

@given(case=dense_cases(ANY_DTYPES, [64], max_batch=2, max_kv_heads=1, max_tokens=33, max_prefix=37))
def test_dense_batch_matches_reference(case: Case):
    _check_case(case, triton_device())


@given(case=packed_cases(ANY_DTYPES, [64], max_kv_heads=1, max_sequences=3, max_tokens=20, max_prefix=40))
def test_packed_sequences_match_reference(case: Case):
    _check_case(case, triton_device())


@pytest.mark.parametrize("T, S, D, causal", [
    (1, 1, 64, True),  # a single token
    (1, 150, 128, True),  # one query after a long prefix: several key blocks, only the last one masked
    (130, 130, 64, True),  # one query block past 128 rows: two query blocks, the second nearly empty
    (129, 200, 64, False),  # non-causal with partial query and key blocks
])
def test_edge_lengths(T, S, D, causal):
    case = Case(B=1, T=T, S=S, Hq=2, Hkv=1, D=D, dtype=EXACT_DTYPE, alpha=500.0, scale=None, causal=causal,
                strided=False, lengths_q=None, lengths_k=None, seed=T + S)
    _check_case(case, triton_device())


@dataclass
class DecodeCase:
    B: int
    Tq: int
    Hq: int
    Hkv: int
    D: int
    dtype: torch.dtype
    alpha: Optional[float]
    seqlens: list[int]  # valid tokens per row, >= Tq
    capacity: int  # S_max, a multiple of block_size
    block_size: int
    num_splits: Optional[int]
    seed: int


@st.composite
def decode_cases(draw, dtypes, head_dims, max_batch, max_capacity_blocks, block_sizes):
    B = draw(st.integers(1, max_batch))
    Tq = draw(st.integers(1, 4))
    block_size = draw(st.sampled_from(block_sizes))
    capacity = block_size * draw(st.integers(max(1, -(-Tq // block_size)), max_capacity_blocks))
    Hkv = draw(st.integers(1, 2))
    return DecodeCase(B=B, Tq=Tq, Hq=Hkv * draw(st.sampled_from([1, 2, 4, 8])), Hkv=Hkv,
                      D=draw(st.sampled_from(head_dims)), dtype=draw(st.sampled_from(dtypes)),
                      alpha=draw(st.sampled_from(ALPHAS)),
                      seqlens=draw(st.lists(st.integers(Tq, capacity), min_size=B, max_size=B)), capacity=capacity,
                      block_size=block_size, num_splits=draw(st.sampled_from([None, 1, 3])),
                      seed=draw(st.integers(0, 2**16)))


def _decode_inputs(case: DecodeCase, device: str) -> dict:
    shape = (case.B, case.capacity, case.Hkv, case.D)
    x = {"q": randn((case.B, case.Tq, case.Hq, case.D), case.dtype, device, case.seed),
         "k_cache": randn(shape, case.dtype, device, case.seed + 1),
         "v_cache": randn(shape, case.dtype, device, case.seed + 2),
         "seqlens": torch.tensor(case.seqlens, dtype=torch.int32, device=device)}
    # The same tokens in a paged cache: blocks of every row scattered over a shuffled pool with spare blocks.
    blocks = case.capacity // case.block_size
    pool = case.B * blocks + 2
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(case.seed))[:case.B * blocks]
    x["block_table"] = order.reshape(case.B, blocks).to(torch.int32).to(device)
    for name in ("k", "v"):
        pages = randn((pool, case.block_size, case.Hkv, case.D), case.dtype, device, case.seed + 5)
        pages[order.to(device)] = x[f"{name}_cache"].reshape(case.B * blocks, case.block_size, case.Hkv, case.D)
        x[f"{name}_pages"] = pages
    return x


def _check_decode(case: DecodeCase, device: str) -> None:
    x = _decode_inputs(case, device)
    o = decode.hype_attn_decode(x["q"], x["k_cache"], x["v_cache"], x["seqlens"], case.alpha, None, None,
                                num_splits=case.num_splits)
    paged = decode.hype_attn_decode(x["q"], x["k_pages"], x["v_pages"], x["seqlens"], case.alpha, None,
                                    x["block_table"], num_splits=case.num_splits)
    truth = hype_attn_decode_ref(x["q"].to(F64), x["k_cache"].to(F64), x["v_cache"].to(F64), x["seqlens"],
                                 case.alpha)
    lowp = hype_attn_decode_ref(x["q"], x["k_cache"], x["v_cache"], x["seqlens"], case.alpha)
    assert o.dtype == case.dtype
    _assert_matches({"o": o}, {"o": lowp}, {"o": truth}, case.dtype)
    # Same tokens, same capacity, so the same slices in the same order: bit-identical.
    assert torch.equal(paged, o), f"paged differs from contiguous by {(paged.double() - o.double()).abs().max()}"


@given(case=decode_cases(ANY_DTYPES, [64, 128], max_batch=3, max_capacity_blocks=5, block_sizes=[16, 32]))
def test_decode_matches_reference_and_paged_equals_contiguous(case: DecodeCase):
    _check_decode(case, triton_device())


def test_decode_equals_last_rows_of_full_attention():
    """Decoding the last Tq tokens of each row against its cache == the last Tq rows of the causal full op."""
    device = triton_device()
    case = DecodeCase(B=2, Tq=3, Hq=4, Hkv=2, D=64, dtype=EXACT_DTYPE, alpha=500.0, seqlens=[70, 45],
                      capacity=80, block_size=16, num_splits=2, seed=21)
    x = _decode_inputs(case, device)
    o = decode.hype_attn_decode(x["q"], x["k_cache"], x["v_cache"], x["seqlens"], case.alpha, None, None,
                                num_splits=case.num_splits)
    for b, length in enumerate(case.seqlens):
        k, v = x["k_cache"][b:b + 1, :length], x["v_cache"][b:b + 1, :length]
        full, _ = fwd.hype_attn_fwd(x["q"][b:b + 1], k, v, case.alpha, None, True, None, None)
        # Different tilings round the probabilities at different places: a few ulps of the dtype apart.
        tol = 1e-5 if case.dtype == torch.float32 else 4e-3
        torch.testing.assert_close(o[b:b + 1], full, rtol=tol, atol=tol)


def test_public_ops_run_the_triton_kernels():
    """hypenet.ops.hype_attn(backend="triton") under autograd, and hype_attn_decode(backend="triton")."""
    device = triton_device()
    case = Case(B=1, T=50, S=90, Hq=4, Hkv=2, D=64, dtype=EXACT_DTYPE, alpha=500.0, scale=None, causal=True,
                strided=False, lengths_q=[20, 30], lengths_k=[50, 40], seed=5)
    x = _make_inputs(case, device)
    leaves = [x[n].detach().requires_grad_() for n in ("q", "k", "v")]
    o = hypenet.ops.hype_attn(*leaves, alpha=case.alpha, cu_seqlens_q=x["cu_seqlens_q"],
                              cu_seqlens_k=x["cu_seqlens_k"], backend="triton")
    dq, dk, dv = torch.autograd.grad(o, leaves, x["do"])
    got = {"o": o.detach(), "dq": dq, "dk": dk, "dv": dv}
    _assert_matches_reference(x, case, got)

    dcase = DecodeCase(B=2, Tq=1, Hq=4, Hkv=2, D=64, dtype=EXACT_DTYPE, alpha=500.0, seqlens=[33, 64],
                       capacity=64, block_size=16, num_splits=None, seed=8)
    y = _decode_inputs(dcase, device)
    o = hypenet.ops.hype_attn_decode(y["q"], y["k_pages"], y["v_pages"], y["seqlens"], alpha=dcase.alpha,
                                     block_table=y["block_table"], backend="triton")
    truth = hype_attn_decode_ref(y["q"].to(F64), y["k_cache"].to(F64), y["v_cache"].to(F64), y["seqlens"],
                                 dcase.alpha)
    lowp = hype_attn_decode_ref(y["q"], y["k_cache"], y["v_cache"], y["seqlens"], dcase.alpha)
    _assert_matches({"o": o}, {"o": lowp}, {"o": truth}, dcase.dtype)


@pytest.mark.parametrize("fwd_config, dkdv_config, dq_config", [
    ((64, 32, 4, 2), (32, 64, 4, 2), (32, 64, 4, 2)),
    ((32, 64, 4, 1), (64, 32, 4, 1), (64, 16, 4, 1)),
])
def test_kernel_configs_other_than_the_tables_match_reference(fwd_config, dkdv_config, dq_config):
    # The block sizes a tuning sweep (benches.hype_attn_tune) passes in: partial blocks on both sides, causal.
    case = Case(B=1, T=45, S=70, Hq=2, Hkv=1, D=64, dtype=EXACT_DTYPE, alpha=500.0, scale=None, causal=True,
                strided=False, lengths_q=None, lengths_k=None, seed=7)
    x = _make_inputs(case, triton_device())
    o, lse = fwd.hype_attn_fwd(x["q"], x["k"], x["v"], case.alpha, config=fwd_config)
    dq, dk, dv = bwd.hype_attn_bwd(x["q"], x["k"], x["v"], o, lse, x["do"], case.alpha,
                                   dkdv_config=dkdv_config, dq_config=dq_config)
    _assert_matches_reference(x, case, {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv})


@pytest.mark.parametrize("config", [(48, 64, 4, 2), (64, 64, 3, 2), (64, 64, 4, 0), [64, 64, 4, 2], (64, 64, 4)])
def test_bad_kernel_configs_are_named(config):
    q = torch.zeros(1, 4, 2, 64, dtype=EXACT_DTYPE, device=triton_device())
    with pytest.raises(ValueError, match="config must be"):
        fwd.hype_attn_fwd(q, q, q, config=config)
    o, lse = fwd.hype_attn_fwd(q, q, q)
    with pytest.raises(ValueError, match="dq_config must be"):
        bwd.hype_attn_bwd(q, q, q, o, lse, q, dq_config=config)


def test_tma_setting_reads_zero_or_one(monkeypatch):
    assert fwd.tma_setting(None) and fwd.tma_setting("1") and not fwd.tma_setting("0")
    monkeypatch.setenv("HYPENET_HYPE_TMA", "yes")
    with pytest.raises(ValueError, match="HYPENET_HYPE_TMA must be 0 or 1, got 'yes'"):
        fwd.use_tma(torch.zeros(1, 4, 2, 64))


def test_unsupported_inputs_are_named():
    device = triton_device()
    q = torch.zeros(1, 4, 2, 96, dtype=torch.float16, device=device)
    reason = fwd.unsupported_reason(q, q, q)
    assert reason is not None and "96" in reason
    assert bwd.unsupported_reason(q, q, q) == reason
    q64 = torch.zeros(1, 4, 2, 64, dtype=torch.float64, device=device)
    assert "float64" in fwd.unsupported_reason(q64, q64, q64)
    q32 = torch.zeros(1, 4, 2, 64, dtype=torch.float32, device=device)
    assert (fwd.unsupported_reason(q32, q32, q32) is not None) == (device == "cuda")
    cache = torch.zeros(1, 8, 2, 96, dtype=torch.float16, device=device)
    assert "96" in decode.unsupported_reason(q, cache, cache)
    ok = torch.zeros(1, 4, 2, 64, dtype=torch.float16, device=device)
    assert fwd.unsupported_reason(ok, ok[:, :, :1], ok[:, :, :1]) is None
    assert decode.unsupported_reason(ok, ok, ok) is None
    many = torch.zeros(1, 40, 8, 64, dtype=torch.float16, device=device)  # 40 tokens x 4 heads per kv head
    assert "128" in decode.unsupported_reason(many, ok, ok)


# ------------------------------------------------------------------------------------------------ GPU only

@pytest.mark.cuda
@given(case=dense_cases(GPU_DTYPES, [64, 128], max_batch=3, max_kv_heads=2, max_tokens=700,
                        max_prefix=333))
def test_gpu_dense_batch_matches_reference(case: Case):
    _check_case(case, "cuda")


@pytest.mark.cuda
@given(case=packed_cases(GPU_DTYPES, [64, 128], max_kv_heads=2, max_sequences=6, max_tokens=400, max_prefix=300))
def test_gpu_packed_sequences_match_reference(case: Case):
    _check_case(case, "cuda")


@pytest.mark.cuda
def test_gpu_dkdv_after_an_empty_query_range():
    """One packed sequence of 58 queries and 116 keys (D = 128, bf16, not causal): the dk/dv kernel's range of full
    query blocks is empty and its masked last block is not. Such launches once hung intermittently (the kernel never
    finished): 40 in a row must finish, and match the reference."""
    case = Case(B=1, T=58, S=116, Hq=1, Hkv=1, D=128, dtype=torch.bfloat16, alpha=500.0, scale=None, causal=False,
                strided=False, lengths_q=[58], lengths_k=[116], seed=0)
    x = _make_inputs(case, "cuda")
    for _ in range(40):
        got = _kernels(x, case)
        torch.cuda.synchronize()
    _assert_matches_reference(x, case, got)


@pytest.mark.cuda
@given(case=decode_cases(GPU_DTYPES, [64, 128], max_batch=4, max_capacity_blocks=40, block_sizes=[16, 64, 256]))
def test_gpu_decode_matches_reference_and_paged_equals_contiguous(case: DecodeCase):
    _check_decode(case, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_positions_past_one_million(dtype):
    """s_t at positions ~1.2M (s = 2.26 for alpha = 500): decode a paged cache of 1.2M tokens whose block table
    cycles through 16 physical blocks, against the reference over the same tokens."""
    block_size, distinct = 256, 16
    length = 1_200_000 + 37
    blocks = -(-length // block_size)
    q = randn((1, 2, 4, 64), dtype, "cuda", 1)
    k_pages = randn((distinct, block_size, 1, 64), dtype, "cuda", 2)
    v_pages = randn((distinct, block_size, 1, 64), dtype, "cuda", 3)
    table = (torch.arange(blocks, device="cuda") % distinct).to(torch.int32)[None]
    seqlens = torch.tensor([length], dtype=torch.int32, device="cuda")
    o = decode.hype_attn_decode(q, k_pages, v_pages, seqlens, 500.0, None, table)
    truth = hype_attn_decode_ref(q.to(F64), k_pages.to(F64), v_pages.to(F64), seqlens, 500.0, block_table=table)
    lowp = hype_attn_decode_ref(q, k_pages, v_pages, seqlens, 500.0, block_table=table)
    _assert_matches({"o": o}, {"o": lowp}, {"o": truth}, dtype)
