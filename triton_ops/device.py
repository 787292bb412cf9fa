"""Facts about the device that size kernel launches (host-side only; safe under CUDA graph capture)."""

from __future__ import annotations

import functools

import torch

# Under the Triton interpreter (CPU tensors) a small count still exercises multi-program code paths.
INTERPRETER_SM_COUNT = 4


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; INTERPRETER_SM_COUNT for CPU tensors."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
