"""The model on a GPU, through the fast backends (auto dispatch): caching, padding, CUDA graphs, compile.

Kernels round differently from one path to another (chunked vs step, packed vs dense), so outputs are compared
by relative error against the fp32 reference-backend forward of the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from hypenet.cache import HypeNetCache
from tests.models.tiny import left_padded, random_prompts, tiny_model

pytestmark = pytest.mark.cuda

GPU_SHAPES = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  lightning_nh=4, lightning_nkv=4, lightning_head_dim=64, initializer_range=0.05)
BF16_TOLERANCE = 3e-2


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def gpu_model(seed=0):
    return tiny_model(seed=seed, dtype=torch.bfloat16, **GPU_SHAPES).cuda()


def reference_logits(model, ids, monkeypatch) -> torch.Tensor:
    """The same weights in fp32 on the reference backend (the oracle)."""
    reference = copy.deepcopy(model).float()
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setenv("HYPENET_BACKEND", "reference")
        return reference(ids).logits


def test_gpu_forward_prefill_chunks_and_decode_match_the_reference(monkeypatch):
    model = gpu_model()
    ids = torch.randint(1, 61, (2, 300), device="cuda")
    expected = reference_logits(model, ids, monkeypatch)
    with torch.no_grad():
        assert relative_error(model(ids).logits, expected) < BF16_TOLERANCE
        cache = HypeNetCache(model.config)
        logits = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 128), (128, 290))]
        logits += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(290, 300)]
    assert relative_error(torch.cat(logits, 1), expected) < BF16_TOLERANCE


def test_gpu_left_padded_batch_matches_each_prompt(monkeypatch):
    model = gpu_model(seed=1)
    prompts = [p.cuda() for p in random_prompts([70, 9, 33], seed=1)]
    ids, mask = left_padded(prompts)
    ids, mask = ids.cuda(), mask.cuda()
    extra = torch.randint(1, 61, (3, 4), device="cuda")
    with torch.no_grad():
        cache = HypeNetCache(model.config)
        model(ids, attention_mask=mask, past_key_values=cache)
        steps = []
        for t in range(4):
            mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
            steps.append(model(extra[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits)
        steps = torch.cat(steps, 1)
    for row, prompt in enumerate(prompts):
        alone = reference_logits(model, torch.cat([prompt, extra[row]])[None], monkeypatch)[0, -4:]
        assert relative_error(steps[row], alone) < BF16_TOLERANCE, row


def test_gpu_cuda_graph_decode_step_equals_eager():
    model = gpu_model(seed=2)
    ids = torch.randint(1, 61, (2, 200), device="cuda")
    caches = [HypeNetCache(model.config, 2, 256, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :190], past_key_values=cache)
        eager = [model(ids[:, t:t + 1], past_key_values=caches[0]).logits for t in range(190, 200)]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: real decode steps of tokens 190 and 191
            graphed = [model(ids[:, t:t + 1], past_key_values=caches[1]).logits for t in (190, 191)]
        torch.cuda.current_stream().wait_stream(side)
        static_ids = ids[:, 192:193].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: every replay below is one real step
            static_logits = model(static_ids, past_key_values=caches[1]).logits
        for t in range(192, 200):
            static_ids.copy_(ids[:, t:t + 1])
            graph.replay()
            graphed.append(static_logits.clone())
    torch.testing.assert_close(torch.cat(graphed, 1), torch.cat(eager, 1), rtol=2e-2, atol=2e-2)
    assert caches[1].lengths.tolist() == [200, 200]


def test_gpu_compiled_decode_step_matches_the_reference(monkeypatch):
    # Inductor fuses the bf16 glue around the kernels and so rounds differently from eager: both are held to the
    # fp32 reference rather than to each other.
    model = gpu_model(seed=3)
    ids = torch.randint(1, 61, (1, 64), device="cuda")
    expected = reference_logits(model, ids, monkeypatch)[:, 60:]
    caches = [HypeNetCache(model.config, 1, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    step = torch.compile(model)
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :60], past_key_values=cache)
        eager = torch.cat([model(ids[:, t:t + 1], past_key_values=caches[0]).logits for t in range(60, 64)], 1)
        compiled = torch.cat([step(ids[:, t:t + 1], past_key_values=caches[1]).logits for t in range(60, 64)], 1)
    assert relative_error(eager, expected) < BF16_TOLERANCE
    assert relative_error(compiled, expected) < BF16_TOLERANCE
