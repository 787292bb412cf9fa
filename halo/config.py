"""HaloConfig: every knob of a HALO run, loaded from JSON plus ``key=value`` overrides.

Everything is validated before any model or corpus is loaded, and each error names the field:
    halo distill --config run.json distill.lr=5e-5 distill.steps=2000
Defaults follow the paper (SPEC section 2) for a 2B-class teacher; the demo overrides them with
tiny step counts. Dotted keys address sections (``align.steps``); values are parsed as JSON when
they parse (numbers, true/false/null, lists), else taken as strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .data import BUILTIN_CORPUS_NAME, corpus_files

BUILTIN_TEACHER_NAME = "builtin"
BUILTIN_TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "tiny-qwen3"


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the field."""


@dataclass
class StageConfig:
    """One training stage. global_batch rows of seq_len tokens per optimizer step."""

    steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine" (to min_lr) or "constant" (after warm-up)
    seq_len: int = 512
    global_batch: int = 32
    micro_batch: int = 8
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    log_every: int = 10
    gradient_checkpointing: bool = False
    # torch.compile the decoder layers of the stage's models (distill, finetune); None: on CUDA devices only
    compile: bool | None = None
    stop_after: int | None = None  # run at most this many steps now; a later call resumes


@dataclass
class DataConfig:
    corpus: str = BUILTIN_CORPUS_NAME  # "builtin", a .txt / .jsonl(.gz) file ({"text": ...} per line) or a folder
    heldout_fraction: float = 0.1  # share of documents (by content hash) kept out of training
    passkey_fraction: float = 0.0  # share of training rows replaced by synthetic passkey sequences


@dataclass
class SelectConfig:
    num_attention: int | None = None  # layers kept as attention; default floor(num_layers / 4)
    method: str = "halo"  # "halo": (max R - R_i) / (max C - C_i + eps); "baseline": R_teacher - R_i
    recall_multipliers: list[float] = field(default_factory=lambda: [1.0])  # passkey lengths, x eval.base_length
    recall_samples: int = 32  # passkey sequences per length
    quality_rows: int = 16  # held-out rows for C
    eps: float = 1e-3
    clip: float = 50.0


@dataclass
class AlphaConfig:
    grid: list[float] = field(default_factory=lambda: [100.0, 200.0, 300.0, 500.0, 700.0, 900.0, 1500.0])
    seq_len: int = 16384  # length of the held-out rows used to score each a
    num_rows: int = 8


@dataclass
class EvalConfig:
    base_length: int | None = None  # "1x" length; default: distill.seq_len (the training length)
    multipliers: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0])
    passkey_samples: int = 20
    lm_rows: int = 16  # held-out rows of base_length tokens for the LM loss


@dataclass
class HaloConfig:
    teacher: str = BUILTIN_TEACHER_NAME  # HF Qwen3 checkpoint folder, or "builtin" (the shipped tiny teacher)
    tokenizer: str | None = None  # default: the teacher folder
    output_dir: str = "halo-out"
    device: str = "auto"  # "auto", "cpu", "cuda"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    seed: int = 0
    loss_chunk_size: int = 1024  # tokens per chunk of the fused KL / CE
    data: DataConfig = field(default_factory=DataConfig)
    align: StageConfig = field(default_factory=lambda: StageConfig(
        steps=20000, lr=1e-3, min_lr=1e-5, seq_len=512, global_batch=32, micro_batch=8))
    select: SelectConfig = field(default_factory=SelectConfig)
    distill: StageConfig = field(default_factory=lambda: StageConfig(
        steps=20000, lr=1e-4, min_lr=1e-5, seq_len=512, global_batch=96, micro_batch=8))
    finetune: StageConfig = field(default_factory=lambda: StageConfig(
        steps=500, lr=1e-5, min_lr=1e-5, schedule="constant", seq_len=16384, global_batch=128, micro_batch=1,
        gradient_checkpointing=True))
    alpha: AlphaConfig = field(default_factory=AlphaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # -- derived ---------------------------------------------------------------------------------
    @property
    def teacher_dir(self) -> Path:
        return BUILTIN_TEACHER_DIR if self.teacher == BUILTIN_TEACHER_NAME else Path(self.teacher)

    @property
    def tokenizer_dir(self) -> Path:
        if self.tokenizer is None:
            return self.teacher_dir
        return BUILTIN_TEACHER_DIR if self.tokenizer == BUILTIN_TEACHER_NAME else Path(self.tokenizer)

    @property
    def eval_base_length(self) -> int:
        return self.eval.base_length if self.eval.base_length is not None else self.distill.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Building from dicts
# ----------------------------------------------------------------------------------------------
def _unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"unknown config field {where}{key!r}{hint}")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check ``value`` against a field annotation (int, float, str, bool, list[float], X | None)."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is not None and type(None) in args:  # X | None
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {name}")


