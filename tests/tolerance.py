"""The tolerance rule of the tests (as in flash-attention): a kernel may be at most `c` times as far from the fp64
truth as the reference computed in the same low precision, plus `atol`. NaN never passes."""

from __future__ import annotations

import torch


def assert_close_to_ref(out: torch.Tensor, ref_lowp: torch.Tensor, ref_fp64: torch.Tensor, *, c: float = 2.0,
                        atol: float = 1e-5, name: str = "out") -> None:
    """|out - ref_fp64| <= c * |ref_lowp - ref_fp64| + atol elementwise; shapes equal; no NaN anywhere."""
    assert out.shape == ref_fp64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_fp64.shape)}"
    truth = ref_fp64.double()
    got = out.double()
    assert not torch.isnan(got).any(), f"{name}: {int(torch.isnan(got).sum())} NaN elements (unwritten output?)"
    err = (got - truth).abs()
    allowed = c * (ref_lowp.double() - truth).abs() + atol
    bad = ~(err <= allowed)  # a NaN allowance (NaN in ref_lowp) fails too
    if bad.any():
        worst = int(torch.argmax(err - allowed))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements off; worst at flat index {worst}: "
            f"|err| = {err.flatten()[worst]:.3e} > allowed {allowed.flatten()[worst]:.3e} "
            f"(max |err| {err.max():.3e}, max |ref_lowp - ref_fp64| {(ref_lowp.double() - truth).abs().max():.3e})")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64."""
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))
