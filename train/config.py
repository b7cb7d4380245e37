"""Training configs: TOML (standard-library tomllib; the tomli package on Python 3.10) into dataclasses,
`key=value` overrides.

    python -m train.sft --config configs/toy/smoke_sft.toml optim.lr=3e-4 run.out_dir=runs/a

A config file has one table per section below; unknown tables or keys are an error naming the
file and the key, so a typo never silently falls back to a default. An override's value is
parsed as a TOML value (`optim.lr=1e-4`, `kd.divergence="jsd"`, `data.train=["a.jsonl"]`), and a
bare word that is not valid TOML is taken as a string (`run.out_dir=runs/a`).

Every value is then checked for range, not only type, in one table (RANGES below: key,
test, allowed values in words): learning rates and temperatures finite and > 0, counts >= 1 (or
>= 0 where 0 means "off" / "all"), betas and probabilities in their intervals, strings with a
fixed set of values among them. A value outside gives one ConfigError naming the file and line
(or the override) that set it, the key and the allowed range. `optim.max_steps` must be >= 1
unless `optim.epochs` sets the length: 0 steps would hand an untrained model to the next stage.
What depends on the machine (does `run.device` exist, can `run.out_dir` be written, does
`model.checkpoint` exist) is checked by the recipe at start (train/recipe.py), so a config
stays loadable anywhere. A UTF-8 byte-order mark at the start of a file is ignored.

The config (file + overrides, as given) is saved beside every checkpoint as `config.json`; a run
length set by `optim.epochs` is computed at start (train/loop.py `total_steps`), not written back. Secrets never live in a
config: API keys are named by the environment variable that holds them (`kd.api_key_env`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (setup.py installs it there)
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


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
    # How the ranks share the model: "ddp" (each holds it whole) or "fsdp2" (each holds 1/world_size of every
    # weight, gradient and optimizer moment: train/fsdp2.py). Same numbers; one process trains plainly either way.
    strategy: str = "ddp"
    merge_at_end: bool = True  # write out_dir/merged: base + this stage's LoRA, the next stage's start
    # Metrics sinks besides out_dir/metrics.jsonl, rank 0 only, off by default (train/metrics.py says why run.*):
    tensorboard: bool = False  # True: event files in out_dir/tensorboard; needs `pip install tensorboard`
    wandb_project: str = ""  # non-empty: log to this Weights & Biases project; needs `pip install wandb`
    wandb_entity: str = ""  # the W&B user or team; "" = the logged-in account's default (needs wandb_project)


@dataclass
class KDSection:
    teacher: str = ""  # "local:DIR" or "openai:MODEL"
    # The teacher's tokenizer (file or directory, model.tokenizer.load_tokenizer): "" = local:DIR's own, or
    # the student's for openai:. Its vocabulary must match the student's on ordinary text (checked at start).
    teacher_tokenizer: str = ""
    # The teacher's chat template: "" / "phi" (the student's), "chatml", "harmony" (gpt-oss), or a string
    # with {user} and the teacher's special-token markers (rollout/teacher_format.py TeacherChatTemplate).
    teacher_template: str = ""
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name, never its value; "" for a server without auth
    timeout_s: float = 120.0  # one request to an openai: teacher
    max_attempts: int = 8  # tries per request (retryable errors: timeouts, 429, 5xx), with exponential backoff
    max_concurrency: int = 8  # requests in flight to an openai: teacher
    response_cache: bool = False  # on-policy rollouts are new every step, so a cache of scores would never hit
    top_k: int = 20
    divergence: str = "forward"  # "forward", "reverse" or "jsd"
    beta: float = 0.5  # generalized JSD mixture weight, 0 < beta < 1; set it only with divergence = "jsd"
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
    """Read a TOML file (or start from defaults when path is None), apply overrides, check ranges."""
    values: dict[str, Any] = {}
    where = "defaults"
    text = ""
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is dropped
            values = tomllib.loads(text)
        except UnicodeDecodeError as err:
            line = err.object[:err.start].count(b"\n") + 1
            raise ConfigError(f"{path}, line {line}: not UTF-8 text; save the file as UTF-8") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML ({err})") from None
    origins: dict[str, str] = {}
    for override in overrides:
        keys, value = parse_override(override)
        if len(keys) != 2:
            raise ConfigError(f"override {override!r}: expected exactly section.key")
        values.setdefault(keys[0], {})[keys[1]] = value
        key = ".".join(keys)
        origins[key] = f"override '{key}=...'" if key in SECRET_NAMING_KEYS else f"override {override!r}"
    config = from_dict(values, where)
    where_set = lambda key: origins.get(key) or _line_in(text, key, where)  # noqa: E731
    check_ranges(config, where_set)
    if "beta" in values.get("kd", {}) and config.kd.divergence != "jsd":
        raise ConfigError(f"{where_set('kd.beta')}: kd.beta is the generalized JSD's mixture weight, used only with "
                          f"kd.divergence = \"jsd\" (here \"{config.kd.divergence}\"); remove kd.beta or set "
                          "kd.divergence = \"jsd\"")
    return config


# ---------------------------------------------------------------------------------------------
# ranges


def _number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """(test, words) for a finite number in an interval."""
    def test(value) -> bool:
        return (math.isfinite(value) and (value > low if low_open else value >= low)
                and (value < high if high_open else value <= high))
    low_text = f"> {low:g}" if low_open else f">= {low:g}"
    if high == math.inf:
        return test, f"a finite number {low_text}"
    return test, f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _count(low: int, note: str = ""):
    return (lambda value: value >= low), f"an integer >= {low}{note}"


def _one_of(*choices: str):
    return (lambda value: value in choices), "one of " + ", ".join(f'"{c}"' for c in choices)


def _betas(value) -> bool:
    return len(value) == 2 and all(type(b) in (int, float) and 0 <= b < 1 for b in value)


def _paths(value) -> bool:
    return all(isinstance(item, str) and item for item in value)


def _teacher_template(value: str) -> bool:
    """kd.teacher_template parses (rollout/teacher_format.py TeacherChatTemplate; imported here only when
    checked, as the rest of the config needs nothing of rollout)."""
    from rollout.teacher_format import teacher_template_problem

    return teacher_template_problem(value) is None


TEACHER_TEMPLATES = ('"" or "phi" (the student\'s Phi-4 template), "chatml", "harmony" (gpt-oss), or a template '
                     "string with {user} (or both {transcript} and {instruction}), no other placeholders, literal "
                     "braces doubled, and the role markers as the teacher tokenizer's special-token text, e.g. "
                     '"<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n"')


def _wandb_name(value: str) -> bool:
    """Empty (off), or a name W&B accepts for a project or entity: at most 128 characters, none of
    / \\ # ? % : and no control characters (W&B itself would refuse it only when the run starts)."""
    return len(value) <= 128 and not any(c in '/\\#?%:' or not c.isprintable() for c in value)


