"""Row-wise softmax losses of the chunked distillation losses (Triton kernels + launchers).

- kl_rows: per-row KL(softmax(T) || softmax(S)) of student logits S and teacher logits T [n, V], and its gradient
  with respect to S, softmax(S) - softmax(T), zero on rows that the row mask leaves out.
- ce_rows: per-row cross entropy logsumexp(L) - L[target] of logits L [n, V], and its gradient
  softmax(L) - onehot(target), zero (loss and gradient) on rows whose target is IGNORE_INDEX.

Why: halo/losses.py computes these with torch ops on each chunk of float32 logits. With a vocabulary of ~152k
every op is a full pass over an [n, V] float32 buffer, and the ops add up to about twenty such passes. Here one
program owns one row and reads it twice:
    pass 1: the row's max and sum of exponentials, online (the running sum is rescaled whenever the max grows),
            for both distributions from the same loads;
    pass 2: the gradient, written directly in the dtype the gradient matmuls take, and the loss terms summed from
            the same loads.
The KL is summed in pass 2 as sum p_t (log p_t - log p_s), the form halo/losses.py uses, rather than from pass-1
sums: the pass-1 identity sum p_t (t - s) - (lse_t - lse_s) subtracts two log-normalisers of the size of the
logits to get a KL that is often near zero, and pass 2 loads the same data anyway.

All arithmetic is float32; teacher logits may be bf16 or fp16 and are upcast as they are loaded. -inf logits are
allowed (a padded vocabulary, a truncated teacher): they get probability 0, and a teacher entry of probability 0
adds 0 to the KL. A row whose logits are all -inf has no softmax and gives NaN, as torch does.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100
TEACHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tile width along the vocabulary: with 8 warps a 4096-wide tile is 16 values per thread per distribution, few
# enough registers for pass 2's four live tiles, wide enough that the per-tile reductions are a small cost.
MAX_BLOCK_V = 4096


@triton.jit
def _online_logsumexp_update(running_max, running_sum, x):
    """Fold the tile x into (max so far, sum so far of exp(logit - max so far))."""
    new_max = tl.maximum(running_max, tl.max(x, 0))
    # While every logit seen is -inf, new_max is -inf and x - new_max would be -inf - (-inf) = NaN; a shift of 0
    # turns those lanes (and the masked tail of the last tile) into exp(-inf) = 0 instead.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
    return new_max, running_sum


@triton.jit
def kl_rows_kernel(student, teacher, row_mask, row_kl, grad, V, BLOCK_V: tl.constexpr):
    """One program: one row of the contiguous [n, V] logits."""
    row = tl.program_id(0).to(tl.int64)
    student_row = student + row * V
    teacher_row = teacher + row * V
    grad_row = grad + row * V
    cols = tl.arange(0, BLOCK_V)

    student_max = tl.full([], float("-inf"), tl.float32)
    student_sum = tl.zeros([], tl.float32)
    teacher_max = tl.full([], float("-inf"), tl.float32)
    teacher_sum = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        s = tl.load(student_row + start + cols, mask=in_row, other=float("-inf"))
        t = tl.load(teacher_row + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        student_max, student_sum = _online_logsumexp_update(student_max, student_sum, s)
        teacher_max, teacher_sum = _online_logsumexp_update(teacher_max, teacher_sum, t)
    student_log_sum = tl.log(student_sum)
    teacher_log_sum = tl.log(teacher_sum)

    keep = tl.load(row_mask + row)
    # Per-lane partial sums, reduced once after the loop instead of once per tile.
    kl_terms = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        s = tl.load(student_row + start + cols, mask=in_row, other=float("-inf"))
        t = tl.load(teacher_row + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        # (x - max) - log(sum) rather than x - logsumexp: exact near the max, where the probability mass is.
        student_log_probs = (s - student_max) - student_log_sum
        teacher_log_probs = (t - teacher_max) - teacher_log_sum
        teacher_probs = tl.exp(teacher_log_probs)
        # 0 * log(0 / q) = 0; the product itself would be 0 * (-inf - ...) = NaN.
        kl_terms += tl.where(teacher_probs > 0.0, teacher_probs * (teacher_log_probs - student_log_probs), 0.0)
        row_grad = tl.where(keep, tl.exp(student_log_probs) - teacher_probs, 0.0)
        tl.store(grad_row + start + cols, row_grad.to(grad.dtype.element_ty), mask=in_row)
    tl.store(row_kl + row, tl.sum(kl_terms, 0))


@triton.jit
def ce_rows_kernel(logits, targets, row_loss, grad, V, ignore_index, BLOCK_V: tl.constexpr):
    """One program: one row of the contiguous [n, V] logits."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits + row * V
    grad_row = grad + row * V
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets + row)
    valid = target != ignore_index
    # An ignored row reads no logits: pass 1 has nothing to do and pass 2 only writes zeros. Its statistics come
    # out NaN and are discarded by the tl.where on valid before anything is stored.
    read_end = tl.where(valid, V, 0)

    row_max = tl.full([], float("-inf"), tl.float32)
    row_sum = tl.zeros([], tl.float32)
    for start in range(0, read_end, BLOCK_V):
        x = tl.load(logits_row + start + cols, mask=start + cols < V, other=float("-inf"))
        row_max, row_sum = _online_logsumexp_update(row_max, row_sum, x)
    log_sum = tl.log(row_sum)
    target_logit = tl.load(logits_row + tl.where(valid, target, 0), mask=valid, other=0.0)
    tl.store(row_loss + row, tl.where(valid, (row_max - target_logit) + log_sum, 0.0))

    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        x = tl.load(logits_row + start + cols, mask=start + cols < read_end, other=float("-inf"))
        probs = tl.exp((x - row_max) - log_sum)
        row_grad = tl.where(start + cols == target, probs - 1.0, probs)
        tl.store(grad_row + start + cols, tl.where(valid, row_grad, 0.0).to(grad.dtype.element_ty), mask=in_row)


