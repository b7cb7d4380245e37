"""What every stage recipe shares: command line, model setup from the config, the dataset, the
run, and the hand-off to the next stage.

    python -m train.sft --config configs/toy/smoke_sft.toml [section.key=value ...]
    torchrun --nproc_per_node 8 -m train.kd --config configs/phi4mm/kd_8xa100.toml

Model setup: the checkpoint is loaded (the previous stage's
LoRA already merged into it), a fresh LoRA (r 16, alpha 32 by default) goes on every decoder
projection, and only LoRA and the projector train; the encoder and base decoder stay frozen.
At the end, rank 0 folds this stage's LoRA into the base and writes `out_dir/merged` (weights,
config, tokenizer): the checkpoint the next stage starts from, and the DPO reference. Under
`run.strategy = "fsdp2"` the trained model is sharded: every rank gathers the trainable tensors to
rank 0, which loads them into a fresh copy of the model on the CPU (`unsharded_model`).
Errors a user can fix (config, data, checkpoint) print one message and exit with status 2.
What the config names on this machine is checked before anything loads (`check_environment`):
`run.device` must exist here, `run.out_dir` must be a directory that can be written (made if
absent, tested by writing and removing a file), and `model.checkpoint` must be a directory, so a
wrong path is reported as the checkpoint's, not as the tokenizer's read from it. A metrics sink
switched on (`run.tensorboard`, `run.wandb_project`) needs its package importable here
(train/metrics.py), checked on every rank, so no rank is left waiting for one that stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from api.client import ApiError
from data.audio import DurationPolicy
from data.dataset import ManifestDataset
from data.manifest import DataError
from model import load_pretrained, save_pretrained
from model.checkpoint import CheckpointError
from model.encoder_cache import EncoderOutputCache, EncoderTrainableError
from model.errors import report_error
from model.lora import apply_lora, mark_trainable, merge_and_remove_lora
from model.tokenizer import load_tokenizer

from .checkpoints import load_trainable
from .config import ConfigError, TrainConfig, load_config
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed, seed_everything, shutdown
from .fsdp2 import full_trainable_state, is_sharded
from .loop import train
from .metrics import check_sink_packages
from .nonfinite import NonFiniteLoss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def build_model(config: TrainConfig, device: torch.device):
    """Load the checkpoint, add a fresh LoRA, freeze all but LoRA (and the projector)."""
    section = config.model
    if section.dtype not in DTYPES:
        raise ConfigError(f"[model] dtype: expected one of {sorted(DTYPES)}, got {section.dtype!r}")
    if not section.checkpoint:
        raise ConfigError("[model] checkpoint: not set; point it at a checkpoint directory")
    model = load_pretrained(section.checkpoint, dtype=DTYPES[section.dtype])
    if model.config.encoder is not None:
        model.config.encoder.mask_padding = section.mask_audio_padding
        model.encoder.gradient_checkpointing = section.gradient_checkpointing
    model.decoder.gradient_checkpointing = section.gradient_checkpointing
    apply_lora(model, rank=section.lora_rank, alpha=section.lora_alpha, dropout=section.lora_dropout)
    extra = ("projector.",) if section.train_projector and model.projector is not None else ()
    for name in mark_trainable(model, extra_prefixes=extra):
        # float32 master copies of what trains: bf16 would round most small AdamW updates away
        model.get_parameter(name).data = model.get_parameter(name).data.float()
    model = model.to(device)
    if section.encoder_cache and model.encoder is not None:  # the encoder is frozen in every stage
        model.encoder_cache = EncoderOutputCache(section.encoder_cache, model.encoder)
    return model


def build_dataset(config: TrainConfig, tokenizer, model, info: DistInfo, task: str, reserve_tokens: int = 0):
    data = config.data
    if not data.train:
        raise ConfigError("[data] train: no manifest given")
    return ManifestDataset.from_manifests(
        data.train, tokenizer, task=task, strict=data.strict,
        policy=DurationPolicy(data.max_audio_seconds, data.on_too_long),
        max_tokens=data.max_tokens, max_batch_size=data.batch_size,
        max_context=model.config.decoder.max_position_embeddings, reserve_tokens=reserve_tokens,
        seed=config.run.seed, rank=info.rank, world_size=info.world_size,
        feature_cache=data.feature_cache or None, device=info.device,
    )


def held_out_loss(stage, data, info: DistInfo):
    """evaluate(model, step) for the loop: the stage's loss per unit on held-out batches, over all ranks."""

    @torch.no_grad()
    def evaluate(model, step: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=info.device)  # loss sum, units
        for plan in data.epoch_plans(0):
            batch = stage.prepare(model, data.load(plan))
            loss_sum, _ = stage.loss(model, batch)
            totals += torch.tensor([float(loss_sum), stage.loss_units(batch)], dtype=torch.float64, device=info.device)
        all_reduce_sum(totals)
        model.train(was_training)
        return {"eval_loss": float(totals[0] / totals[1].clamp(min=1))}

    return evaluate


