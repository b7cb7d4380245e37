"""Training checkpoints: save a step, verify it, choose the step to resume from, restore it.

Checkpoints (atomic: written under a temporary name, then renamed) hold the trainable weights
(safetensors), the optimizer state (loaded with weights_only=True), the step, the data
position, every rank's RNG state and the run's config (as given); `latest` names the newest. A run
whose out_dir has `latest` resumes from it and continues with the same losses. Under
`run.strategy = "fsdp2"` the same files are written from state gathered to rank 0 and read back
by every rank into its shards (train/fsdp2.py), so a step saved under one strategy resumes under
the other.

Damaged checkpoints. Each step directory also holds `manifest.json` (size and SHA-256 of every
other file), written last, before the directory gets its final name and `latest` names it.
Resuming checks the manifest and reads the whole step into memory before the model changes. A
damaged step (a file missing, truncated or changed, a torn manifest, a file that does not
parse) is skipped with a warning naming it and what is wrong, and the run resumes from the
newest intact older step (the `keep_last` newest are kept); with none left it refuses with a
CheckpointError (exit status 2). A damaged step stays on disk for inspection until the run saves
that step again. A step without a manifest (saved before manifests existed, or whose manifest was
deleted) cannot be verified: it is used, with a warning, only when no verified step is left, and
only if it reads whole. `latest` is written atomically by the loop alone, so an empty one, one
that names anything but a `step_N` directory of out_dir (`/etc`, `../x`) or a step that is gone
is a CheckpointError asking to fix or delete it, never a silent fallback. Every rank checks the
shared out_dir itself; the ranks then confirm they chose the same step.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from model.checkpoint import CheckpointError
from model.safeio import atomic_save_safetensors, atomic_write_bytes, atomic_write_text

from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, barrier, rng_state, set_rng_state
from . import fsdp2
from .fsdp2 import copy_into

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
NO_MANIFEST = f"no {MANIFEST}"
STEP_DIR = re.compile(r"step_(\d+)")


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, trainable: dict[str, torch.Tensor] | None, optimizer_state: dict | None,
                    position: Position, config: TrainConfig, info: DistInfo, keep_last: int) -> Path:
    """Write out_dir/step_XXXXXXX atomically (every rank adds its RNG state), its manifest last,
    then update `latest`. `trainable` (whole tensors by name) and `optimizer_state` (as
    optimizer.state_dict() gives it) are read on rank 0 only; the other ranks may pass None."""
    name = f"step_{position.step:07d}"
    final, tmp = out_dir / name, out_dir / f".tmp-{name}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if not tmp.is_dir():
        raise RuntimeError(f"rank {info.rank}: {tmp} (made by rank 0) is not visible here; run.out_dir must be "
                           "on a file system that every node shares")
    atomic_write_text(tmp / f"rng_rank{info.rank}.json", json.dumps(rng_state()))
    barrier()
    if info.is_main:
        atomic_save_safetensors(trainable, tmp / "trainable.safetensors")
        buffer = io.BytesIO()
        torch.save(optimizer_state, buffer)
        atomic_write_bytes(tmp / "optimizer.pt", buffer.getvalue())
        atomic_write_text(tmp / "position.json", json.dumps(position.__dict__))
        config.save(tmp / "config.json")
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(out_dir / "latest", name)
        old = sorted(p for p in out_dir.glob("step_*") if p.is_dir())[:-keep_last] if keep_last > 0 else []
        for stale in old:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(directory: Path) -> None:
    """directory/manifest.json: size and SHA-256 of every other file of the step."""
    files = {p.name: file_record(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(directory / MANIFEST, json.dumps({"files": files}, indent=1))


def manifest_problem(directory: Path) -> str | None:
    """What is wrong with a step against its manifest, in words; None if every file matches.
    A step without a manifest gives NO_MANIFEST."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return NO_MANIFEST
    try:
        files = json.loads(manifest.read_bytes())["files"]
        records = [(str(name), int(r["bytes"]), str(r["sha256"])) for name, r in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is torn or not a manifest"
    for name, size, sha256 in records:
        if Path(name).name != name or name in ("", ".", ".."):
            return f"{MANIFEST} lists {name!r}, which is not a file name"
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {size}"
        if file_record(path)["sha256"] != sha256:
            return f"{name}'s SHA-256 differs from its manifest's"
    return None


@dataclass
class SavedStep:
    """A step read whole into memory, so a damaged file is found before the model changes."""

    directory: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    position: Position


class DamagedStep(Exception):
    """A step file that cannot be read; the message says which and why."""


def read_step(directory: Path, info: DistInfo) -> SavedStep:
    rng_file = directory / f"rng_rank{info.rank}.json"
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file}: missing; resume with the same number of processes as the run that "
                              f"saved {directory.name} (this one has {info.world_size})")
    name = "trainable.safetensors"
    try:  # safetensors, torch.load and json raise several types for a damaged file
        trainable = load_file(str(directory / name))
        name = "optimizer.pt"
        optimizer = torch.load(directory / name, weights_only=True, map_location="cpu")
        name = rng_file.name
        rng = json.loads(rng_file.read_bytes())
        name = "position.json"
        position = Position(**json.loads((directory / name).read_bytes()))
    except Exception as err:
        raise DamagedStep(f"{name} cannot be read ({type(err).__name__}: {err})") from None
    return SavedStep(directory, trainable, optimizer, rng, position)


