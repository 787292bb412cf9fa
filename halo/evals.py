"""Built-in evaluations: held-out LM loss / next-token accuracy, and passkey retrieval accuracy.

They work on any HF-style causal LM whose ``.model`` returns ``last_hidden_state`` and whose
``get_output_embeddings()`` is the lm_head (transformers' Qwen3 and hypenet's HypeNet), and they
only compute logits for the tokens they score. lm-eval-harness is used only when importable
(``harness_tasks``); nothing here requires it.
"""

from __future__ import annotations

import math

import torch

from .data import PasskeyBuilder
from .losses import IGNORE_INDEX, chunked_token_stats

DEFAULT_MAX_TOKENS_PER_FORWARD = 16384


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[b, T, d] hidden states after the final norm (before lm_head)."""
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state


def output_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _rows_per_forward(seq_len: int, max_tokens: int) -> int:
    return max(1, max_tokens // seq_len)


@torch.no_grad()
def lm_loss(model, rows: torch.Tensor, *, batch_size: int | None = None,
            max_tokens_per_forward: int = DEFAULT_MAX_TOKENS_PER_FORWARD) -> dict:
    """Mean next-token NLL (nats) and argmax accuracy over rows [n, T] (every position but the first).

    Returns {"loss", "accuracy", "tokens"}.
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    batch_size = batch_size or _rows_per_forward(rows.shape[1], max_tokens_per_forward)
    nll_sum, correct_sum, count = 0.0, 0, 0
    for batch in rows.split(batch_size):
        batch = batch.to(device)
        hidden = final_hidden(model, batch)[:, :-1]
        nll, correct, valid = chunked_token_stats(hidden.reshape(-1, hidden.shape[-1]), output_weight(model),
                                                  batch[:, 1:].reshape(-1))
        nll_sum += float(nll.sum())
        correct_sum += int(correct.sum())
        count += int(valid.sum())
    model.train(was_training)
    return {"loss": nll_sum / max(count, 1), "accuracy": correct_sum / max(count, 1), "tokens": count}


@torch.no_grad()
def passkey_accuracy(model, tokenizer, filler: torch.Tensor, lengths: list[int], *, num_samples: int,
                     seed: int = 0, max_tokens_per_forward: int = DEFAULT_MAX_TOKENS_PER_FORWARD) -> dict:
    """Teacher-forced passkey retrieval at each length.

    A sample counts as retrieved when every answer digit is the argmax prediction given the
    prompt and the digits before it. The same seeded samples are drawn for every model.

    Args:
        filler: [num_tokens] held-out token stream the filler text is cut from.
        lengths: sequence lengths in tokens.
    Returns:
        {length: {"accuracy": fraction of samples retrieved, "digit_accuracy": fraction of digits}}
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    builder = PasskeyBuilder(tokenizer)
    weight = output_weight(model)
    results = {}
    for length in lengths:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(length))
        examples = [builder.build(int(length), filler, generator) for _ in range(num_samples)]
        exact, digits_right, digits_total = 0, 0, 0
        step = _rows_per_forward(int(length), max_tokens_per_forward)
        for start in range(0, num_samples, step):
            group = examples[start : start + step]
            input_ids = torch.stack([e.input_ids for e in group]).to(device)
            hidden = final_hidden(model, input_ids)  # (b, T, d)
            for row, example in enumerate(group):
                positions = example.answer_positions.to(device)
                labels = input_ids[row, positions]
                _, correct, _ = chunked_token_stats(hidden[row, positions - 1], weight, labels)
                exact += int(bool(correct.all()))
                digits_right += int(correct.sum())
                digits_total += correct.numel()
        results[int(length)] = {"accuracy": exact / num_samples, "digit_accuracy": digits_right / digits_total}
    model.train(was_training)
    return results


def heldout_rows(heldout_stream: torch.Tensor, seq_len: int, num_rows: int) -> torch.Tensor:
    """Up to ``num_rows`` consecutive rows [n, seq_len] of the held-out stream (a stream shorter than one
    row is repeated to fill it)."""
    needed = seq_len * num_rows
    if heldout_stream.numel() < seq_len:
        repeats = math.ceil(seq_len / heldout_stream.numel())
        heldout_stream = heldout_stream.repeat(repeats)
    usable = min(needed, (heldout_stream.numel() // seq_len) * seq_len)
    return heldout_stream[:usable].view(-1, seq_len)


def harness_tasks(model, tokenizer, tasks: list[str], *, batch_size: int = 8, limit: int | None = None) -> dict | None:
    """Run lm-eval-harness tasks when the package is importable; returns None when it is not."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, limit=limit)
    return output["results"]


__all__ = ["IGNORE_INDEX", "final_hidden", "harness_tasks", "heldout_rows", "lm_loss", "output_weight",
           "passkey_accuracy"]
