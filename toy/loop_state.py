"""What the toy pre-training loops share: their schedule, and a resumable state file.

Every loop of toy/pretrain.py and toy/encoder_ctc.py is plain AdamW with a linear warm-up over
the first 5% of steps, then a cosine decay to zero at `steps`. Its state file (`state.pt`:
model, optimizer, schedule, the batch sampler's `random.Random`, the step and whatever the
loop adds) is written atomically (model/safeio.py: a temporary file, then renamed) and read
back with `torch.load(weights_only=True)`, so a run killed at any moment resumes from its last
save.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from torch import nn

from model.safeio import atomic_write


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over max(1, steps // 20) steps, then cosine to 0 at `steps`."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def save_state(state_file: Path, model: nn.Module, optimizer, schedule, rng: random.Random | None, step: int,
               **extra) -> None:
    """Atomically write the loop's state at `step` (plus `extra` numbers) to `state_file`."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "rng": None if rng is None else _list_state(rng.getstate()), "step": step, **extra}
    atomic_write(state_file, lambda tmp: torch.save(state, tmp))


def load_state(state_file: Path, model: nn.Module, optimizer, schedule, rng: random.Random | None) -> dict | None:
    """Restore model, optimizer, schedule and `rng` from `state_file` when it exists; returns the
    whole state (its "step" and extras) or None for a fresh start."""
    if not state_file.exists():
        return None
    state = torch.load(state_file, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if rng is not None and state.get("rng") is not None:
        rng.setstate(_tuple_state(state["rng"]))
    return state


def _list_state(state):
    """random.Random's state as nested lists (weights_only torch.load reads lists, not tuples)."""
    return [state[0], list(state[1]), state[2]]


def _tuple_state(state):
    return state[0], tuple(state[1]), state[2]
