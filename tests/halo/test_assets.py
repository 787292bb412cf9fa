"""The shipped demo assets: corpus, tokenizer and tiny Qwen3 teacher, and a demo config that validates."""

from __future__ import annotations

from halo.config import BUILTIN_TEACHER_DIR, load_config
from halo.data import load_documents, split_documents
from halo.demo import DEMO_SETTINGS
from halo.teacher import TEACHER_HELDOUT_FRACTION


def test_teacher_is_a_small_qwen3_with_its_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = [p for p in BUILTIN_TEACHER_DIR.iterdir() if p.suffix in (".safetensors", ".json")]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    model = AutoModelForCausalLM.from_pretrained(BUILTIN_TEACHER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_TEACHER_DIR)
    assert model.config.model_type == "qwen3"
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert model.config.vocab_size == len(tokenizer) and tokenizer.eos_token_id is not None
    # Digits are single tokens, so a passkey is copied digit by digit.
    assert tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]


def test_corpus_has_a_heldout_split():
    train, heldout = split_documents(load_documents("builtin"), TEACHER_HELDOUT_FRACTION)
    assert len(train) > 150 and 10 < len(heldout) < 60
    assert not set(train) & set(heldout)


def test_demo_settings_validate(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}"], base=DEMO_SETTINGS)
    assert config.teacher_dir == BUILTIN_TEACHER_DIR
    assert config.eval.multipliers[-1] == 16.0
