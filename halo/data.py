"""Corpus loading, held-out split, tokenisation, packing and passkey sequences.

Training data is a fixed tensor of packed rows [num_rows, seq_len] (documents tokenised, EOS
appended, concatenated, cut into rows). The rows of optimizer step ``s`` are a pure function of
(seed, s): epochs are shuffled with a seeded permutation, and a seeded share of each batch is
replaced by synthetic passkey sequences. A resumed run therefore sees exactly the same batches,
and each rank of a multi-process run takes its own contiguous slice of the same global batch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_CORPUS = ASSETS_DIR / "corpus" / "python_docs.jsonl.gz"
BUILTIN_CORPUS_NAME = "builtin"


# ----------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    documents = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{line_number}: each JSON line needs a string field 'text'")
            documents.append(record["text"])
    return documents


def corpus_files(spec: str) -> list[Path]:
    """The files a corpus spec names: 'builtin', a .txt/.jsonl(.gz) file, or a folder of them."""
    if spec == BUILTIN_CORPUS_NAME:
        return [BUILTIN_CORPUS]
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_corpus_file(p))
        if not files:
            raise FileNotFoundError(f"data.corpus folder {spec!r} holds no .txt, .jsonl or .jsonl.gz file")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"data.corpus {spec!r} is neither 'builtin', a file nor a folder")
    if not _is_corpus_file(path):
        raise ValueError(f"data.corpus {spec!r} must end in .txt, .jsonl or .jsonl.gz")
    return [path]


def _is_corpus_file(path: Path) -> bool:
    name = path.name
    return name.endswith(".txt") or name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def load_documents(spec: str) -> list[str]:
    """Documents of a corpus: one per JSON line ({"text": ...}), or one per .txt file."""
    documents: list[str] = []
    for path in corpus_files(spec):
        if path.name.endswith(".txt"):
            documents.append(path.read_text(encoding="utf-8"))
        else:
            documents.extend(_read_jsonl(path))
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ValueError(f"data.corpus {spec!r} holds no non-empty document")
    return documents


def is_heldout(document: str, heldout_fraction: float) -> bool:
    """Stable split by content hash: a document lands on the same side whatever the order or seed."""
    digest = hashlib.sha1(document.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < heldout_fraction


def split_documents(documents: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, heldout) documents; both non-empty when there are at least two documents."""
    train = [d for d in documents if not is_heldout(d, heldout_fraction)]
    heldout = [d for d in documents if is_heldout(d, heldout_fraction)]
    if heldout_fraction > 0 and not heldout and len(train) > 1:
        heldout = [train.pop()]
    if not train:
        train = [heldout.pop(0)]
    return train, heldout


def tokenize_documents(tokenizer, documents: list[str]) -> list[list[int]]:
    """Token ids of each document with the tokenizer's EOS appended."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; packing needs one to mark document ends")
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    return [list(ids) + [eos] for ids in encoded]


def token_stream(token_documents: list[list[int]]) -> torch.Tensor:
    """All documents concatenated: [num_tokens] int64."""
    return torch.tensor([t for doc in token_documents for t in doc], dtype=torch.long)


def pack_rows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into rows [num_rows, seq_len] (the tail shorter than a row is dropped)."""
    num_rows = stream.numel() // seq_len
    if num_rows == 0:
        raise ValueError(f"the corpus has {stream.numel()} tokens, fewer than one row of seq_len={seq_len}")
    return stream[: num_rows * seq_len].view(num_rows, seq_len)


# ----------------------------------------------------------------------------------------------
# Passkey retrieval sequences
# ----------------------------------------------------------------------------------------------
PASSKEY_DIGITS = 5


@dataclass
class PasskeyExample:
    input_ids: torch.Tensor  # [length] int64
    answer_positions: torch.Tensor  # positions of the scored answer tokens (the digits) in input_ids


class PasskeyBuilder:
    """Builds passkey sequences: a random number hidden at a random depth of filler text.

    Layout: intro, filler, needle "The pass key is 12345. Remember it.", filler, question
    "What is the pass key? The pass key is", answer " 12345", ".". Pieces are tokenised separately
    and concatenated, so the answer tokens are exactly the needle's number tokens.
    """

    def __init__(self, tokenizer):
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self._encode = encode
        self.intro = encode("A pass key is hidden in this text. Remember it.\n")
        self.needle_head = encode(" The pass key is")
        self.needle_tail = encode(". Remember it.")
        self.question = encode("\nWhat is the pass key? The pass key is")
        self.answer_tail = encode(".")
        self._digit_cache: dict[str, tuple[list[int], int]] = {}

    def _number_ids(self, number: str) -> tuple[list[int], int]:
        """Token ids of " <number>" and how many of them (at the end) spell the digits.

        A tokenizer may give the leading space a token of its own; that token is trivially
        predictable after "is", so it is not scored.
        """
        if number not in self._digit_cache:
            with_space, digits = self._encode(" " + number), self._encode(number)
            scored = len(digits) if with_space[len(with_space) - len(digits):] == digits else len(with_space)
            self._digit_cache[number] = (with_space, scored)
        return self._digit_cache[number]

    def fixed_length(self, number_length: int) -> int:
        return (len(self.intro) + len(self.needle_head) + len(self.needle_tail) + len(self.question)
                + len(self.answer_tail) + 2 * number_length)

    def build(self, length: int, filler: torch.Tensor, generator: torch.Generator) -> PasskeyExample:
        """One sequence of exactly ``length`` tokens; filler spans are drawn from ``filler`` [num_tokens]."""
        digits = torch.randint(0, 10, (PASSKEY_DIGITS,), generator=generator)
        number_ids, scored = self._number_ids("".join(str(int(d)) for d in digits))
        filler_len = length - self.fixed_length(len(number_ids))
        if filler_len < 0:
            raise ValueError(
                f"passkey length {length} is too short: the template alone needs "
                f"{self.fixed_length(len(number_ids))} tokens"
            )
        if filler.numel() < filler_len + 1:
            raise ValueError(f"filler stream has {filler.numel()} tokens, fewer than the {filler_len} needed")
        start = int(torch.randint(0, filler.numel() - filler_len, (1,), generator=generator))
        hay = filler[start : start + filler_len].tolist()
        depth = int(torch.randint(0, filler_len + 1, (1,), generator=generator))
        head = self.intro + hay[:depth] + self.needle_head + number_ids + self.needle_tail + hay[depth:] + self.question
        ids = head + number_ids + self.answer_tail
        answer_positions = torch.arange(len(head) + len(number_ids) - scored, len(head) + len(number_ids))
        return PasskeyExample(torch.tensor(ids, dtype=torch.long), answer_positions)


