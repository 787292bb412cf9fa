"""Stage 1 feeds each candidate exactly the teacher attention's input and targets its output."""

from __future__ import annotations

import torch

from halo.align import AlignmentLoss, build_candidates, capture_attention_io
from halo.config import load_config
from halo.runtime import Runtime


class _TeacherAttentionCopy(torch.nn.Module):
    """A 'candidate' that is the teacher's own attention: its alignment loss must be zero."""

    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states, position_embeddings=None):
        return self.attention(hidden_states=hidden_states, position_embeddings=position_embeddings,
                              attention_mask=None)[0]


def test_hooks_capture_the_attention_input_and_output(tiny_settings):
    runtime = Runtime.create(load_config(base=tiny_settings), progress=False)
    teacher = runtime.teacher()
    copies = torch.nn.ModuleList(_TeacherAttentionCopy(layer.self_attn) for layer in teacher.model.layers)
    ids = torch.randint(0, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    with capture_attention_io(teacher) as captured:
        loss, per_layer = AlignmentLoss(teacher, copies, captured)(ids)
    assert len(per_layer) == len(teacher.model.layers)
    assert float(loss) < 1e-10
    assert all(not layer.self_attn._forward_hooks for layer in teacher.model.layers)  # hooks removed


def test_alignment_trains_only_the_candidates_and_lowers_the_loss(tiny_settings):
    runtime = Runtime.create(load_config(base=tiny_settings), progress=False)
    teacher = runtime.teacher()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    candidates = build_candidates(teacher)
    optimizer = torch.optim.AdamW(candidates.parameters(), lr=3e-3)
    ids = runtime.train_batches(runtime.config.align).global_rows(0)
    with capture_attention_io(teacher) as captured:
        objective = AlignmentLoss(teacher, candidates, captured)
        losses = []
        for _ in range(15):
            loss, _ = objective(ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
