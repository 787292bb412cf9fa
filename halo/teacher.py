"""Build the shipped demo assets: the corpus, a BPE tokenizer and a tiny Qwen3 teacher.

    python -m halo.teacher corpus          # halo/assets/corpus/python_docs.jsonl.gz
    python -m halo.teacher train           # halo/assets/tiny-qwen3/ (tokenizer + model)

The corpus is the Python documentation that every CPython ships (PSF license): the language
reference topics of ``pydoc_data.topics`` plus the docstrings of pure-Python standard-library
modules, one document per topic or module. It is written once and shipped, so the teacher and the
demo do not depend on the local Python version.

The teacher is a transformers ``Qwen3ForCausalLM`` (8 layers, hidden 128, 4 query / 2 KV heads of
32, vocab 4096, tied embeddings, ~2.1M parameters) trained with next-token cross entropy on the
training split, 30% of rows replaced by passkey sequences, with the same loop as HALO
(halo.train). Deterministic for a given torch build and thread count; about 15-20 minutes on one
CPU core (520 steps of 16 x 256 tokens).

It models language but does not retrieve: passkey exact match is 0 at every length. Induction
heads (copying from context), which retrieval needs, did not form at this budget: not with 30%
passkey rows, not with 15-50% rows of repeated random segments mixed in from the start, and not in
700 further steps of such rows alone (the loss on the repeats fell from 6.9 to only 6.4 nats).
A wider attention logit range is not the missing piece: probes of 150-1,200 steps with head_dim 64,
QK-norm gains initialised at 1, 2 or 3 (logits up to ~72 instead of ~5.7), 2-8 layers, 50-100%
passkey rows (also four 64-token passkeys per row), lr 1e-3 to 1e-2 and batch 4 or 16 all stayed at
0% exact match and chance digit accuracy at 256 tokens (2026-11-28); the trained models emit a digit
after the prompt but always the same one, copying nothing, and the gains barely moved. An extra loss on
the answer digits (5x their cross entropy added to the LM loss, half of every batch passkey rows, 1,000
steps of 16 x 256 tokens, 2026-11-28) left the answer loss at chance (2.28-2.40 nats against ln 10 = 2.30)
while the LM loss fell from 6.6 to 4.0: still 0% exact match at 256 and 1,024 tokens. Untried: a warm-up on
pure copy rows over a small vocabulary, or simply many more steps (a GPU budget).
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import inspect
import json
import pkgutil
import sys
import sysconfig
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from .config import BUILTIN_TEACHER_DIR, StageConfig
from .data import (BUILTIN_CORPUS, BUILTIN_CORPUS_NAME, PackedBatches, PasskeyBuilder, load_corpus_splits,
                   pack_rows)
from .losses import fused_linear_cross_entropy
from .train import DistInfo, Trainer

# Modules whose import has side effects (opening windows, printing, starting servers) or that
# are test suites / tools rather than library documentation.
_SKIPPED_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
                    "ensurepip", "venv", "pydoc_data", "__main__", "__phello__", "__hello__"}

TEACHER_SEQ_LEN = 256


TEACHER_TRAIN = StageConfig(steps=520, lr=3e-3, min_lr=1e-4, warmup_steps=30, schedule="cosine",
                            seq_len=TEACHER_SEQ_LEN, global_batch=16, micro_batch=16, checkpoint_every=50,
                            log_every=25)
TEACHER_PASSKEY_FRACTION = 0.3
TEACHER_HELDOUT_FRACTION = 0.1
TEACHER_VOCAB_SIZE = 4096


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------
def _module_document(name: str) -> str | None:
    """Docstrings of a module and of its public classes/functions, as one plain-text document."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules fail to import; skip them
            return None
    parts = []
    module_doc = inspect.getdoc(module)
    if module_doc:
        parts.append(f"Module {name}\n\n{module_doc}")
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = inspect.getdoc(obj)
        if doc:
            parts.append(f"{name}.{attr}\n\n{doc}")
    return "\n\n".join(parts) if parts else None


