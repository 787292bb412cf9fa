"""Layer selection picks the layer whose replacement hurts recall most per unit of quality."""

from __future__ import annotations

import pytest
import torch

from halo import select
from halo.config import load_config
from halo.runtime import Runtime


def test_planted_recall_layer_is_kept():
    # Replacing layer 5 destroys retrieval but barely moves quality; layer 2 hurts quality a lot.
    recall = [0.9, 0.88, 0.5, 0.9, 0.91, 0.1, 0.9, 0.89]
    quality = [-2.00, -2.01, -2.60, -2.02, -2.00, -2.03, -2.01, -2.00]
    importance = select.halo_importance(recall, quality, eps=1e-3, clip=50.0)
    assert 5 in select.choose_attention_layers(importance, 2)
    assert max(range(8), key=importance.__getitem__) == 5
    # Layer 2 loses recall too, but it costs so much quality that its ratio is small.
    assert importance[2] < importance[5] / 10


def test_importance_formula_and_clip():
    recall = [1.0, 0.5, 0.0]
    quality = [-1.0, -1.5, -1.0]  # layers 0 and 2 share the best quality
    importance = select.halo_importance(recall, quality, eps=0.01, clip=50.0)
    assert importance[0] == 0.0  # best recall: nothing to lose
    assert importance[1] == pytest.approx(0.5 / 0.51)
    assert importance[2] == 50.0  # 1.0 / 0.01 = 100, clipped


def test_baseline_ranks_by_recall_lost():
    assert select.baseline_importance([0.7, 0.2, 0.9], teacher_recall=1.0) == pytest.approx([0.3, 0.8, 0.1])
    assert select.choose_attention_layers([0.3, 0.8, 0.1, 0.8], 2) == [1, 3]
    assert select.default_num_attention(28) == 7 and select.default_num_attention(3) == 0
    with pytest.raises(ValueError, match="num_attention"):
        select.choose_attention_layers([0.1, 0.2], 3)


def test_run_select_swaps_each_layer_and_keeps_the_planted_one(monkeypatch, tiny_settings):
    """The wiring: M(i) really has layer i (and only it) replaced, and the layout follows the scores."""
    planted = 2
    runtime = Runtime.create(load_config(base=tiny_settings), progress=False)
    teacher = runtime.teacher()
    seen = []

    def fake_score(rt, model):
        swapped = [i for i, layer in enumerate(model.model.layers)
                   if isinstance(layer.self_attn, select.CandidateAsAttention)]
        assert len(swapped) <= 1
        seen.append(swapped)
        if not swapped:
            return 1.0, -2.0
        return (0.1, -2.01) if swapped[0] == planted else (0.95, -2.0 - 0.05 * swapped[0])

    monkeypatch.setattr(select, "score_model", fake_score)
    from halo.align import build_candidates

    summary = select.run_select(runtime, build_candidates(teacher))
    assert seen == [[], [0], [1], [2], [3]]
    assert summary["attention_layers"] == [planted]
    assert summary["mixer_types"] == ["lightning-attn", "lightning-attn", "attn", "lightning-attn"]
    assert all(not isinstance(layer.self_attn, select.CandidateAsAttention) for layer in teacher.model.layers)


def test_candidate_stands_in_for_the_teacher_attention(tiny_settings):
    """A swapped-in candidate runs inside the teacher's decoder layer and changes its output."""
    runtime = Runtime.create(load_config(base=tiny_settings), progress=False)
    teacher = runtime.teacher()
    from halo.align import build_candidates

    candidates = build_candidates(teacher)
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        reference = teacher(input_ids=ids).logits
        with select.swapped_attention(teacher, 1, select.CandidateAsAttention(candidates[1])):
            swapped = teacher(input_ids=ids).logits
        restored = teacher(input_ids=ids).logits
    assert torch.isfinite(swapped).all() and not torch.allclose(swapped, reference)
    assert torch.equal(restored, reference)
