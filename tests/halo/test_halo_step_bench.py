"""benches.halo_step: the model FLOP count against a hand count, and a CPU smoke run of the benchmark."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benches import halo_step
from benches.model import qwen3_config
from hypenet.convert import convert_qwen3


def test_step_flops_match_a_hand_count():
    from transformers import Qwen3ForCausalLM

    d, inter, heads, kv_heads, head_dim, vocab, ctx, batch = 32, 64, 2, 1, 16, 100, 8, 3
    teacher = Qwen3ForCausalLM(qwen3_config(2, vocab_size=vocab, hidden_size=d, intermediate_size=inter,
                                            num_attention_heads=heads, num_key_value_heads=kv_heads,
                                            head_dim=head_dim))
    student = convert_qwen3(teacher, ["lightning-attn", "attn"])

    mlp = 3 * d * inter  # gate, up, down
    lm_head = vocab * d  # tied to the embedding, still a matmul of every token
    causal_attention = 2 * 2 * (ctx // 2) * heads * head_dim  # QK^T and PV over ctx/2 keys on average
    lightning_layer = 5 * d * heads * head_dim  # q, k, v, z (d -> H*D, K/V expanded to every head) and o
    attention_layer = d * heads * head_dim * 3 + 2 * d * kv_heads * head_dim  # q, o, o_gate; k, v (GQA)
    lightning_state = 4 * heads * head_dim * head_dim  # k^T v into the state, q times the state
    student_forward = 2 * (lightning_layer + attention_layer + 2 * mlp + lm_head) + causal_attention + lightning_state
    teacher_layer = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim  # q, o; k, v
    teacher_forward = 2 * (2 * teacher_layer + 2 * mlp + lm_head) + 2 * causal_attention

    assert halo_step.matmul_parameters(student) == lightning_layer + attention_layer + 2 * mlp + lm_head
    assert halo_step.forward_flops_per_token(student, ctx) == student_forward == 51968
    assert halo_step.forward_flops_per_token(teacher, ctx) == teacher_forward == 44288
    assert halo_step.step_flops(student, teacher, batch, ctx) == batch * ctx * (3 * student_forward + teacher_forward)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", None)])
def test_datasheet_peak_by_device_name(name, peak):
    assert halo_step.datasheet_peak_tflops(name) == peak


def test_bad_batches_are_refused_naming_the_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        halo_step.main(["--device", "cpu", "--batches", "4,x"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--batches" in error and "'4,x'" in error


def test_cpu_smoke_run_writes_finite_rows(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    ctx, accumulation = 16, 2
    code = halo_step.main(["--device", "cpu", "--layers", "2", "--ctx", str(ctx), "--batches", "2,1", "--steps", "1",
                           "--warmup", "1", "--accumulation", str(accumulation), "--breakdown", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "halo_step.json").read_text())
    assert [row["batch"] for row in result["rows"]] == [1, 2]
    per_token = 3 * result["student_forward_flops_per_token"] + result["teacher_forward_flops_per_token"]
    for row in result["rows"]:
        assert row["status"] == "ok"
        assert row["ctx"] == ctx and row["mfu"] is None and row["accumulation"] == accumulation
        tokens_per_step = row["batch"] * accumulation * ctx
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(tokens_per_step / (row["ms_per_step"] * 1e-3))
        assert row["model_tflops_per_step"] * 1e12 == pytest.approx(tokens_per_step * per_token)
        for key in ("teacher_fwd_ms", "student_fwd_bwd_ms", "kl_fwd_bwd_ms", "optimizer_ms"):
            assert math.isfinite(row[key]) and row[key] > 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a POSIX process model")
def test_two_ranks_under_torchrun_report_both_ranks_tokens(tmp_path):
    ctx, batch = 16, 2
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "benches.halo_step", "--device", "cpu", "--layers", "2", "--ctx", str(ctx), "--batches",
                    str(batch), "--steps", "1", "--warmup", "1", "--out", str(tmp_path)],
                   check=True, env=env, cwd=os.getcwd(), timeout=300)
    result = json.loads((tmp_path / "halo_step_2gpu.json").read_text())
    assert result["gpus"] == 2 and not (tmp_path / "halo_step.json").exists()
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["gpus"] == 2
    assert row["tokens_per_s"] == pytest.approx(2 * batch * ctx / (row["ms_per_step"] * 1e-3))
