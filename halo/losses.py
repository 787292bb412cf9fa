"""Token-chunked losses fused with the output projection (lm_head).

With a large vocabulary the [N, vocab] logits are the biggest tensors of a training step, and
distillation needs them for two models. These losses take hidden states and the lm_head weight
instead, and walk over the N tokens in chunks: each chunk's logits are computed in float32, used
for the loss and for the exact gradient, and dropped before the next chunk. Peak extra memory is
O(chunk_size * vocab) instead of O(N * vocab) per model.

The gradient is computed inside the forward chunk loop (one pass over the logits) and stored;
backward only scales it by the incoming gradient. On CUDA the row-wise part of each chunk (softmaxes, the
loss of each token, the gradient of the logits) is one Triton kernel (triton_ops.softmax_losses) that reads
the logits twice and writes the gradient in the matmuls' dtype; the torch ops that compute the same rows
elsewhere make many more passes over them.

Precision: softmax, log-softmax, the loss and every reduction are float32. The chunk matmuls (logits,
and the two gradient products grad_logits @ weight and grad_logits.T @ hidden) follow the caller's
autocast: inside a bfloat16 or float16 autocast region their operands (weights cast once per call,
hidden chunks, the float32 gradient of the logits) are rounded to that dtype and multiplied with
float32 accumulation into a float32 result. That is what the model's own lm_head does under
autocast, it takes half the tensor-core time of TF32, and a low-precision teacher weight is used
as it is instead of being copied to float32. Outside autocast (or under float32 autocast) the
matmuls are float32.
"""

from __future__ import annotations

import torch

from hypenet.ops.dispatch import load_kernel_module

IGNORE_INDEX = -100
ROW_KERNELS_MODULE = "triton_ops.softmax_losses"
DEFAULT_CHUNK_SIZE = 1024


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_hidden_and_weight(hidden: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"{name}_hidden must be [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{name}_weight must be [vocab, d] with d = {hidden.shape[1]}, got shape {tuple(weight.shape)}"
        )


