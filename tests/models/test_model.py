"""HypeNetForCausalLM: teacher reproduction, checkpoints, caching, padding, generate(), compile, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache

from hypenet.cache import HypeNetCache
from hypenet.convert import convert_qwen3
from hypenet.modeling import CACHE_FIELD, HypeNetForCausalLM
from tests.models.tiny import left_padded, random_prompts, tiny_config, tiny_model, tiny_qwen3

F64 = torch.float64
# Lightning states are float32 in every dtype (the op contract), so cached fp64 runs agree to ~1e-6 only.
CACHED = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", [False, True])
def test_all_attention_student_with_rope_reproduces_the_qwen3_teacher(gate):
    teacher = tiny_qwen3()
    student = convert_qwen3(teacher, ["attn"] * 3, attn_use_rope=True, attn_use_output_gate=gate,
                            attn_logits_scaling=None)
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher(ids).logits
        got = student(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_gives_identical_logits_and_tensors(tmp_path, tied):
    model = tiny_model(dtype=torch.float32, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert type(loaded) is HypeNetForCausalLM
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    loaded.save_pretrained(tmp_path / "b")
    first = safe_open(str(tmp_path / "a" / "model.safetensors"), "pt")
    second = safe_open(str(tmp_path / "b" / "model.safetensors"), "pt")
    assert sorted(first.keys()) == sorted(second.keys())
    assert ("lm_head.weight" in first.keys()) is not tied
    assert {"model.layers.0.self_attn.z_proj.weight", "model.layers.0.self_attn.o_norm.weight",
            "model.layers.1.self_attn.o_gate.weight", "model.layers.1.self_attn.q_norm.weight"} <= set(first.keys())
    for key in first.keys():
        assert torch.equal(first.get_tensor(key), second.get_tensor(key)), key
    ids = torch.randint(1, 61, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_step_by_step_decoding_equals_the_full_forward():
    model = tiny_model()
    ids = torch.randint(1, 61, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = HypeNetCache(model.config)
        logits = [model(ids[:, :4], past_key_values=cache).logits]
        for t in range(4, 10):
            logits.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, **CACHED)
    assert cache.get_seq_length() == 10 and cache.lengths.tolist() == [10, 10]


def test_chunked_prefill_equals_the_full_forward():
    model = tiny_model(seed=1)
    ids = torch.randint(1, 61, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        cache = HypeNetCache(model.config, batch_size=2, max_length=8, dtype=F64, device="cpu")  # must grow
        chunks = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 3), (3, 8), (8, 9), (9, 13))]
    torch.testing.assert_close(torch.cat(chunks, 1), full, **CACHED)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_never_changes_the_real_tokens(padding_side):
    model = tiny_model(seed=2)
    prompts = random_prompts([6, 2, 4], seed=1)
    ids, mask = left_padded(prompts)
    if padding_side == "right":
        ids, mask = ids.flip(1), mask.flip(1)
        prompts = [p.flip(0) for p in prompts]
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None]).logits[0]
            torch.testing.assert_close(batched.logits[row][mask[row].bool()], alone)
    assert torch.all(batched.logits[mask == 0] == 0)


def test_left_padded_prefill_then_decode_equals_each_prompt_alone():
    model = tiny_model(seed=3)
    prompts = random_prompts([5, 1, 3], seed=2)
    ids, mask = left_padded(prompts)
    extra = torch.randint(1, 61, (3, 3))
    with torch.no_grad():
        cache = HypeNetCache(model.config)
        model(ids[:, :2], attention_mask=mask[:, :2], past_key_values=cache)  # a chunk that is all padding for some
        model(ids[:, 2:], attention_mask=mask, past_key_values=cache)
        steps = []
        for t in range(3):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            steps.append(model(extra[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits)
        steps = torch.cat(steps, 1)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, extra[row]])[None]).logits[0, -3:]
            torch.testing.assert_close(steps[row], alone, **CACHED)
    assert cache.lengths.tolist() == [8, 4, 6]


@pytest.mark.parametrize("chunk", [None, 2])
def test_batched_left_padded_generate_equals_per_prompt_generate(chunk):
    model = tiny_model(seed=4)
    prompts = random_prompts([7, 3, 5], seed=3)
    ids, mask = left_padded(prompts)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, prefill_chunk_size=chunk, **settings)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   **settings)
            assert batched[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist()


def test_sampling_and_beam_search_generate_run():
    model = tiny_model(seed=5)
    ids, mask = left_padded(random_prompts([4, 2], seed=4))
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = model.generate(ids, attention_mask=mask, do_sample=True, top_k=10, temperature=0.8,
                                 max_new_tokens=5, num_return_sequences=2, pad_token_id=0, eos_token_id=None)
        beams = model.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=4, pad_token_id=0,
                               eos_token_id=None)
    assert sampled.shape == (4, ids.shape[1] + 5) and beams.shape == (2, ids.shape[1] + 4)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < 61


def test_compiled_decode_step_matches_eager():
    model = tiny_model(seed=6, dtype=torch.float32)
    ids = torch.randint(1, 61, (2, 8))
    with torch.no_grad():
        expected = model(ids).logits[:, -2:]
        cache = HypeNetCache(model.config, batch_size=2, max_length=16, dtype=torch.float32, device="cpu")
        model(ids[:, :6], past_key_values=cache)
        # aot_eager traces the step (functionalised cache writes included) without paying for code generation.
        step = torch.compile(model, backend="aot_eager")
        got = torch.cat([step(ids[:, t:t + 1], past_key_values=cache).logits for t in (6, 7)], 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(1, 61, (2, 7))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=7).train()
        if checkpointing:  # transformers > 5.17 renamed the method
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, msg=name)


def test_loss_logits_to_keep_and_hidden_states():
    model = tiny_model(seed=8)
    ids = torch.randint(1, 61, (2, 6))
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1).logits
    expected_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 61).float(), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss.double(), expected_loss.double())
    torch.testing.assert_close(last, out.logits[:, -1:])
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    with torch.no_grad():
        assert getattr(model(ids, use_cache=False), CACHE_FIELD) is None
        assert isinstance(getattr(model(ids, use_cache=True), CACHE_FIELD), HypeNetCache)


def test_bad_calls_raise_clear_errors():
    model = tiny_model()
    ids = torch.randint(1, 61, (2, 4))
    with pytest.raises(TypeError, match="HypeNetCache"):
        model(ids, past_key_values=DynamicCache())
    cache = HypeNetCache(model.config)
    model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="batch size 3"):
        model(torch.randint(1, 61, (3, 1)), past_key_values=cache)
    with pytest.raises(ValueError, match="padding while decoding"):
        model(ids[:, :1], attention_mask=torch.tensor([[1] * 4 + [0], [1] * 5]), past_key_values=cache)
    with pytest.raises(ValueError, match="attention_mask must be a 2D"):
        model(ids, attention_mask=torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match="every row as padding"):
        model(ids, attention_mask=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()


def test_generate_refuses_a_cache_implementation():
    model = tiny_model()
    with pytest.raises(ValueError, match="HypeNetCache"):
        model.generate(torch.randint(1, 61, (1, 3)), max_new_tokens=2, cache_implementation="static",
                       pad_token_id=0)


def test_bf16_model_runs_and_matches_fp32_roughly():
    model32 = tiny_model(seed=9, dtype=torch.float32)
    model16 = tiny_model(seed=9, dtype=torch.bfloat16)
    ids = torch.randint(1, 61, (1, 8))
    with torch.no_grad():
        ref = model32(ids).logits
        got = model16(ids).logits.float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - ref).norm() / ref.norm() < 0.05


def test_hybrid_config_default_layout_model_builds():
    config = tiny_config(num_hidden_layers=2, mixer_types=["attn", "lightning-attn"])
    model = HypeNetForCausalLM(config)
    assert [layer.mixer_type for layer in model.model.layers] == ["attn", "lightning-attn"]