WANDB_NAME = '"" or a W&B name: at most 128 characters, none of / \\ # ? % : or control characters'

# Keys whose value names a secret's variable: a key pasted there instead is never repeated.
SECRET_NAMING_KEYS = ("kd.api_key_env",)

RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("model.dtype", *_one_of("float32", "bfloat16")),
    ("model.lora_rank", *_count(1)),
    ("model.lora_alpha", *_number(0, low_open=True)),
    ("model.lora_dropout", *_number(0, 1, high_open=True)),
    ("data.train", _paths, "a list of non-empty file paths"),
    ("data.eval", _paths, "a list of non-empty file paths"),
    ("data.batch_size", *_count(1)),
    ("data.max_tokens", *_count(1)),
    ("data.max_audio_seconds", *_number(0, low_open=True)),
    ("data.on_too_long", *_one_of("error", "truncate")),
    ("optim.lr", *_number(0, low_open=True)),
    ("optim.weight_decay", *_number(0)),
    ("optim.betas", _betas, "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    ("optim.eps", *_number(0, low_open=True)),
    ("optim.warmup_steps", *_count(0)),
    ("optim.max_steps", *_count(0, " (>= 1 unless optim.epochs > 0)")),
    ("optim.epochs", *_number(0)),
    ("optim.min_lr_ratio", *_number(0, 1)),
    ("optim.grad_clip", *_number(0)),
    ("optim.grad_accum", *_count(1)),
    ("run.seed", *_count(0)),
    ("run.log_every", *_count(1)),
    ("run.save_every", *_count(0, " (0: only at the end)")),
    ("run.keep_last", *_count(0, " (0: keep every checkpoint)")),
    ("run.eval_every", *_count(0, " (0: never)")),
    ("run.strategy", *_one_of("ddp", "fsdp2")),
    ("run.wandb_project", _wandb_name, WANDB_NAME),
    ("run.wandb_entity", _wandb_name, WANDB_NAME),
    ("kd.teacher_template", _teacher_template, TEACHER_TEMPLATES),
    ("kd.timeout_s", *_number(0, low_open=True)),
    ("kd.max_attempts", *_count(1)),
    ("kd.max_concurrency", *_count(1)),
    ("kd.top_k", *_count(1)),
    ("kd.divergence", *_one_of("forward", "reverse", "jsd")),
    ("kd.beta", *_number(0, 1, low_open=True, high_open=True)),
    ("kd.on_policy_fraction", *_number(0, 1)),
    ("kd.temperature", *_number(0)),
    ("kd.max_new_tokens", *_count(1)),
    ("kd.ce_weight", *_number(0)),
    ("dpo.beta", *_number(0, low_open=True)),
    ("dpo.label_smoothing", *_number(0, 0.5)),
]


def check_ranges(config: TrainConfig, where: Callable[[str], str]) -> None:
    """Raise ConfigError for the first value outside RANGES; `where(key)` says what set it."""
    for key, test, allowed in RANGES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not test(value):
            verdict = "is out of range" if isinstance(value, (int, float)) else "is not allowed"
            raise ConfigError(f"{where(key)}: {key} = {_show(value)} {verdict}; allowed: {allowed}")
    if config.kd.api_key_env:
        from api.keys import env_name_problem

        problem = env_name_problem(config.kd.api_key_env)
        if problem is not None:  # the value itself is never shown: it may be a pasted key
            raise ConfigError(f"{where('kd.api_key_env')}: kd.api_key_env must name an environment variable, but "
                              f"{problem}")
    if config.run.wandb_entity and not config.run.wandb_project:
        raise ConfigError(f"{where('run.wandb_entity')}: run.wandb_entity is set but run.wandb_project is empty, so "
                          "nothing is logged to W&B; set run.wandb_project too, or remove run.wandb_entity")
    if config.optim.max_steps < 1 and config.optim.epochs == 0:
        raise ConfigError(f"{where('optim.max_steps')}: optim.max_steps = {config.optim.max_steps} trains nothing "
                          "(and would hand an untrained model to the next stage); set optim.max_steps >= 1 "
                          "or optim.epochs > 0")


def _show(value) -> str:
    if isinstance(value, (tuple, list, str)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def _line_in(text: str, key: str, where: str) -> str:
    """'FILE, line N' for the line that sets section.key in a TOML text; FILE alone if none does."""
    section, name = key.split(".")
    current = ""
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.fullmatch(r"\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?", line)
        if header:
            current = header.group(1)
        elif current == section and re.match(rf"\s*\"?{re.escape(name)}\"?\s*=", line):
            return f"{where}, line {number}"
    return where