# ----------------------------------------------------------------------------------------------
# Deterministic batches
# ----------------------------------------------------------------------------------------------
class PackedBatches:
    """Global batches of packed rows, a pure function of the optimizer step.

    Args:
        rows: [num_rows, seq_len] int64 packed training rows.
        global_batch: rows per optimizer step over all ranks.
        seed: seeds the epoch permutations and the passkey draw.
        passkey_fraction: expected share of rows replaced by passkey sequences.
        passkey: builder used for those rows (required when passkey_fraction > 0).
        filler: [num_tokens] token stream the passkey filler is drawn from.
    """

    def __init__(self, rows: torch.Tensor, global_batch: int, seed: int, passkey_fraction: float = 0.0,
                 passkey: PasskeyBuilder | None = None, filler: torch.Tensor | None = None):
        if passkey_fraction > 0 and (passkey is None or filler is None):
            raise ValueError("passkey_fraction > 0 needs a PasskeyBuilder and a filler stream")
        self.rows = rows
        self.global_batch = global_batch
        self.seed = seed
        self.passkey_fraction = passkey_fraction
        self.passkey = passkey
        self.filler = filler
        self._epoch_cache: dict[int, torch.Tensor] = {}

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1]

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epoch_cache:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch_cache = {epoch: torch.randperm(self.rows.shape[0], generator=generator)}
        return self._epoch_cache[epoch]

    def global_rows(self, step: int) -> torch.Tensor:
        """[global_batch, seq_len] rows of optimizer step ``step`` (0-based)."""
        num_rows = self.rows.shape[0]
        indices = []
        for flat in range(step * self.global_batch, (step + 1) * self.global_batch):
            epoch, offset = divmod(flat, num_rows)
            indices.append(int(self._permutation(epoch)[offset]))
        batch = self.rows[indices].clone()
        if self.passkey_fraction > 0:
            generator = torch.Generator().manual_seed(self.seed * 7_919 + step + 1)
            draws = torch.rand(self.global_batch, generator=generator).tolist()
            for row, draw in enumerate(draws):
                if draw < self.passkey_fraction:
                    batch[row] = self.passkey.build(self.seq_len, self.filler, generator).input_ids
        return batch

    def local_rows(self, step: int, rank: int, world_size: int) -> torch.Tensor:
        """This rank's contiguous slice of the global batch of ``step``."""
        per_rank = self.global_batch // world_size
        return self.global_rows(step)[rank * per_rank : (rank + 1) * per_rank]


# ----------------------------------------------------------------------------------------------
# Everything a stage needs from a corpus
# ----------------------------------------------------------------------------------------------
@dataclass
class CorpusSplits:
    train_stream: torch.Tensor  # [num_train_tokens]
    heldout_stream: torch.Tensor  # [num_heldout_tokens]
    heldout_documents: list[list[int]]  # token ids per held-out document (EOS appended)


def load_corpus_splits(spec: str, tokenizer, heldout_fraction: float, cache_dir: str | os.PathLike | None = None
                       ) -> CorpusSplits:
    """Load, split and tokenise a corpus (the tokenised result is cached as a .pt in ``cache_dir``)."""
    cache_path = None
    if cache_dir is not None:
        key = hashlib.sha1(
            json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in corpus_files(spec)]
                       + [heldout_fraction, sorted(tokenizer.get_vocab().items())]).encode()
        ).hexdigest()[:16]
        cache_path = Path(cache_dir) / f"tokens-{key}.pt"
        if cache_path.is_file():
            cached = torch.load(cache_path)
            return CorpusSplits(cached["train"], cached["heldout"], cached["heldout_documents"])
    train_docs, heldout_docs = split_documents(load_documents(spec), heldout_fraction)
    heldout_tokens = tokenize_documents(tokenizer, heldout_docs)
    splits = CorpusSplits(token_stream(tokenize_documents(tokenizer, train_docs)), token_stream(heldout_tokens),
                          heldout_tokens)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        torch.save({"train": splits.train_stream, "heldout": splits.heldout_stream,
                    "heldout_documents": splits.heldout_documents}, tmp)
        os.replace(tmp, cache_path)
    return splits