class _ChunkMatmul:
    """The chunk matmuls of one call, in the precision the caller's autocast asks for.

    Construct it while the caller's autocast state is in effect, before the loss disables autocast for its
    own float32 work. ``operand`` casts a tensor for use as a matmul operand and calling the object
    multiplies two operands into a float32 result. With a bfloat16/float16 autocast dtype the operands are
    rounded to it and their products summed in float32: on CUDA by the ``out_dtype`` matmul overloads
    (low-precision tensor-core inputs, float32 output), elsewhere, where those overloads have no kernel,
    by float32 matmuls of the rounded values, which are the same products. Without one, operands and
    matmuls are float32.
    """

    def __init__(self, device: torch.device):
        device_type = device.type
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        self.rounding = autocast_dtype if autocast_dtype in (torch.bfloat16, torch.float16) else None
        self.dtype = self.rounding if self.rounding is not None and device_type == "cuda" else torch.float32

    def operand(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.rounding is not None:
            tensor = tensor.to(self.rounding)
        return tensor.to(self.dtype)

    def __call__(self, a: torch.Tensor, b: torch.Tensor, accumulate: torch.Tensor | None = None) -> torch.Tensor:
        """``a @ b`` as float32, or, given the float32 ``accumulate``, that tensor with ``a @ b`` added in place."""
        if self.dtype == torch.float32:
            return a @ b if accumulate is None else accumulate.addmm_(a, b)
        if accumulate is None:
            return torch.ops.aten.mm.dtype(a, b, torch.float32)
        # self and out are the accumulator: cuBLAS adds the product into it (beta=1), no [vocab, d] temporary.
        return torch.ops.aten.addmm.dtype_out(accumulate, a, b, torch.float32, out=accumulate)


def _row_kernels(device: torch.device):
    """triton_ops.softmax_losses on CUDA when Triton imports, else None (the torch ops compute the same rows)."""
    if device.type != "cuda":
        return None
    module = load_kernel_module(ROW_KERNELS_MODULE)
    return None if isinstance(module, Exception) else module


def _scaled_saved_grads(ctx, grad_loss):
    """The gradients computed in the forward chunk loop, scaled by the incoming gradient over the token count."""
    grad_hidden, grad_weight, count = ctx.saved_tensors
    scale = grad_loss / count
    hidden_dtype, weight_dtype = ctx.dtypes
    return ((grad_hidden * scale).to(hidden_dtype) if grad_hidden is not None else None,
            (grad_weight * scale).to(weight_dtype) if grad_weight is not None else None)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean next-token cross entropy of softmax(hidden @ weight.T) over tokens whose label is not ignored."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        want_grad_hidden, want_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(torch.float32)
        matmul = _ChunkMatmul(hidden.device)
        row_kernels = _row_kernels(hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            weight_operand = matmul.operand(weight)
            grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if want_grad_hidden else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad_weight else None
            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, num_tokens, chunk_size):
                end = min(start + chunk_size, num_tokens)
                hidden_chunk = matmul.operand(hidden[start:end])  # (n, d)
                logits = matmul(hidden_chunk, weight_operand.T)  # (n, vocab) fp32
                if row_kernels is not None:
                    token_losses, grad_logits = row_kernels.ce_rows(logits, labels[start:end], matmul.dtype,
                                                                    targets_checked=True)
                    loss_sum += token_losses.sum()
                else:
                    chunk_valid = valid[start:end]
                    targets = labels[start:end].clamp(min=0)
                    log_normalizer = torch.logsumexp(logits, dim=-1)
                    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
                    loss_sum += ((log_normalizer - target_logit) * chunk_valid).sum()
                    # d(sum of token losses)/d(logits) = softmax - onehot(target), zero on ignored rows.
                    grad_logits = logits.sub_(log_normalizer[:, None]).exp_()  # in place: logits are done
                    grad_logits[torch.arange(end - start, device=logits.device), targets] -= 1.0
                    grad_logits *= chunk_valid[:, None]
                if want_grad_hidden or want_grad_weight:
                    grad_logits = matmul.operand(grad_logits)
                    if want_grad_hidden:
                        grad_hidden[start:end] = matmul(grad_logits, weight_operand)
                    if want_grad_weight:
                        matmul(grad_logits.T, hidden_chunk, accumulate=grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_scaled_saved_grads(ctx, grad_loss), None, None)


class _FusedLinearKL(torch.autograd.Function):
    """Mean over selected tokens of KL(softmax(teacher logits) || softmax(student hidden @ weight.T))."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, mask, chunk_size):
        want_grad_hidden, want_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens = student_hidden.shape[0]
        if mask is None:
            mask = torch.ones(num_tokens, dtype=torch.bool, device=student_hidden.device)
        count = mask.sum().clamp(min=1).to(torch.float32)
        matmul = _ChunkMatmul(student_hidden.device)
        row_kernels = _row_kernels(student_hidden.device)
        with torch.autocast(device_type=student_hidden.device.type, enabled=False):
            student_weight_operand = matmul.operand(student_weight)
            teacher_weight_operand = matmul.operand(teacher_weight) if teacher_weight is not None else None
            grad_hidden = torch.empty_like(student_hidden, dtype=torch.float32) if want_grad_hidden else None
            grad_weight = torch.zeros_like(student_weight, dtype=torch.float32) if want_grad_weight else None
            kl_sum = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
            for start in range(0, num_tokens, chunk_size):
                end = min(start + chunk_size, num_tokens)
                student_chunk = matmul.operand(student_hidden[start:end])  # (n, d)
                student_logits = matmul(student_chunk, student_weight_operand.T)
                if teacher_logits is not None:
                    teacher_chunk_logits = teacher_logits[start:end]
                else:
                    teacher_chunk_logits = matmul(matmul.operand(teacher_hidden[start:end]), teacher_weight_operand.T)
                chunk_mask = mask[start:end]
                if row_kernels is not None:
                    if teacher_chunk_logits.dtype not in row_kernels.TEACHER_DTYPES:
                        teacher_chunk_logits = teacher_chunk_logits.float()
                    token_kl, grad_logits = row_kernels.kl_rows(student_logits, teacher_chunk_logits.contiguous(),
                                                                chunk_mask, matmul.dtype)
                else:
                    # In place where a [n, vocab] buffer is dead after the step: every pass over one of them is as
                    # long as the chunk matmuls' output, so fewer passes and buffers is what makes this loss fast.
                    student_log_probs = torch.log_softmax(student_logits, dim=-1)
                    teacher_log_probs = torch.log_softmax(teacher_chunk_logits.float(), dim=-1)
                    teacher_probs = teacher_log_probs.exp()
                    log_ratio = teacher_log_probs.sub_(student_log_probs)
                    token_kl = torch.linalg.vecdot(teacher_probs, log_ratio)
                    # d KL / d student logits = softmax(student) - p_teacher (rows sum to one).
                    grad_logits = student_log_probs.exp_().sub_(teacher_probs).mul_(chunk_mask[:, None])
                kl_sum += torch.where(chunk_mask, token_kl, 0.0).sum()
                if want_grad_hidden or want_grad_weight:
                    grad_logits = matmul.operand(grad_logits)
                    if want_grad_hidden:
                        grad_hidden[start:end] = matmul(grad_logits, student_weight_operand)
                    if want_grad_weight:
                        matmul(grad_logits.T, student_chunk, accumulate=grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype)
        return kl_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_scaled_saved_grads(ctx, grad_loss), None, None, None, None, None)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mean cross entropy of ``hidden @ weight.T`` against ``labels``, never holding all logits.

    Under a bfloat16/float16 autocast the logits and gradient matmuls take operands rounded to that dtype
    and produce float32 (as the lm_head itself would under autocast, at half the tensor-core time of
    TF32); otherwise they are float32. The softmax, the loss and the gradient of the logits are float32.

    Args:
        hidden: [N, d] final hidden states (any float dtype).
        weight: [vocab, d] lm_head weight.
        labels: [N] int64 target ids; ``IGNORE_INDEX`` (-100) rows are skipped.
        chunk_size: tokens per chunk.
    Returns:
        scalar float32 loss; differentiable in ``hidden`` and ``weight``.
    """
    _check_chunk_size(chunk_size)
    _check_hidden_and_weight(hidden, weight, "")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got shape {tuple(labels.shape)}")
    # Checked once per call (one host sync), not per chunk: an out-of-range label would make the chunk loop's
    # gather fail with an index error, or the row kernel read outside its row.
    vocab = weight.shape[0]
    out_of_range = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bool(out_of_range.any()):
        raise ValueError(f"labels must be in [0, vocab = {vocab}) or {IGNORE_INDEX}, got "
                         f"{labels[out_of_range][:8].tolist()} among others")
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size)


