"""Training configs: TOML (standard-library tomllib) into dataclasses, `key=value` overrides.

    python -m train.sft --config configs/toy/smoke_sft.toml optim.lr=3e-4 run.out_dir=runs/a

A config file has one table per section below; unknown tables or keys are an error naming the
file and the key, so a typo never silently falls back to a default. An override's value is
parsed as a TOML value (`optim.lr=1e-4`, `kd.divergence="jsd"`, `data.train=["a.jsonl"]`), and a
bare word that is not valid TOML is taken as a string (`run.out_dir=runs/a`).

The resolved config is saved beside every checkpoint as `config.json`. Secrets never live in a
config: API keys are named by the environment variable that holds them (`kd.api_key_env`).
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelSection:
    checkpoint: str = ""  # directory read by model.load_pretrained
    tokenizer: str = ""  # tokenizer file or directory; "" = the checkpoint directory
    dtype: str = "float32"  # "float32" or "bfloat16" (weights); CUDA runs under bf16 autocast
    lora_rank: int = 16  # the paper: r 16, alpha 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    train_projector: bool = True
    gradient_checkpointing: bool = False
    mask_audio_padding: bool = False  # True: real masking in the encoder (see model/encoder.py)
    encoder_cache: str = ""  # directory of cached frozen-encoder outputs per clip (model/encoder_cache.py); "" = off


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # JSON-lines manifests (DPO: pairs files)
    eval: list[str] = field(default_factory=list)  # held-out manifests: the stage's loss every run.eval_every steps
    batch_size: int = 4  # at most this many samples (DPO: pairs) per micro-batch and rank
    max_tokens: int = 32768  # padded tokens (audio + text) per micro-batch
    max_audio_seconds: float = 1800.0  # the paper trains on up to 30 minutes
    on_too_long: str = "error"  # or "truncate" (with a warning)
    feature_cache: str = ""  # directory for cached log-mel features; "" = off
    strict: bool = False  # True: a bad sample stops the run instead of being skipped


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_steps: int = 100  # optimizer steps (ignored when epochs > 0)
    epochs: float = 0.0  # > 0: train this many passes over the data (max_steps derived at start)
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global L2 norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step and rank


@dataclass
class RunSection:
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    keep_last: int = 3
    eval_every: int = 0
    device: str = ""  # "" = cuda if available else cpu
    merge_at_end: bool = True  # write out_dir/merged: base + this stage's LoRA, the next stage's start


@dataclass
class KDSection:
    teacher: str = ""  # "local:DIR" or "openai:MODEL"
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name, never its value; "" for a server without auth
    top_k: int = 20
    divergence: str = "forward"  # "forward", "reverse" or "jsd"
    beta: float = 0.5  # generalized JSD mixture weight (divergence = "jsd")
    on_policy_fraction: float = 1.0  # lambda: 1 = always the student's samples (the paper)
    temperature: float = 1.0  # sampling temperature of the student's rollouts
    max_new_tokens: int = 256
    ce_weight: float = 0.0


@dataclass
class DPOSection:
    beta: float = 0.1
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    kd: KDSection = field(default_factory=KDSection)
    dpo: DPOSection = field(default_factory=DPOSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from model.safeio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and what to do."""


def _build_section(cls, values: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    converted = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, list) and isinstance(value, str):
            value = [value]
        if type(value) is not type(default):
            raise ConfigError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}")
        converted[name] = value
    return cls(**converted)


def from_dict(values: dict[str, Any], where: str = "config") -> TrainConfig:
    sections = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known sections: {sorted(sections)}")
    built = {}
    for name in sections:
        cls = type(getattr(TrainConfig(), name))
        section = values.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        built[name] = _build_section(cls, section, f"{where} [{name}]")
    return TrainConfig(**built)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-4' -> (["optim", "lr"], 1e-4)."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. optim.lr=1e-4")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML file (or start from defaults when path is None) and apply overrides."""
    values: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML ({err})") from None
    for override in overrides:
        keys, value = parse_override(override)
        if len(keys) != 2:
            raise ConfigError(f"override {override!r}: expected exactly section.key")
        values.setdefault(keys[0], {})[keys[1]] = value
    return from_dict(values, where)
