"""Argument validation shared by the public ops: every failure names the argument and the values.

Checks of tensor *values* (decays, offsets, indices) need one read of the device; they run once per tensor
version (a cache keyed by the tensor object) and are skipped under torch.compile and CUDA graph capture, where a
host read is impossible.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

# id(tensor) -> (weak reference, passed checks); tensors compare elementwise, so they cannot key a WeakKeyDictionary.
_validated: dict[int, tuple[weakref.ref, set]] = {}


def check_tensor(name: str, t: object, *, ndim: Optional[int] = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                 device: Optional[torch.device] = None, contiguous: bool = False) -> Tensor:
    """A tensor of the given rank, dtype family and device (TypeError for the wrong kind, ValueError otherwise)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    return t


def check_shape(name: str, t: Tensor, expected: Sequence[Optional[int]], meaning: str) -> None:
    """Shape equality where `expected` holds None for free dims; `meaning` spells the expected layout."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {meaning} = {shown}, got {tuple(t.shape)}")


def check_same_dtype(names: Iterable[str], tensors: Iterable[Tensor]) -> None:
    names, tensors = list(names), list(tensors)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError("the inputs " + ", ".join(names) + " must share one dtype, got "
                        + ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors)))


def check_rank4_group(names: Sequence[str], tensors: Sequence[object]) -> torch.device:
    """Rank-4 float tensors on one device with one dtype (q, k, v or q and the caches). Returns the device."""
    check_tensor(names[0], tensors[0], ndim=4)
    device = tensors[0].device
    for name, t in zip(names[1:], tensors[1:]):
        check_tensor(name, t, ndim=4, device=device)
    check_same_dtype(names, tensors)
    return device


def check_scale(scale: Optional[float]) -> None:
    if scale is not None and (not isinstance(scale, (int, float)) or not (scale > 0) or scale == float("inf")):
        raise ValueError(f"scale must be a finite float > 0 or None, got {scale!r}")


def values_checkable(t: Tensor) -> bool:
    """Whether a host read of `t` is allowed now (not tracing, not capturing a CUDA graph)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_values_once(t: Tensor, key: str, check: Callable[[Tensor], None]) -> None:
    """Run `check(t)` unless it already passed for this very tensor at its current version."""
    if not values_checkable(t):
        return
    tag = (key, t._version)
    entry = _validated.get(id(t))
    if entry is not None and entry[0]() is t and tag in entry[1]:
        return
    check(t)
    if entry is None or entry[0]() is not t:
        key_id = id(t)
        entry = (weakref.ref(t, lambda _: _validated.pop(key_id, None)), set())
        _validated[key_id] = entry
    entry[1].add(tag)


def check_cu_seqlens(name: str, cu_seqlens: Tensor, total: int, device: torch.device) -> int:
    """Offsets [N + 1], 0 first, strictly increasing, ending at `total`. Returns N."""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 offsets [0, ..., T], got shape {tuple(cu_seqlens.shape)}")

    def check(t: Tensor) -> None:
        values = t.tolist()
        if values[0] != 0 or values[-1] != total or any(b <= a for a, b in zip(values, values[1:])):
            shown = values if len(values) <= 12 else values[:6] + ["..."] + values[-6:]
            raise ValueError(f"{name} must start at 0, increase strictly and end at {total} (the packed length), "
                             f"got {shown}")

    check_values_once(cu_seqlens, f"cu_seqlens:{total}", check)
    return cu_seqlens.numel() - 1


def check_index_range(name: str, index: Tensor, upper: int, what: str) -> None:
    """Integer entries in [0, upper)."""

    def check(t: Tensor) -> None:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= upper):
            raise ValueError(f"{name} entries must lie in [0, {upper}) ({what}), got min {int(t.min())}, "
                             f"max {int(t.max())}")

    check_values_once(index, f"range:{upper}", check)