def export_merged(config: TrainConfig, model, out_dir: Path) -> Path:
    """Base + this stage's LoRA as one checkpoint (with the tokenizer) in out_dir/merged."""
    target = out_dir / "merged"
    merge_and_remove_lora(model)
    save_pretrained(model, target)
    source = Path(config.model.tokenizer or config.model.checkpoint)
    files = [source] if source.is_file() else [source / name for name in TOKENIZER_FILES]
    for file in files:
        if file.is_file():
            shutil.copy2(file, target / file.name)
    return target


def unsharded_model(config: TrainConfig, model, info: DistInfo):
    """The trained model with whole tensors, for export on rank 0 (None on the other ranks).

    `model` itself unless it is sharded (fsdp2). Then every rank takes part in gathering the
    trainable tensors, and rank 0 loads them into a copy built from model.checkpoint on the CPU
    (without the encoder cache): the frozen weights never change, so the copy equals the trained
    model, and the export takes no device memory."""
    if not any(is_sharded(p) for p in model.parameters()):
        return model if info.is_main else None
    trainable = full_trainable_state(model)
    if not info.is_main:
        return None
    copy = build_model(dataclasses.replace(config, model=dataclasses.replace(config.model, encoder_cache="")),
                       torch.device("cpu"))
    load_trainable(Path(config.run.out_dir), copy, trainable)
    return copy


def check_device(text: str) -> None:
    """run.device: "" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N" with N < the GPUs here."""
    allowed = '"" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"'
    try:
        device = torch.device(text) if text else None
    except RuntimeError:
        raise ConfigError(f"run.device = {text!r} is not a device; allowed: {allowed}") from None
    if device is None or device.type == "cpu":
        return
    if device.type != "cuda":
        raise ConfigError(f"run.device = {text!r}: not supported for training; allowed: {allowed}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (device.index or 0) >= count:
        raise ConfigError(f"run.device = {text!r}: this machine has {count} CUDA device(s); use "
                          f"{'cuda:0 .. cuda:' + str(count - 1) if count else 'run.device=cpu'} or leave it empty")


def check_out_dir(text: str) -> None:
    """run.out_dir: a directory this process can write (made if absent)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.out_dir = {text!r} is an existing file, not a directory; choose another run.out_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"run.out_dir = {text!r} cannot be written ({err.strerror or err}); choose a "
                          "writable directory") from None


def check_checkpoint(text: str) -> None:
    """model.checkpoint: set, and a directory (load_pretrained says what is wrong inside it)."""
    if not text:
        raise ConfigError("model.checkpoint is not set; point it at a checkpoint directory")
    if not Path(text).is_dir():
        relative = "" if Path(text).is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"model.checkpoint = {text!r}: no such directory{relative}; point it at a checkpoint "
                          "directory (config.json + *.safetensors), e.g. the previous stage's out_dir/merged")


def check_environment(config: TrainConfig) -> None:
    """What the config names on this machine, before anything is loaded (see the module docstring)."""
    check_device(config.run.device)
    check_out_dir(config.run.out_dir)
    check_checkpoint(config.model.checkpoint)
    check_sink_packages(config.run)


def parse_args(stage: str, argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog=f"python -m train.{stage}", description=f"{stage} stage")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def run_recipe(stage_name: str, make_stage, task: str, argv=None, reserve_tokens=lambda config: 0) -> int:
    """Parse, build, train, merge. `make_stage(config, model, tokenizer)` returns the Stage."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(stage_name, argv)
        check_environment(config)
        info = init_distributed(config.run.device)
        seed_everything(config.run.seed, info.rank)
        tokenizer = load_tokenizer(config.model.tokenizer or config.model.checkpoint)
        model = build_model(config, info.device)
        task_name = task(config) if callable(task) else task
        data = build_dataset(config, tokenizer, model, info, task_name, reserve_tokens(config))
        stage = make_stage(config, model, tokenizer)
        out_dir = Path(config.run.out_dir)
        evaluate = None
        if config.data.eval and config.run.eval_every > 0:
            held_out = build_dataset(dataclasses.replace(config, data=dataclasses.replace(
                config.data, train=config.data.eval)), tokenizer, model, info, task_name, reserve_tokens(config))
            evaluate = held_out_loss(stage, held_out, info)
        train(config, model, stage, data, info, evaluate=evaluate)
        if model.encoder_cache is not None:
            logging.getLogger(__name__).info("rank %d: %s", info.rank, model.encoder_cache.summary())
            model.encoder_cache.record_usage(f"{config.run.out_dir} rank {info.rank}")
        if data.skipped or data.rejected:
            logging.getLogger(__name__).warning("data: rejected %s, skipped on rank %d %s, refills %d",
                                                dict(data.rejected), info.rank, dict(data.skipped), data.refills)
        if config.run.merge_at_end:
            whole = unsharded_model(config, model, info)
            if info.is_main:
                print(f"merged checkpoint: {export_merged(config, whole, out_dir)}", flush=True)
        barrier()
        shutdown()
        return 0
    except (ConfigError, DataError, CheckpointError, EncoderTrainableError, NonFiniteLoss, ApiError,
            FileNotFoundError) as err:
        return report_error(f"train.{stage_name}", err)
