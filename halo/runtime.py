"""What every stage shares: processes and device, tokenizer, corpus splits, the frozen teacher,
stage folders and their completion markers."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import HaloConfig, StageConfig
from .data import CorpusSplits, PackedBatches, PasskeyBuilder, load_corpus_splits, pack_rows
from .train import DistInfo, autocast_context, autocast_dtype, barrier, init_distributed, resolve_device

STAGES = ("align", "select", "distill", "finetune", "export", "alpha")


@dataclass
class Runtime:
    config: HaloConfig
    dist: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    progress: bool = True
    _cache: dict = field(default_factory=dict)

    @classmethod
    def create(cls, config: HaloConfig, progress: bool = True) -> "Runtime":
        dist = init_distributed(config.device)
        device = resolve_device(config.device, dist)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # Float32 matmuls (the evaluations' logits; every matmul under precision=fp32) on TF32 tensor cores.
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        runtime = cls(config, dist, device, autocast_dtype(device, config.precision), progress)
        if dist.is_main:
            runtime.out.mkdir(parents=True, exist_ok=True)
            (runtime.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        barrier(dist)
        return runtime

    # -- folders ---------------------------------------------------------------------------------
    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def done_summary(self, stage: str) -> dict | None:
        """The summary a finished stage left in <stage>/done.json, or None."""
        path = self.stage_dir(stage) / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def mark_done(self, stage: str, summary: dict) -> None:
        if self.dist.is_main:
            path = self.stage_dir(stage) / "done.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, path)
        barrier(self.dist)

    def reset_stage(self, stage: str) -> None:
        """Delete a stage's folder (``--force``): it then runs from scratch."""
        if self.dist.is_main and self.stage_dir(stage).exists():
            shutil.rmtree(self.stage_dir(stage))
        barrier(self.dist)

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    # -- precision -------------------------------------------------------------------------------
    def autocast(self):
        return autocast_context(self.device, self.amp_dtype)

    # -- data ------------------------------------------------------------------------------------
    def tokenizer(self):
        if "tokenizer" not in self._cache:
            from transformers import AutoTokenizer

            self._cache["tokenizer"] = AutoTokenizer.from_pretrained(self.config.tokenizer_dir)
        return self._cache["tokenizer"]

    def splits(self) -> CorpusSplits:
        if "splits" not in self._cache:
            cache_dir = self.out / "cache"
            if self.dist.is_main:  # rank 0 tokenises and caches; the others read the cache
                load_corpus_splits(self.config.data.corpus, self.tokenizer(), self.config.data.heldout_fraction,
                                   cache_dir)
            barrier(self.dist)
            self._cache["splits"] = load_corpus_splits(self.config.data.corpus, self.tokenizer(),
                                                       self.config.data.heldout_fraction, cache_dir)
        return self._cache["splits"]

    def train_batches(self, stage: StageConfig) -> PackedBatches:
        splits = self.splits()
        return PackedBatches(pack_rows(splits.train_stream, stage.seq_len), stage.global_batch, self.config.seed,
                             self.config.data.passkey_fraction, PasskeyBuilder(self.tokenizer()),
                             splits.train_stream)

    # -- models ----------------------------------------------------------------------------------
    def teacher(self):
        """The frozen teacher (eval mode, no grad), bf16 on CUDA when autocasting to bf16, else fp32."""
        if "teacher" not in self._cache:
            from transformers import AutoModelForCausalLM

            dtype = torch.bfloat16 if self.amp_dtype == torch.bfloat16 else torch.float32
            teacher = AutoModelForCausalLM.from_pretrained(self.config.teacher_dir, dtype=dtype)
            teacher.to(self.device).eval().requires_grad_(False)
            self._cache["teacher"] = teacher
        return self._cache["teacher"]