def load_trainable(directory: Path, model, trainable: dict[str, torch.Tensor]) -> None:
    """Copy the trainable tensors (LoRA, projector) saved in `directory` into the model (each rank
    its own shard of a sharded one, train/fsdp2.py `copy_into`)."""
    expected = trainable_state(model)
    if set(trainable) != set(expected):
        raise CheckpointError(f"{directory}: trainable tensors {sorted(set(trainable) ^ set(expected))[:5]} differ "
                              "from the model's; the run's config (LoRA, projector) changed since it was saved")
    reshaped = [f"{k} {tuple(trainable[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if trainable[k].shape != v.shape]
    if reshaped:
        raise CheckpointError(f"{directory}: saved trainable tensors have other shapes than the model's "
                              f"({reshaped[:3]}); the LoRA rank changed since it was saved")
    for name, param in model.named_parameters():
        if name in trainable:
            copy_into(param, trainable[name])


def restore_step(saved: SavedStep, model, optimizer, load_optimizer_state=None) -> Position:
    """Restore trainable weights, optimizer, this rank's RNG and the position of a read step.
    `load_optimizer_state(state)` replaces optimizer.load_state_dict (fsdp2 keeps a shard of it)."""
    load_trainable(saved.directory, model, saved.trainable)
    (load_optimizer_state or optimizer.load_state_dict)(saved.optimizer)
    set_rng_state(saved.rng)
    return saved.position


def step_number(directory: Path) -> int:
    return int(STEP_DIR.fullmatch(directory.name).group(1))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The step directory `latest` names; None when there is no `latest` (a fresh run)."""
    pointer = out_dir / "latest"
    if not pointer.exists():
        return None
    text = pointer.read_bytes().decode("utf-8", "replace").strip() if pointer.is_file() else None
    fix = f"write the name of a step_* directory of {out_dir} into it, or delete it to start over"
    if not text:
        raise CheckpointError(f"{pointer}: {'empty' if text == '' else 'not a file'}; {fix}")
    if not STEP_DIR.fullmatch(text):
        raise CheckpointError(f"{pointer} names {text!r}, which is not a step directory of {out_dir} "
                              f"(step_NNNNNNN); {fix}")
    directory = out_dir / text
    if not directory.is_dir():
        raise CheckpointError(f"{pointer} names {text}, which does not exist; restore it, {fix}")
    return directory


def resume_candidates(out_dir: Path, latest: Path) -> list[Path]:
    """`latest`, then every older step directory, newest first."""
    older = [p for p in out_dir.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()
             and step_number(p) < step_number(latest)]
    return [latest, *sorted(older, key=step_number, reverse=True)]


def choose_resume_step(out_dir: Path, info: DistInfo) -> SavedStep | None:
    """The newest intact step from `latest` down (see the module docstring), read; None for a fresh run."""
    latest = latest_checkpoint(out_dir)
    if latest is None:
        return None
    problems: list[str] = []
    unverified: list[Path] = []
    for directory in resume_candidates(out_dir, latest):
        problem = manifest_problem(directory)
        if problem == NO_MANIFEST:
            unverified.append(directory)
            continue
        saved = _read_or_report(directory, problem, info, problems)
        if saved is not None:
            for skipped in unverified if info.is_main else ():
                logger.warning("checkpoint %s has %s (saved by an older version, or the manifest was deleted): it "
                               "cannot be verified; skipping it for %s, which can", skipped, NO_MANIFEST,
                               directory.name)
            return _resuming(saved, latest, info)
    for directory in unverified:
        if info.is_main:
            logger.warning("checkpoint %s has %s (saved by an older version, or the manifest was deleted): it "
                           "cannot be verified; using it since no verified step is left", directory, NO_MANIFEST)
        saved = _read_or_report(directory, None, info, problems)
        if saved is not None:
            return _resuming(saved, latest, info)
    raise CheckpointError(f"{out_dir}: no intact checkpoint to resume from ({'; '.join(problems)}); restore a "
                          "step from a backup, or delete `latest` (or choose another run.out_dir) to start over")


def _read_or_report(directory: Path, problem: str | None, info: DistInfo, problems: list[str]) -> SavedStep | None:
    if problem is None:
        try:
            return read_step(directory, info)
        except DamagedStep as err:
            problem = str(err)
    problems.append(f"{directory.name}: {problem}")
    if info.is_main:
        logger.warning("checkpoint %s is damaged: %s; trying the step before it", directory, problem)
    return None


def _resuming(saved: SavedStep, latest: Path, info: DistInfo) -> SavedStep:
    if saved.directory != latest and info.is_main:
        logger.warning("resuming from %s instead of %s (the newest intact step)", saved.directory.name, latest.name)
    return saved


def agree_on_resume(choice: SavedStep | CheckpointError | None, info: DistInfo) -> None:
    """Every rank must resume from the same step (each reads the shared out_dir on its own)."""
    steps = torch.zeros(info.world_size, dtype=torch.float64, device=info.device)
    steps[info.rank] = -1 if choice is None else -2 if isinstance(choice, CheckpointError) else choice.position.step
    chosen = all_reduce_sum(steps).tolist()
    if len(set(chosen)) > 1:
        raise CheckpointError(f"the ranks chose different steps to resume from ({chosen}; -1: none, -2: refused); "
                              "was a checkpoint being changed while they read it? Start the run again")


# ---------------------------------------------------------------------------------------------
# logging


class Checkpointer:
    """Where a run resumes from and where its steps go (train/checkpoints.py: atomic step
    folders, manifests, the newest intact step, every rank agreeing). The loop only asks it to
    resume and to save; `FSDP2Checkpointer` changes how the state is gathered and restored, not
    the format."""

    def __init__(self, out_dir: Path, config: TrainConfig, info: DistInfo):
        self.out_dir, self.config, self.info = out_dir, config, info

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Position:
        """The position of the newest usable saved step (weights and optimizer restored), or a fresh one."""
        try:
            choice = choose_resume_step(self.out_dir, self.info)
        except CheckpointError as err:
            choice = err
        agree_on_resume(choice, self.info)
        if isinstance(choice, CheckpointError):
            raise choice
        return Position() if choice is None else self.restore(choice, model, optimizer)

    def restore(self, saved: SavedStep, model: nn.Module, optimizer: torch.optim.Optimizer) -> Position:
        return restore_step(saved, model, optimizer)

    def state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
        """(trainable tensors, optimizer state) as rank 0 writes them; every rank holds the same under DDP."""
        return trainable_state(model), optimizer.state_dict()

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, position: Position) -> None:
        trainable, optimizer_state = self.state(model, optimizer)
        save_checkpoint(self.out_dir, trainable, optimizer_state, position, self.config, self.info,
                        self.config.run.keep_last)


class FSDP2Checkpointer(Checkpointer):
    """Checkpoints of a sharded model in the same format as ddp's: saving gathers the whole
    trainable tensors and optimizer state to rank 0 (every rank takes part); resuming, every rank
    reads the whole step and keeps its shards (train/fsdp2.py says why this format)."""

    def restore(self, saved: SavedStep, model: nn.Module, optimizer: torch.optim.Optimizer) -> Position:
        return restore_step(saved, model, optimizer,
                            load_optimizer_state=lambda state: fsdp2.load_optimizer_state(model, optimizer, state))

    def state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
        return fsdp2.full_trainable_state(model), fsdp2.full_optimizer_state(model, optimizer)
