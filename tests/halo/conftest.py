"""Tiny, fast HALO fixtures: a random 4-layer Qwen3 teacher with the shipped tokenizer, a small corpus,
and a config whose stages take a few optimizer steps."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from halo.config import BUILTIN_TEACHER_DIR
from halo.data import BUILTIN_CORPUS

TINY_SEQ_LEN = 64


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """30 documents of the shipped corpus, cut to 3,000 characters each."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with gzip.open(BUILTIN_CORPUS, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for _, line in zip(range(30), handle)]
    path.write_text("".join(json.dumps({"text": r["text"][:3000]}) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A random Qwen3ForCausalLM (4 layers, hidden 32, 2 query / 1 KV heads of 16) and the shipped tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("teacher")
    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_TEACHER_DIR)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=10000.0,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    Qwen3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_stage(steps: int = 3, seq_len: int = TINY_SEQ_LEN, **extra) -> dict:
    return {"steps": steps, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "seq_len": seq_len, "global_batch": 2,
            "micro_batch": 1, "checkpoint_every": 2, "log_every": 1, **extra}


@pytest.fixture
def tiny_settings(tmp_path, tiny_teacher_dir, tiny_corpus) -> dict:
    """Settings for load_config(base=...): every stage a few steps on CPU."""
    return {
        "teacher": str(tiny_teacher_dir), "output_dir": str(tmp_path / "run"), "device": "cpu",
        "loss_chunk_size": 37,
        "data": {"corpus": str(tiny_corpus), "heldout_fraction": 0.2, "passkey_fraction": 0.5},
        "align": tiny_stage(), "distill": tiny_stage(),
        "finetune": tiny_stage(steps=2, seq_len=2 * TINY_SEQ_LEN, schedule="constant", min_lr=1e-3),
        "select": {"recall_samples": 2, "quality_rows": 2},
        "alpha": {"grid": [10.0, 100.0], "seq_len": 4 * TINY_SEQ_LEN, "num_rows": 1},
        "eval": {"base_length": TINY_SEQ_LEN, "multipliers": [1.0, 2.0], "passkey_samples": 2, "lm_rows": 2},
    }
