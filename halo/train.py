"""The training loop shared by every HALO stage (and by the tiny-teacher script).

One optimizer step = one global batch of packed rows, split over ranks and then into micro
batches (gradient accumulation). AdamW (betas 0.9/0.95, weight decay 0) on float32 master
weights, bf16 autocast on CUDA, linear warm-up then cosine (or constant) learning rate, gradient
clipping, JSON-lines logs, atomic checkpoints, exact resume, and a clean stop on a non-finite loss.

Several processes (torchrun) are supported without DistributedDataParallel: after the
micro-batch loop the gradients of all trainable parameters are averaged with one flat
all-reduce. That works whatever the stage's forward looks like (stage 1 trains modules that are
fed by hooks of a frozen teacher), and it is what DDP computes, minus the overlap.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist

from .data import PackedBatches
from .plots import loss_plot


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite; the message says where and what to try."""


# ----------------------------------------------------------------------------------------------
# Processes and devices
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec != "cpu" and torch.cuda.is_available()
    if not torch_dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def resolve_device(device_spec: str, dist: DistInfo) -> torch.device:
    """'auto' -> this rank's GPU if there is one, else the CPU; 'cuda' on a multi-GPU run -> cuda:local_rank."""
    if device_spec == "auto":
        device_spec = "cuda" if torch.cuda.is_available() else "cpu"
    if device_spec == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch.cuda.is_available() is False")
        return torch.device("cuda", dist.local_rank)
    return torch.device(device_spec)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` ('auto': bf16 on CUDA, none on CPU; 'bf16'; 'fp32')."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast to ``amp_dtype`` on ``device``, or no autocast when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (the method name differs across transformers versions)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def compile_enabled(setting: bool | None, device: torch.device) -> bool:
    """A stage's ``compile`` setting on ``device``: None compiles on CUDA, where the fused element-wise kernels
    pay for the compile time many times over, and not on the CPU."""
    return device.type == "cuda" if setting is None else setting


def compile_decoder_layers(model) -> None:
    """torch.compile every decoder layer of ``model`` (a HypeNet or Qwen3 causal LM) in place.

    Eager mode runs the element-wise work between the matmuls and the attention kernels (norms, residual adds,
    casts, activations, gates) as one pass over memory per operator; Inductor fuses it. Compiling layer by layer
    rather than the whole model keeps the compile short: layers of one kind share a graph.
    """
    for layer in model.model.layers:
        layer.compile()


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        torch_dist.barrier()


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then cosine or flat."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Logs and plots
# ----------------------------------------------------------------------------------------------
def read_log(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
LossFn = Callable[[torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class TrainResult:
    records: list[dict]  # one per logged step (all steps of all runs of this stage, from the log)
    step: int  # optimizer steps done
    finished: bool  # False when the run stopped early because of stop_after


class Trainer:
    """Runs the optimizer steps of one stage.

    Args:
        name: stage name (logs, progress bar, errors).
        module: holds the trainable parameters (those with requires_grad) and is checkpointed whole.
        loss_fn: micro batch [b, seq_len] int64 on ``device`` -> (scalar loss, extra float metrics).
        batches: the stage's deterministic batches.
        cfg: the stage config (steps, lr, min_lr, warmup_steps, schedule, global_batch, micro_batch,
            grad_clip, checkpoint_every, log_every, stop_after).
        out_dir: holds checkpoint.pt, log.jsonl and loss.png.
    """

    def __init__(self, *, name: str, module: torch.nn.Module, loss_fn: LossFn, batches: PackedBatches, cfg,
                 out_dir: str | os.PathLike, dist: DistInfo, device: torch.device,
                 amp_dtype: torch.dtype | None, progress: bool = True):
        self.name, self.module, self.loss_fn, self.batches, self.cfg = name, module, loss_fn, batches, cfg
        self.out_dir, self.dist, self.device, self.amp_dtype = Path(out_dir), dist, device, amp_dtype
        self.progress = progress
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{name}: the module has no trainable parameter")
        per_rank, remainder = divmod(cfg.global_batch, dist.world_size)
        if remainder or per_rank % cfg.micro_batch:
            raise ValueError(
                f"{name}.global_batch={cfg.global_batch} must split evenly over world_size={dist.world_size} "
                f"ranks and then into micro_batch={cfg.micro_batch} rows"
            )
        self.accumulation = per_rank // cfg.micro_batch
        # fused: one kernel for the whole update on CUDA instead of several multi-tensor passes over the float32
        # weights and both moments (the update is the same algorithm; the state dict is the same format).
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8,
                                           fused=True if device.type == "cuda" else None)
        min_ratio = cfg.min_lr / cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_ratio=min_ratio,
                                schedule=cfg.schedule),
        )
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        self.log_path = self.out_dir / "log.jsonl"
        self.step = 0

    # -- state ----------------------------------------------------------------------------------
    def _cfg_dict(self) -> dict:
        return asdict(self.cfg) if is_dataclass(self.cfg) else dict(vars(self.cfg))

    def save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(
            {"step": self.step, "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
             "scheduler": self.scheduler.state_dict(), "rng": _rng_state(), "config": self._cfg_dict()},
            self.checkpoint_path,
        )

    def maybe_resume(self) -> bool:
        """Load checkpoint.pt if present; returns whether it did."""
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        saved_cfg = state.get("config", {})
        for key in ("global_batch", "seq_len", "steps", "lr", "schedule", "warmup_steps", "min_lr"):
            if key in saved_cfg and saved_cfg[key] != getattr(self.cfg, key, None):
                raise ValueError(
                    f"{self.name}: {self.checkpoint_path} was written with {key}={saved_cfg[key]!r} but the config "
                    f"now says {key}={getattr(self.cfg, key, None)!r}; restore the value or delete {self.out_dir}"
                )
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        return True

    # -- steps ----------------------------------------------------------------------------------
    def _all_reduce_gradients(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch_dist.all_reduce(flat)
        flat /= self.dist.world_size
        offset = 0
        for param, grad in zip(self.params, grads):
            numel = grad.numel()
            param.grad = flat[offset : offset + numel].view_as(param).to(param.dtype)
            offset += numel

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.dist.enabled:
            torch_dist.all_reduce(values)
            values /= self.dist.world_size
        return values

    def train_step(self) -> dict:
        """One optimizer step on the rows of step ``self.step`` (all micro batches, clipping, AdamW, schedule);
        returns its log record. No logging or checkpointing: ``fit`` adds those."""
        rows = self.batches.local_rows(self.step, self.dist.rank, self.dist.world_size).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        metric_totals: dict[str, float] = {}
        for micro in rows.split(self.cfg.micro_batch):
            with autocast_context(self.device, self.amp_dtype):
                loss, metrics = self.loss_fn(micro)
            (loss / self.accumulation).backward()
            loss_total += loss.detach().float() / self.accumulation
            for key, value in metrics.items():
                metric_totals[key] = metric_totals.get(key, 0.0) + float(value) / self.accumulation
        if self.dist.enabled:
            self._all_reduce_gradients()
        reduced = self._mean_over_ranks(
            torch.stack([loss_total] + [torch.tensor(v, device=self.device) for v in metric_totals.values()])
        )
        loss_value = float(reduced[0])
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"{self.name}: the loss is {loss_value} at step {self.step + 1}; stopping. The last good checkpoint "
                f"is {self.checkpoint_path if self.checkpoint_path.is_file() else 'none (no checkpoint yet)'}. "
                f"Try a lower {self.name}.lr (now {self.cfg.lr:g}) or precision=fp32."
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)}
        record.update({k: float(v) for k, v in zip(metric_totals, reduced[1:].tolist())})
        return record

    def fit(self) -> TrainResult:
        """Resume if possible, then train until ``cfg.steps`` (or ``cfg.stop_after`` steps of this run)."""
        resumed = self.maybe_resume()
        if resumed and self.dist.is_main:
            print(f"[{self.name}] resumed from {self.checkpoint_path} at step {self.step}/{self.cfg.steps}")
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # Drop log lines of steps after the checkpoint: they are about to be recomputed.
            kept = [r for r in read_log(self.log_path) if r.get("step", 0) <= self.step]
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.module.train()
        stop_at = self.cfg.steps
        if self.cfg.stop_after is not None:
            stop_at = min(stop_at, self.step + self.cfg.stop_after)
        tokens_per_step = self.cfg.global_batch * self.batches.seq_len
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True)
        start_time, start_step = time.perf_counter(), self.step
        try:
            while self.step < stop_at:
                record = self.train_step()
                elapsed = time.perf_counter() - start_time
                record["tokens"] = self.step * tokens_per_step
                record["tokens_per_s"] = (self.step - start_step) * tokens_per_step / max(elapsed, 1e-9)
                if self.dist.is_main:
                    with open(self.log_path, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    elif self.step % self.cfg.log_every == 0:
                        print(f"[{self.name}] step {self.step}/{self.cfg.steps} loss {record['loss']:.4f} "
                              f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s", flush=True)
                if self.step % self.cfg.checkpoint_every == 0 or self.step == stop_at:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        barrier(self.dist)
        records = read_log(self.log_path)
        if self.dist.is_main and records:
            loss_plot(records, self.out_dir / "loss.png", f"{self.name} loss")
        return TrainResult(records=records, step=self.step, finished=self.step >= self.cfg.steps)
