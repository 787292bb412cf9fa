"""Loader of the compiled extension `hypenet._C`, whose import registers the `torch.ops.hypenet_cuda.*` kernels.

Importing this module never raises: when the extension is missing (pure-Python install, CPU torch, a build for
another torch) the CUDA backend is simply unavailable and `cuda_ext_error()` says why. setup.py records what it
built in `hypenet/_build_info.json`:
    {"cuda_ops": ["lightning_attn_step", ...], "archs": ["90a"], "torch": "2.11.0+cu130", "cuda": "13.0",
     "skipped_reason": null}
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

BUILD_INFO_PATH = Path(__file__).resolve().parent.parent / "_build_info.json"


def _read_build_info() -> tuple[dict, Optional[str]]:
    try:
        return json.loads(BUILD_INFO_PATH.read_text()), None
    except FileNotFoundError:
        return {}, f"{BUILD_INFO_PATH.name} is missing (hypenet was not installed with setup.py)"
    except (OSError, ValueError) as err:
        return {}, f"{BUILD_INFO_PATH} is unreadable: {err}"


def _load() -> tuple[dict, frozenset[str], Optional[str]]:
    """(build info, ops usable now, why the extension is unusable or None)."""
    info, error = _read_build_info()
    if error is None and info.get("skipped_reason"):
        error = f"the CUDA extension was not built: {info['skipped_reason']}"
    if error is not None:
        return info, frozenset(), error
    try:
        import hypenet._C  # noqa: F401  (the import registers torch.ops.hypenet_cuda.*)
    except Exception as err:  # noqa: BLE001 - any failure (missing .so, ABI mismatch) means "unavailable, because"
        return info, frozenset(), f"import hypenet._C failed: {type(err).__name__}: {err}"
    registered = frozenset(op for op in info.get("cuda_ops", []) if hasattr(torch.ops.hypenet_cuda, op))
    return info, registered, None


_BUILD_INFO, _AVAILABLE_OPS, _LOAD_ERROR = _load()


def build_info() -> dict:
    """What setup.py recorded (an empty dict when nothing was recorded)."""
    return dict(_BUILD_INFO)


def cuda_ext_error() -> Optional[str]:
    """Why `hypenet._C` is not loaded, or None when it is."""
    return _LOAD_ERROR


def cuda_op_available(name: str) -> bool:
    """Whether `torch.ops.hypenet_cuda.<name>` was built and registered."""
    return name in _AVAILABLE_OPS


# Ops whose kernels use instructions of one GPU generation only: (compute capability, what they issue).
_HOPPER = ((9, 0), "Hopper warpgroup MMAs (sm_90a)")
_REQUIRED_CAPABILITY = {"lightning_chunk_scan": _HOPPER, "lightning_chunk_scan_packed": _HOPPER}


@functools.lru_cache(maxsize=None)
def _device_arch_reason(name: str, index: int) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(index)
    return _arch_reason(name, index, (major, minor), [arch.rstrip("a") for arch in _BUILD_INFO.get("archs", [])])


def _arch_reason(name: str, index: int, capability: tuple[int, int], built: list[str]) -> Optional[str]:
    major, minor = capability
    if f"{major}{minor}" not in built:
        return (f"hypenet._C holds machine code for {', '.join('sm_' + arch for arch in built)} only, but "
                f"cuda:{index} is sm_{major}{minor} (rebuild with HYPENET_CUDA_ARCHS)")
    required = _REQUIRED_CAPABILITY.get(name)
    if required is not None and capability != required[0]:
        return f"the {name} kernel issues {required[1]}, but cuda:{index} is sm_{major}{minor}"
    return None


def _lightning_attn_step_reason(q: Tensor, k: Tensor, v: Tensor, state: Tensor) -> Optional[str]:
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"the CUDA step kernel takes q, k, v in bfloat16, float16 or float32, got {q.dtype}"
    K, V = q.shape[-1], v.shape[-1]
    if K != V or K not in (64, 128):
        return f"the CUDA step kernel is built for K == V in (64, 128), got K={K}, V={V}"
    if state.data_ptr() % 16 != 0:
        return "the CUDA step kernel moves the state in 16-byte vectors; state's data pointer is not 16-byte aligned"
    return None


def _lightning_chunk_scan_reason(q: Tensor, k: Tensor, v: Tensor, initial_state: Optional[Tensor]) -> Optional[str]:
    if q.dtype != torch.bfloat16:
        return f"the CUDA chunked scan takes q, k, v in bfloat16 (other dtypes run on Triton), got {q.dtype}"
    K, V = q.shape[-1], v.shape[-1]
    if K != V or K not in (64, 128):
        return f"the CUDA chunked scan is built for K == V in (64, 128), got K={K}, V={V}"
    if initial_state is not None and initial_state.dtype != torch.float32:
        return f"the CUDA chunked scan reads a float32 initial_state, got {initial_state.dtype}"
    return None


_INPUT_REASONS = {
    "lightning_attn_step": _lightning_attn_step_reason,
    "lightning_chunk_scan": _lightning_chunk_scan_reason,
    "lightning_chunk_scan_packed": _lightning_chunk_scan_reason,
}


def cuda_unsupported_reason(name: str, *args: Tensor) -> Optional[str]:
    """Why `torch.ops.hypenet_cuda.<name>` cannot run these (already validated) CUDA inputs, or None when it can.

    Covers what validation of the public op does not: the extension and op being built, the GPU architecture it
    was built for, and the dtypes / head dims it was instantiated for. `args` are the op's tensors as its
    `_INPUT_REASONS` entry takes them (lightning_attn_step: q, k, v, state; lightning_chunk_scan and
    lightning_chunk_scan_packed: q, k, v, initial_state).
    """
    if not cuda_op_available(name):
        return f"hypenet._C has no {name} kernel ({_LOAD_ERROR or 'not built with it'})"
    reason = _device_arch_reason(name, args[0].device.index if args[0].device.index is not None
                                 else torch.cuda.current_device())
    if reason is None and name in _INPUT_REASONS:
        reason = _INPUT_REASONS[name](*args)
    return reason