def _check_device(tensor: torch.Tensor, name: str) -> None:
    if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return
    raise ValueError(f"{name} must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), "
                     f"got device {tensor.device}")


def _check_logits(logits: torch.Tensor, name: str, dtypes: tuple) -> None:
    """A contiguous [n, V] tensor, V >= 1: copying a non-contiguous one would cost more than the kernel saves."""
    _check_device(logits, name)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{name} must be [n, V] with V >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in dtypes:
        raise ValueError(f"{name} must have a dtype of {dtypes}, got {logits.dtype}")
    if not logits.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {tuple(logits.shape)} with strides {logits.stride()}")


def _check_rows(vector: torch.Tensor, name: str, dtype: torch.dtype, logits: torch.Tensor, logits_name: str) -> None:
    """A [n] vector of dtype on the device of the [n, V] logits."""
    if vector.shape != logits.shape[:1] or vector.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} [n] = [{logits.shape[0]}], got {vector.dtype} {tuple(vector.shape)}")
    if vector.device != logits.device:
        raise ValueError(f"{name} must be on the device of {logits_name} ({logits.device}), got {vector.device}")


def _check_grad_dtype(grad_dtype: torch.dtype) -> None:
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype must be one of {GRAD_DTYPES}, got {grad_dtype}")


def _block_v(V: int, block_v: Optional[int]) -> int:
    if block_v is None:
        return min(triton.next_power_of_2(V), MAX_BLOCK_V)
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    return block_v


def _num_warps(BLOCK_V: int) -> int:
    # 8 warps hold a MAX_BLOCK_V tile at 16 values per thread; a narrow tile (small vocabulary) needs fewer threads.
    return 8 if BLOCK_V >= 2048 else 4


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, row_mask: torch.Tensor,
            grad_dtype: torch.dtype, *, block_v: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(softmax(teacher) || softmax(student)) of each row, and its gradient in the student logits.

    Args:
        student_logits (Tensor): [n, V] float32, contiguous.
        teacher_logits (Tensor): [n, V] float32, bfloat16 or float16, contiguous, on the same device.
        row_mask (Tensor): [n] bool; rows where it is False get a zero gradient.
        grad_dtype (torch.dtype): float32, bfloat16 or float16.
        block_v (int, optional): tile width along V, a power of two; by default V rounded up to a power of two,
            at most MAX_BLOCK_V. Tests pass small tiles to cover many tiles per row cheaply.
    Returns:
        row_kl [n] float32, not multiplied by row_mask;
        grad [n, V] in grad_dtype: (softmax(student) - softmax(teacher)) * row_mask[:, None].
    """
    _check_logits(student_logits, "student_logits", (torch.float32,))
    _check_logits(teacher_logits, "teacher_logits", TEACHER_DTYPES)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must be on the device of student_logits ({student_logits.device}), "
                         f"got {teacher_logits.device}")
    _check_rows(row_mask, "row_mask", torch.bool, student_logits, "student_logits")
    _check_grad_dtype(grad_dtype)
    n, V = student_logits.shape
    BLOCK_V = _block_v(V, block_v)
    row_kl = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    grad = torch.empty((n, V), dtype=grad_dtype, device=student_logits.device)
    if n == 0:
        return row_kl, grad
    kl_rows_kernel[(n,)](student_logits, teacher_logits, row_mask.contiguous(), row_kl, grad, V,
                         BLOCK_V=BLOCK_V, num_warps=_num_warps(BLOCK_V))
    return row_kl, grad


def ce_rows(logits: torch.Tensor, targets: torch.Tensor, grad_dtype: torch.dtype, *,
            block_v: Optional[int] = None, targets_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of each row against its target, and its gradient in the logits.

    The targets are range-checked on the host (one reduction and one device-to-host copy), since an
    out-of-range target would make the kernel read outside its row.

    Args:
        logits (Tensor): [n, V] float32, contiguous.
        targets (Tensor): [n] int64 in [0, V), or IGNORE_INDEX (-100) for rows without a loss.
        grad_dtype (torch.dtype): float32, bfloat16 or float16.
        block_v (int, optional): tile width along V, as in `kl_rows`.
        targets_checked (bool): the caller has range-checked these targets already (a chunked loss checks all
            of its labels once instead of paying one host sync per chunk); skips the check here.
    Returns:
        row_loss [n] float32: logsumexp(logits) - logits[target], 0 on ignored rows;
        grad [n, V] in grad_dtype: softmax(logits) - onehot(target), 0 on ignored rows.
    """
    _check_logits(logits, "logits", (torch.float32,))
    _check_rows(targets, "targets", torch.int64, logits, "logits")
    _check_grad_dtype(grad_dtype)
    n, V = logits.shape
    out_of_range = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= V))
    if not targets_checked and bool(out_of_range.any()):
        raise ValueError(f"targets must be in [0, V = {V}) or {IGNORE_INDEX}, got {int(out_of_range.sum())} out of "
                         f"range, the first: {targets[out_of_range][:8].tolist()}")
    BLOCK_V = _block_v(V, block_v)
    row_loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    grad = torch.empty((n, V), dtype=grad_dtype, device=logits.device)
    if n == 0:
        return row_loss, grad
    ce_rows_kernel[(n,)](logits, targets.contiguous(), row_loss, grad, V, IGNORE_INDEX,
                         BLOCK_V=BLOCK_V, num_warps=_num_warps(BLOCK_V))
    return row_loss, grad
