"""Shared test setup: Hypothesis profiles, NaN-poisoned allocations, device helpers.

Profiles: "cpu" (default: small shapes, few examples) and "gpu" (HYPOTHESIS_PROFILE=gpu: more examples, no
shrinking).
torch.empty / empty_like / new_empty are poisoned with NaN (integer tensors with a large sentinel) so that an
output element a kernel forgot to write fails the comparison instead of passing by luck.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

settings.register_profile("cpu", max_examples=8, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# No shrinking on the GPU: every shrink candidate with a new head dim, dtype or length class compiles new kernels,
# so shrinking a failure can use up a whole time-limited device run before the falsifying example is printed;
# without it the first failing example is printed as drawn.
settings.register_profile("gpu", max_examples=40, deadline=None, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cpu"))

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _poison(t: torch.Tensor) -> torch.Tensor:
    # no_grad: torch.empty(..., requires_grad=True) makes a leaf, which autograd forbids filling in place.
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool and t.numel():
            t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.uint8 else 255)
    return t


_empty, _empty_like, _new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty


def _poisoned_empty(*args, **kwargs):
    return _poison(_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_empty_like(*args, **kwargs))


def _poisoned_new_empty(self, *args, **kwargs):
    return _poison(_new_empty(self, *args, **kwargs))


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    """Every uninitialised allocation made during a test starts as NaN."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned_new_empty)
    yield


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def triton_device() -> str:
    """Where Triton kernels can run in this test session: "cuda" on a GPU, "cpu" under TRITON_INTERPRET=1."""
    if HAS_CUDA:
        return "cuda"
    if INTERPRET:
        return "cpu"
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")


@pytest.fixture
def triton_dev() -> str:
    return triton_device()