def fused_linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Forward KL(p_teacher || p_student) at temperature 1, mean over tokens, computed chunk by chunk.

    Give the teacher either as ``teacher_hidden`` [N, d_t] with ``teacher_weight`` [vocab, d_t]
    (its logits are then computed per chunk too) or as ``teacher_logits`` [N, vocab].

    Under a bfloat16/float16 autocast the student and teacher logits matmuls and the two gradient
    matmuls take operands rounded to that dtype and produce float32: what both lm_heads do under
    autocast, at half the tensor-core time of TF32, and a bfloat16 teacher weight is used without a
    float32 copy. Otherwise they are float32. ``teacher_logits`` are used in float32, and the
    softmaxes, the KL and the gradient of the student logits are float32 in every case.

    Args:
        student_hidden: [N, d] student final hidden states.
        student_weight: [vocab, d] student lm_head weight.
        mask: optional [N] bool; only True tokens count.
        chunk_size: tokens per chunk.
    Returns:
        scalar float32 loss; differentiable in ``student_hidden`` and ``student_weight`` only.
    """
    _check_chunk_size(chunk_size)
    _check_hidden_and_weight(student_hidden, student_weight, "student")
    num_tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give teacher_logits or (teacher_hidden, teacher_weight), not both")
        if teacher_logits.shape != (num_tokens, vocab):
            raise ValueError(
                f"teacher_logits must be [N, vocab] = [{num_tokens}, {vocab}], got {tuple(teacher_logits.shape)}"
            )
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("give teacher_logits or both teacher_hidden and teacher_weight")
        _check_hidden_and_weight(teacher_hidden, teacher_weight, "teacher")
        if teacher_hidden.shape[0] != num_tokens or teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"teacher_hidden/teacher_weight shapes {tuple(teacher_hidden.shape)}/{tuple(teacher_weight.shape)} "
                f"do not match student N = {num_tokens}, vocab = {vocab}"
            )
    if mask is not None and (mask.shape != (num_tokens,) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool [N] = [{num_tokens}], got {mask.dtype} {tuple(mask.shape)}")
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.detach()
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach()
    return _FusedLinearKL.apply(
        student_hidden, student_weight, teacher_hidden,
        teacher_weight.detach() if teacher_weight is not None else None,
        teacher_logits, mask, chunk_size,
    )


@torch.no_grad()
def chunked_token_stats(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood and argmax correctness, for evaluation.

    Args:
        hidden: [N, d]; weight: [vocab, d]; labels: [N] (``IGNORE_INDEX`` rows give nll 0, correct False).
    Returns:
        (nll [N] float32, correct [N] bool, valid [N] bool)
    """
    _check_chunk_size(chunk_size)
    _check_hidden_and_weight(hidden, weight, "")
    valid = labels != IGNORE_INDEX
    nll = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    correct = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    weight32 = weight.float()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            logits = hidden[start:end].float() @ weight32.T
            targets = labels[start:end].clamp(min=0)
            nll[start:end] = torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None]).squeeze(1)
            correct[start:end] = logits.argmax(-1) == targets
    return nll * valid, correct & valid, valid