def build_corpus(out_path: Path = BUILTIN_CORPUS) -> dict:
    """Write the corpus as gzipped JSON lines {"source", "text"}; returns counts."""
    import pydoc_data.topics

    documents = [{"source": f"pydoc_data.topics:{key}", "text": text}
                 for key, text in sorted(pydoc_data.topics.topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    names = sorted(info.name for info in pkgutil.iter_modules([str(stdlib)]))
    for name in names:
        if name.startswith("_") or name in _SKIPPED_MODULES:
            continue
        text = _module_document(name)
        if text:
            documents.append({"source": f"docstrings:{name}", "text": text})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(out_path, "wb", mtime=0) as raw:
        for doc in documents:
            raw.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    chars = sum(len(d["text"]) for d in documents)
    return {"documents": len(documents), "characters": chars, "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def train_tokenizer(documents: list[str], vocab_size: int):
    """Byte-level BPE, digits split one per token (numbers copy digit by digit), EOS '<|endoftext|>'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=eos, bos_token=None,
                                   model_max_length=1_000_000)


# ----------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------
def teacher_model_config(vocab_size: int, eos_token_id: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                       max_position_embeddings=TEACHER_SEQ_LEN * 16, tie_word_embeddings=True,
                       rms_norm_eps=1e-6, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                       pad_token_id=eos_token_id)


def causal_lm_loss(model, input_ids: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Next-token CE of a HF causal LM on packed rows [b, T], via the fused chunked loss."""
    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]  # (b, T-1, d)
    labels = input_ids[:, 1:]
    return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                      labels.reshape(-1), chunk_size=chunk_size)


def train_teacher(out_dir: Path, work_dir: Path, seed: int = 0) -> dict:
    """Train tokenizer and teacher (resumable from ``work_dir``), save them to ``out_dir``; returns the summary."""
    from transformers import Qwen3ForCausalLM

    from . import evals
    from .data import load_documents, split_documents

    torch.manual_seed(seed)
    train_docs, _ = split_documents(load_documents(BUILTIN_CORPUS_NAME), TEACHER_HELDOUT_FRACTION)
    tokenizer = train_tokenizer(train_docs, TEACHER_VOCAB_SIZE)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    splits = load_corpus_splits(BUILTIN_CORPUS_NAME, tokenizer, TEACHER_HELDOUT_FRACTION, cache_dir=work_dir)
    cfg = TEACHER_TRAIN
    model = Qwen3ForCausalLM(teacher_model_config(len(tokenizer), tokenizer.eos_token_id))
    batches = PackedBatches(pack_rows(splits.train_stream, cfg.seq_len), cfg.global_batch, seed,
                            TEACHER_PASSKEY_FRACTION, PasskeyBuilder(tokenizer), splits.train_stream)
    trainer = Trainer(name="teacher", module=model, loss_fn=lambda ids: (causal_lm_loss(model, ids), {}),
                      batches=batches, cfg=cfg, out_dir=work_dir, dist=DistInfo(), device=torch.device("cpu"),
                      amp_dtype=None)
    result = trainer.fit()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    lm = evals.lm_loss(model, pack_rows(splits.heldout_stream, cfg.seq_len), batch_size=8)
    passkey = evals.passkey_accuracy(model, tokenizer, splits.heldout_stream,
                                     [cfg.seq_len * m for m in (1, 2, 4, 8, 16)], num_samples=20, seed=1234)
    summary = {
        "params": sum(p.numel() for p in model.parameters()),
        "train_tokens_in_corpus": int(splits.train_stream.numel()),
        "heldout_tokens_in_corpus": int(splits.heldout_stream.numel()),
        "tokens_seen": result.step * cfg.global_batch * cfg.seq_len, "steps": result.step,
        "final_train_loss_mean_last_20": sum(r["loss"] for r in result.records[-20:]) / min(20, len(result.records)),
        "heldout_lm_loss": lm["loss"], "heldout_next_token_accuracy": lm["accuracy"],
        "heldout_tokens_scored": lm["tokens"], "passkey": {str(k): v for k, v in passkey.items()},
        "passkey_fraction": TEACHER_PASSKEY_FRACTION, "train_config": asdict(cfg), "seed": seed,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m halo.teacher", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="extract the Python-docs corpus")
    corpus.add_argument("--out", type=Path, default=BUILTIN_CORPUS)
    train = sub.add_parser("train", help="train the tokenizer and the tiny Qwen3 teacher")
    train.add_argument("--out", type=Path, default=BUILTIN_TEACHER_DIR)
    train.add_argument("--work-dir", type=Path, default=Path("teacher-work"),
                       help="checkpoints and logs (resumable)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "corpus":
        print(json.dumps(build_corpus(args.out), indent=2))
    else:
        torch.set_num_threads(args.threads)
        print(json.dumps(train_teacher(args.out, args.work_dir, args.seed), indent=2))


if __name__ == "__main__":
    main()
