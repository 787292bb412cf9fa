"""The fused norm Triton kernels (`triton_ops.norm`) against the references.

Properties, on Hypothesis-drawn shapes and dtypes:
- rmsnorm_gate: y and the gradients of x, z and weight match `rmsnorm_gate_ref` under the tolerance rule (the fp64
  run of the reference on the same low-precision inputs is the truth, its low-precision run sets the allowance), for
  any leading shape and channel counts that are not powers of two; rstd is 1 / sqrt(mean(x^2) + eps);
- qk_norm_rope: q_out, k_out and the gradients of q, k and both weights match `qk_norm_rope_ref`, with per-batch or
  shared rotary tables, different q and k head counts, strided q and k;
- the public ops `hypenet.ops.rmsnorm_gate` / `qk_norm_rope` (backend="triton") run these kernels under autograd.
Outputs are NaN-poisoned before each run (tests/conftest.py), so an unwritten element fails.

Allowance: a few units in the last place of each tensor's largest entry (at least 1) in the output dtype, on top of
the rule: the kernels and the reference both compute in fp32 and round once, but the weight gradients sum over
every row in a different order.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, strategies as st

import hypenet.ops
from hypenet.ops.reference.norm import qk_norm_rope_ref, rmsnorm_gate_ref
from tests.conftest import triton_device
from tests.strategies import randn
from tests.tolerance import assert_close_to_ref
from triton_ops import norm

F64 = torch.float64
ATOL_OF_MAX = {torch.float32: 2.0 ** -18, torch.float16: 2.0 ** -9, torch.bfloat16: 2.0 ** -6}
CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS = 1e-6


def _assert_matches(got: dict, lowp: dict, fp64: dict) -> None:
    for name, truth in fp64.items():
        out = got[name]
        assert out.dtype == lowp[name].dtype, f"{name}: dtype {out.dtype}, expected {lowp[name].dtype}"
        atol = ATOL_OF_MAX[out.dtype] * max(float(truth.abs().max()), 1.0)
        assert_close_to_ref(out, lowp[name], truth, c=2.0, atol=atol, name=name)


# ------------------------------------------------------------------------------------------------ rmsnorm_gate

@dataclass
class GateCase:
    shape: tuple  # (..., C)
    dtype: torch.dtype
    weight_dtype: torch.dtype
    seed: int


@st.composite
def gate_cases(draw, dtypes, max_rows, channels):
    lead = draw(st.lists(st.integers(1, max_rows), min_size=0, max_size=2))
    dtype = draw(st.sampled_from(dtypes))
    return GateCase(shape=(*lead, draw(st.sampled_from(channels))), dtype=dtype,
                    weight_dtype=draw(st.sampled_from([dtype, torch.float32])), seed=draw(st.integers(0, 2**16)))


def _gate_reference(x: dict, to_fp64: bool) -> dict:
    cast = (lambda t: t.to(F64)) if to_fp64 else (lambda t: t)
    leaves = [cast(x[n]).detach().requires_grad_() for n in ("x", "z", "weight")]
    y = rmsnorm_gate_ref(*leaves, EPS)
    dx, dz, dweight = torch.autograd.grad(y, leaves, cast(x["dy"]))
    return {"y": y.detach(), "dx": dx, "dz": dz, "dweight": dweight}


def _check_gate(case: GateCase, device: str) -> None:
    x = {"x": randn(case.shape, case.dtype, device, case.seed),
         "z": randn(case.shape, case.dtype, device, case.seed + 1),
         "weight": randn(case.shape[-1:], case.weight_dtype, device, case.seed + 2),
         "dy": randn(case.shape, case.dtype, device, case.seed + 3)}
    y, rstd = norm.rmsnorm_gate_fwd(x["x"], x["z"], x["weight"], EPS)
    expected_rstd = torch.rsqrt(x["x"].double().pow(2).mean(-1) + EPS)
    torch.testing.assert_close(rstd.double(), expected_rstd, rtol=1e-5, atol=0)
    dx, dz, dweight = norm.rmsnorm_gate_bwd(x["x"], x["z"], x["weight"], rstd, x["dy"])
    got = {"y": y, "dx": dx, "dz": dz, "dweight": dweight}
    _assert_matches(got, _gate_reference(x, False), _gate_reference(x, True))


@given(case=gate_cases(CPU_DTYPES, max_rows=9, channels=[1, 7, 64, 200]))
def test_rmsnorm_gate_matches_reference(case: GateCase):
    _check_gate(case, triton_device())


# ------------------------------------------------------------------------------------------------ qk_norm_rope

@dataclass
class RopeCase:
    B: int
    T: int
    Hq: int
    Hk: int
    D: int
    dtype: torch.dtype
    shared_tables: bool  # cos / sin of shape [1, T, D] instead of [B, T, D]
    strided: bool  # q and k as [B, H, T, D] tensors viewed as [B, T, H, D]
    seed: int


@st.composite
def rope_cases(draw, dtypes, max_batch, max_tokens, max_heads, head_dims):
    return RopeCase(B=draw(st.integers(1, max_batch)), T=draw(st.integers(1, max_tokens)),
                    Hq=draw(st.integers(1, max_heads)), Hk=draw(st.integers(1, max_heads)),
                    D=draw(st.sampled_from(head_dims)), dtype=draw(st.sampled_from(dtypes)),
                    shared_tables=draw(st.booleans()), strided=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _rope_inputs(case: RopeCase, device: str) -> dict:
    def heads(H, seed):
        if case.strided:
            return randn((case.B, H, case.T, case.D), case.dtype, device, seed).transpose(1, 2)
        return randn((case.B, case.T, H, case.D), case.dtype, device, seed)

    # transformers' tables: angles of D / 2 frequencies at each position, each half repeated.
    positions = torch.arange(case.T, dtype=F64)[None, :, None] + (0 if case.shared_tables else
                                                                  torch.arange(case.B, dtype=F64)[:, None, None] * 7)
    freqs = 1e4 ** (-torch.arange(0, case.D, 2, dtype=F64) / case.D)
    angles = torch.cat([positions * freqs] * 2, dim=-1)
    return {"q": heads(case.Hq, case.seed), "k": heads(case.Hk, case.seed + 1),
            "q_weight": randn((case.D,), case.dtype, device, case.seed + 2),
            "k_weight": randn((case.D,), case.dtype, device, case.seed + 3),
            "cos": angles.cos().to(case.dtype).to(device), "sin": angles.sin().to(case.dtype).to(device),
            "dq_out": randn((case.B, case.T, case.Hq, case.D), case.dtype, device, case.seed + 4),
            "dk_out": randn((case.B, case.T, case.Hk, case.D), case.dtype, device, case.seed + 5)}


def _rope_reference(x: dict, to_fp64: bool) -> dict:
    cast = (lambda t: t.to(F64)) if to_fp64 else (lambda t: t)
    names = ("q", "k", "q_weight", "k_weight")
    leaves = [cast(x[n]).detach().requires_grad_() for n in names]
    q_out, k_out = qk_norm_rope_ref(*leaves, cast(x["cos"]), cast(x["sin"]), EPS)
    grads = torch.autograd.grad([q_out, k_out], leaves, [cast(x["dq_out"]), cast(x["dk_out"])])
    result = {"q_out": q_out.detach(), "k_out": k_out.detach()}
    result.update({f"d{n}": g for n, g in zip(names, grads)})
    return result


def _check_rope(case: RopeCase, device: str) -> None:
    x = _rope_inputs(case, device)
    q_out, k_out, q_rstd, k_rstd = norm.qk_norm_rope_fwd(x["q"], x["k"], x["q_weight"], x["k_weight"], x["cos"],
                                                         x["sin"], EPS)
    for rstd, t in ((q_rstd, x["q"]), (k_rstd, x["k"])):
        torch.testing.assert_close(rstd.double(), torch.rsqrt(t.double().pow(2).mean(-1) + EPS), rtol=1e-5, atol=0)
    dq, dk, dq_weight, dk_weight = norm.qk_norm_rope_bwd(x["q"], x["k"], x["q_weight"], x["k_weight"], x["cos"],
                                                         x["sin"], q_rstd, k_rstd, x["dq_out"], x["dk_out"])
    got = {"q_out": q_out, "k_out": k_out, "dq": dq, "dk": dk, "dq_weight": dq_weight, "dk_weight": dk_weight}
    _assert_matches(got, _rope_reference(x, False), _rope_reference(x, True))


@given(case=rope_cases(CPU_DTYPES, max_batch=2, max_tokens=9, max_heads=3, head_dims=[2, 6, 64, 128]))
def test_qk_norm_rope_matches_reference(case: RopeCase):
    _check_rope(case, triton_device())


def test_public_ops_run_the_triton_kernels():
    device = triton_device()
    gate = GateCase(shape=(2, 3, 48), dtype=torch.float32, weight_dtype=torch.float32, seed=1)
    x = {"x": randn(gate.shape, gate.dtype, device, 1), "z": randn(gate.shape, gate.dtype, device, 2),
         "weight": randn((48,), gate.dtype, device, 3), "dy": randn(gate.shape, gate.dtype, device, 4)}
    leaves = [x[n].detach().requires_grad_() for n in ("x", "z", "weight")]
    y = hypenet.ops.rmsnorm_gate(*leaves, eps=EPS, backend="triton")
    dx, dz, dweight = torch.autograd.grad(y, leaves, x["dy"])
    _assert_matches({"y": y.detach(), "dx": dx, "dz": dz, "dweight": dweight}, _gate_reference(x, False),
                    _gate_reference(x, True))

    rope = RopeCase(B=2, T=5, Hq=4, Hk=2, D=64, dtype=torch.float32, shared_tables=True, strided=False, seed=9)
    y = _rope_inputs(rope, device)
    names = ("q", "k", "q_weight", "k_weight")
    leaves = [y[n].detach().requires_grad_() for n in names]
    q_out, k_out = hypenet.ops.qk_norm_rope(*leaves, y["cos"], y["sin"], eps=EPS, backend="triton")
    grads = torch.autograd.grad([q_out, k_out], leaves, [y["dq_out"], y["dk_out"]])
    got = {"q_out": q_out.detach(), "k_out": k_out.detach()}
    got.update({f"d{n}": g for n, g in zip(names, grads)})
    _assert_matches(got, _rope_reference(y, False), _rope_reference(y, True))


def test_unsupported_inputs_are_named():
    device = triton_device()
    x = torch.zeros(2, 8, dtype=torch.float64, device=device)
    assert "float64" in norm.unsupported_reason(x, x, x)
    wide = torch.zeros(1, norm.MAX_CHANNELS + 1, device=device)
    assert str(norm.MAX_CHANNELS) in norm.unsupported_reason(wide, wide, wide[0])
    ok = torch.zeros(1, 2, 3, 64, dtype=torch.float16, device=device)
    assert norm.unsupported_reason(ok, ok, ok[0, 0, 0], ok[0, 0, 0], ok[0], ok[0]) is None


# ------------------------------------------------------------------------------------------------ GPU only

@pytest.mark.cuda
@given(case=gate_cases(GPU_DTYPES, max_rows=300, channels=[128, 2048, 4096, 1000]))
def test_gpu_rmsnorm_gate_matches_reference(case: GateCase):
    _check_gate(case, "cuda")


@pytest.mark.cuda
@given(case=rope_cases(GPU_DTYPES, max_batch=3, max_tokens=700, max_heads=32, head_dims=[64, 128]))
def test_gpu_qk_norm_rope_matches_reference(case: RopeCase):
    _check_rope(case, "cuda")
