"""A NaN or inf loss stops every rank with one message that says who is at fault: the weights
(a parameter already holds NaN or inf: an earlier step diverged) or the batch (its sample ids
are saved beside the checkpoints, to check those inputs)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from model.safeio import atomic_write_text

from . import fsdp2
from .distributed import DistInfo, all_reduce_sum


class NonFiniteLoss(RuntimeError):
    """A loss of NaN or inf: the run stops on every rank (see report_nonfinite)."""


def report_nonfinite(out_dir: Path, step: int, info: DistInfo, sample_ids: list[str], own: bool,
                     model: nn.Module | None = None) -> None:
    """Stop every rank (all of them call this); the rank whose loss is bad says who is at fault:
    its weights when any parameter already holds NaN or inf (an earlier step diverged), else its
    batch, whose sample ids it saves."""
    broken = [] if model is None else nonfinite_parameters(model, info)  # collective under fsdp2: before any raise
    if not own:
        raise NonFiniteLoss(f"step {step}: another rank's loss is NaN or inf (see its nonfinite_step{step}_rank*.json "
                            f"in {out_dir}); stopping rank {info.rank} too")
    if broken:
        raise NonFiniteLoss(f"step {step}, rank {info.rank}: the loss is NaN or inf because the model's weights are: "
                            f"{len(broken)} parameter tensor(s) hold NaN or inf (first {broken[0]}); the inputs are "
                            "not at fault. Resume from an earlier checkpoint with a lower optim.lr")
    path = out_dir / f"nonfinite_step{step}_rank{info.rank}.json"
    atomic_write_text(path, json.dumps({"step": step, "rank": info.rank, "sample_ids": sample_ids}))
    raise NonFiniteLoss(f"step {step}, rank {info.rank}: the loss is NaN or inf on samples {sample_ids[:8]}; "
                        f"their ids are saved in {path}. Check these inputs, or lower optim.lr")


def nonfinite_parameters(model: nn.Module, info: DistInfo) -> list[str]:
    """Names of the parameters holding NaN or inf. A sharded (fsdp2) parameter is checked shard by
    shard and the verdicts are summed over the ranks, so under fsdp2 every rank must call this."""
    names, flags, sharded = [], [], False
    for name, param in model.named_parameters():
        names.append(name)
        flags.append(float(not torch.isfinite(fsdp2.local_part(param.detach())).all()))
        sharded = sharded or fsdp2.is_sharded(param)
    if sharded and names:
        flags = all_reduce_sum(torch.tensor(flags, dtype=torch.float32, device=info.device)).tolist()
    return [name for name, flag in zip(names, flags) if flag]
