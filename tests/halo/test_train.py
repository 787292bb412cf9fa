"""The shared training loop: exact resume, NaN stop, schedule, deterministic sharded batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from halo.config import BUILTIN_TEACHER_DIR, StageConfig
from halo.data import PackedBatches, PasskeyBuilder, pack_rows
from halo.finetune import NextTokenLoss
from halo.train import DistInfo, NonFiniteLossError, Trainer, lr_factor


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BUILTIN_TEACHER_DIR)


def _model(seed: int, vocab: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       tie_word_embeddings=True))


def _batches(tokenizer, seq_len=64, global_batch=4, passkey_fraction=0.5) -> PackedBatches:
    stream = torch.randint(0, len(tokenizer), (5000,), generator=torch.Generator().manual_seed(3))
    return PackedBatches(pack_rows(stream, seq_len), global_batch, seed=11, passkey_fraction=passkey_fraction,
                         passkey=PasskeyBuilder(tokenizer), filler=stream)


def _trainer(model, loss_fn, batches, out_dir, **cfg_changes) -> Trainer:
    cfg = StageConfig(**{"steps": 6, "lr": 3e-3, "min_lr": 1e-4, "warmup_steps": 2, "seq_len": 64,
                         "global_batch": 4, "micro_batch": 2, "checkpoint_every": 2, **cfg_changes})
    return Trainer(name="test", module=model, loss_fn=loss_fn, batches=batches, cfg=cfg, out_dir=out_dir,
                   dist=DistInfo(), device=torch.device("cpu"), amp_dtype=None, progress=False)


def _losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "log.jsonl").read_text().splitlines()]


class _CrashAt:
    """Wraps a loss function and raises on its n-th call (a killed job)."""

    def __init__(self, loss_fn, call: int):
        self.loss_fn, self.call, self.calls = loss_fn, call, 0

    def __call__(self, input_ids):
        self.calls += 1
        if self.calls == self.call:
            raise KeyboardInterrupt("simulated kill")
        return self.loss_fn(input_ids)


def test_resume_after_a_kill_reproduces_the_loss_sequence_exactly(tmp_path, tokenizer):
    vocab = len(tokenizer)
    straight = _model(0, vocab)
    _trainer(straight, NextTokenLoss(straight, 50), _batches(tokenizer), tmp_path / "straight").fit()
    expected = _losses(tmp_path / "straight")
    assert len(expected) == 6

    # Killed in the 2nd micro batch of step 4: steps 1-3 are logged, the last checkpoint is step 2.
    first = _model(0, vocab)
    with pytest.raises(KeyboardInterrupt):
        _trainer(first, _CrashAt(NextTokenLoss(first, 50), call=8), _batches(tokenizer), tmp_path / "resumed").fit()
    assert len(_losses(tmp_path / "resumed")) == 3

    # A fresh process: different initial weights, which the checkpoint must overwrite.
    second = _model(123, vocab)
    result = _trainer(second, NextTokenLoss(second, 50), _batches(tokenizer), tmp_path / "resumed").fit()
    assert result.finished and result.step == 6
    assert _losses(tmp_path / "resumed") == expected
    for (name, a), b in zip(straight.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_stop_after_then_resume_matches_one_run(tmp_path, tokenizer):
    vocab = len(tokenizer)
    straight = _model(1, vocab)
    _trainer(straight, NextTokenLoss(straight, 64), _batches(tokenizer), tmp_path / "a", checkpoint_every=5).fit()
    partial = _model(1, vocab)
    result = _trainer(partial, NextTokenLoss(partial, 64), _batches(tokenizer), tmp_path / "b", checkpoint_every=5,
                      stop_after=3).fit()
    assert not result.finished and result.step == 3
    rest = _model(2, vocab)
    _trainer(rest, NextTokenLoss(rest, 64), _batches(tokenizer), tmp_path / "b", checkpoint_every=5).fit()
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")


def test_resume_refuses_a_changed_config(tmp_path, tokenizer):
    model = _model(0, len(tokenizer))
    _trainer(model, NextTokenLoss(model, 64), _batches(tokenizer), tmp_path, stop_after=2).fit()
    with pytest.raises(ValueError, match="lr"):
        _trainer(model, NextTokenLoss(model, 64), _batches(tokenizer), tmp_path, lr=1e-2).fit()


def test_nan_loss_stops_with_a_clear_message(tmp_path, tokenizer):
    model = _model(0, len(tokenizer))
    loss_fn = NextTokenLoss(model, 64)

    def poisoned(input_ids):
        loss, metrics = loss_fn(input_ids)
        return loss * float("nan"), metrics

    with pytest.raises(NonFiniteLossError, match=r"test: the loss is nan at step 1; stopping.*test.lr"):
        _trainer(model, poisoned, _batches(tokenizer), tmp_path).fit()


def test_lr_schedule_warms_up_then_decays_to_min():
    factors = [lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1, schedule="cosine") for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert math.isclose(lr_factor(20, warmup_steps=4, total_steps=20, min_ratio=0.1, schedule="cosine"), 0.1)
    assert lr_factor(15, warmup_steps=4, total_steps=20, min_ratio=0.1, schedule="constant") == 1.0


def test_batches_are_a_function_of_the_step_and_shard_by_rank(tokenizer):
    batches = _batches(tokenizer, global_batch=6, passkey_fraction=0.5)
    again = _batches(tokenizer, global_batch=6, passkey_fraction=0.5)
    for step in (0, 1, 7, 300):  # 300 wraps past the first epoch
        rows = batches.global_rows(step)
        assert rows.shape == (6, 64)
        assert torch.equal(rows, again.global_rows(step))
        shards = [batches.local_rows(step, rank, 3) for rank in range(3)]
        assert torch.equal(torch.cat(shards), rows)
    assert not torch.equal(batches.global_rows(0), batches.global_rows(1))
    template = PasskeyBuilder(tokenizer).intro
    passkey_rows = sum(int(row[: len(template)].tolist() == template) for s in range(20) for row in batches.global_rows(s))
    assert 30 <= passkey_rows <= 90  # about half of 120 rows


def test_passkey_answer_tokens_are_the_needle_number(tokenizer):
    builder = PasskeyBuilder(tokenizer)
    filler = torch.randint(5, len(tokenizer), (2000,), generator=torch.Generator().manual_seed(0))
    example = builder.build(300, filler, torch.Generator().manual_seed(5))
    assert example.input_ids.shape == (300,)
    answer = tokenizer.decode(example.input_ids[example.answer_positions]).strip()
    assert len(answer) == 5 and answer.isdigit()
    assert f"The pass key is {answer}. Remember it." in tokenizer.decode(example.input_ids)
    with pytest.raises(ValueError, match="too short"):
        builder.build(10, filler, torch.Generator())


@pytest.mark.parametrize("checkpointing", [False, True])  # distill compiles without it, finetune with it
def test_compiled_decoder_layers_give_the_eager_outputs_and_gradients(checkpointing):
    from hypenet.convert import convert_qwen3

    from halo.evals import final_hidden
    from halo.train import compile_decoder_layers, enable_activation_checkpointing

    teacher = _model(seed=5, vocab=64).eval()
    eager = convert_qwen3(teacher, ["lightning-attn", "attn"], dtype=torch.float32).train()
    compiled = convert_qwen3(teacher, ["lightning-attn", "attn"], dtype=torch.float32).train()
    compiled.load_state_dict(eager.state_dict())
    if checkpointing:
        enable_activation_checkpointing(eager)
        enable_activation_checkpointing(compiled)
    compiled_teacher = _model(seed=5, vocab=64).eval()
    compile_decoder_layers(compiled)
    compile_decoder_layers(compiled_teacher)
    input_ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(final_hidden(compiled_teacher, input_ids), final_hidden(teacher, input_ids))
    for model in (eager, compiled):
        final_hidden(model, input_ids).square().mean().backward()
    torch.testing.assert_close(final_hidden(compiled, input_ids), final_hidden(eager, input_ids))
    for (name, param), compiled_param in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(compiled_param.grad, param.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_training_forwards_build_no_cache(monkeypatch):
    """final_hidden (every stage's forward) must not fill a KV cache: the teacher is in eval mode, where
    transformers would otherwise build a DynamicCache on every training step."""
    import hypenet.modeling
    import transformers.models.qwen3.modeling_qwen3 as qwen3_modeling
    from hypenet.convert import convert_qwen3

    from halo.evals import final_hidden

    def no_cache(*args, **kwargs):
        raise AssertionError("a training forward built a cache")

    teacher = _model(seed=5, vocab=64).eval()
    student = convert_qwen3(teacher, ["lightning-attn", "attn"], dtype=torch.float32).eval()
    monkeypatch.setattr(qwen3_modeling, "DynamicCache", no_cache)
    monkeypatch.setattr(hypenet.modeling, "HypeNetCache", no_cache)
    input_ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for model in (teacher, student):
        assert final_hidden(model, input_ids).shape == (2, 16, 32)