def _update_dataclass(obj, values: dict, where: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the config'} must be a JSON object, got {values!r}")
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        if key not in names:
            raise _unknown_key_error(key, names, where)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _update_dataclass(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}{key}"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'align.steps=100' -> (['align', 'steps'], 100). The value is JSON when it parses, else a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. distill.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    return nested


def build_config(file_values: dict | None = None, overrides: list[str] = ()) -> HaloConfig:
    """Defaults, then the file's values, then the overrides; validated (no model is touched)."""
    config = HaloConfig()
    if file_values:
        _update_dataclass(config, file_values)
    for text in overrides:
        path, value = parse_override(text)
        _update_dataclass(config, _nest(path, value))
    validate(config)
    return config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (),
                base: dict | None = None) -> HaloConfig:
    """Read a JSON config file (optional) on top of ``base`` values, apply overrides, validate."""
    values: dict = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            file_values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a JSON object")
        deep_merge(values, file_values)
    return build_config(values, overrides)


def deep_merge(into: dict, values: dict) -> None:
    """Merge settings `values` into `into` in place, nested sections key by key."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate_stage(stage: StageConfig, name: str) -> None:
    _require(stage.steps > 0, f"{name}.steps must be > 0, got {stage.steps}")
    _require(stage.lr > 0, f"{name}.lr must be > 0, got {stage.lr}")
    _require(0 <= stage.min_lr <= stage.lr, f"{name}.min_lr must be in [0, {name}.lr={stage.lr}], got {stage.min_lr}")
    _require(0 <= stage.warmup_steps <= stage.steps,
             f"{name}.warmup_steps must be in [0, {name}.steps={stage.steps}], got {stage.warmup_steps}")
    _require(stage.schedule in ("cosine", "constant"),
             f"{name}.schedule must be 'cosine' or 'constant', got {stage.schedule!r}")
    _require(stage.seq_len >= 2, f"{name}.seq_len must be >= 2, got {stage.seq_len}")
    _require(stage.global_batch > 0, f"{name}.global_batch must be > 0, got {stage.global_batch}")
    _require(stage.micro_batch > 0, f"{name}.micro_batch must be > 0, got {stage.micro_batch}")
    _require(stage.global_batch % stage.micro_batch == 0,
             f"{name}.global_batch={stage.global_batch} must be a multiple of {name}.micro_batch={stage.micro_batch}")
    _require(stage.grad_clip > 0, f"{name}.grad_clip must be > 0, got {stage.grad_clip}")
    _require(stage.checkpoint_every > 0, f"{name}.checkpoint_every must be > 0, got {stage.checkpoint_every}")
    _require(stage.log_every > 0, f"{name}.log_every must be > 0, got {stage.log_every}")
    _require(stage.stop_after is None or stage.stop_after > 0,
             f"{name}.stop_after must be null or > 0, got {stage.stop_after}")


def teacher_config_dict(config: HaloConfig) -> dict:
    """The teacher's config.json as a dict (read as JSON: no model is loaded)."""
    path = config.teacher_dir / "config.json"
    _require(path.is_file(), f"teacher {config.teacher!r}: {path} does not exist (give a HF Qwen3 checkpoint folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"teacher {config.teacher!r}: {path} is not valid JSON: {error}") from None


def validate(config: HaloConfig) -> None:
    """Check every field; raise ConfigError naming the first bad one. Reads only small JSON files."""
    _require(config.device in ("auto", "cpu", "cuda"), f"device must be 'auto', 'cpu' or 'cuda', got {config.device!r}")
    _require(config.precision in ("auto", "bf16", "fp32"),
             f"precision must be 'auto', 'bf16' or 'fp32', got {config.precision!r}")
    _require(config.seed >= 0, f"seed must be >= 0, got {config.seed}")
    _require(config.loss_chunk_size > 0, f"loss_chunk_size must be > 0, got {config.loss_chunk_size}")
    _require(bool(config.output_dir), "output_dir must be a non-empty path")
    for name in ("align", "distill", "finetune"):
        _validate_stage(getattr(config, name), name)

    data = config.data
    _require(0.0 < data.heldout_fraction < 1.0, f"data.heldout_fraction must be in (0, 1), got {data.heldout_fraction}")
    _require(0.0 <= data.passkey_fraction <= 1.0,
             f"data.passkey_fraction must be in [0, 1], got {data.passkey_fraction}")
    try:
        corpus_files(data.corpus)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None

    select = config.select
    _require(select.method in ("halo", "baseline"), f"select.method must be 'halo' or 'baseline', got {select.method!r}")
    _require(len(select.recall_multipliers) > 0 and all(m > 0 for m in select.recall_multipliers),
             f"select.recall_multipliers must be a non-empty list of numbers > 0, got {select.recall_multipliers}")
    _require(select.recall_samples > 0, f"select.recall_samples must be > 0, got {select.recall_samples}")
    _require(select.quality_rows > 0, f"select.quality_rows must be > 0, got {select.quality_rows}")
    _require(select.eps > 0, f"select.eps must be > 0, got {select.eps}")
    _require(select.clip > 0, f"select.clip must be > 0, got {select.clip}")

    alpha = config.alpha
    _require(len(alpha.grid) > 0 and all(a > 1.0 for a in alpha.grid),
             f"alpha.grid must be a non-empty list of numbers > 1 (s_t = ln(t+a)/ln(a)), got {alpha.grid}")
    _require(alpha.seq_len >= 2, f"alpha.seq_len must be >= 2, got {alpha.seq_len}")
    _require(alpha.num_rows > 0, f"alpha.num_rows must be > 0, got {alpha.num_rows}")

    ev = config.eval
    _require(ev.base_length is None or ev.base_length >= 64,
             f"eval.base_length must be null or >= 64 (a passkey sequence needs ~40 tokens), got {ev.base_length}")
    _require(len(ev.multipliers) > 0 and all(m > 0 for m in ev.multipliers),
             f"eval.multipliers must be a non-empty list of numbers > 0, got {ev.multipliers}")
    _require(ev.passkey_samples > 0, f"eval.passkey_samples must be > 0, got {ev.passkey_samples}")
    _require(ev.lm_rows > 0, f"eval.lm_rows must be > 0, got {ev.lm_rows}")
    _require(config.eval_base_length >= 64,
             f"the passkey base length (eval.base_length, else distill.seq_len) must be >= 64, "
             f"got {config.eval_base_length}")

    teacher = teacher_config_dict(config)
    _require(teacher.get("model_type") == "qwen3",
             f"teacher {config.teacher!r}: model_type must be 'qwen3', got {teacher.get('model_type')!r}")
    num_layers = teacher.get("num_hidden_layers")
    _require(isinstance(num_layers, int) and num_layers > 0,
             f"teacher {config.teacher!r}: config.json has no valid num_hidden_layers")
    _require(select.num_attention is None or 0 <= select.num_attention <= num_layers,
             f"select.num_attention must be null or in [0, {num_layers}] (the teacher's layers), "
             f"got {select.num_attention}")
    tokenizer_dir = config.tokenizer_dir
    _require(tokenizer_dir.is_dir() and any((tokenizer_dir / n).is_file()
                                            for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")),
             f"tokenizer folder {str(tokenizer_dir)!r} has no tokenizer.json / tokenizer_config.json")
