"""One training loop for every stage (SFT, on-policy KD, DPO), read top to bottom.

A stage (train/stages.py) supplies three things:
  prepare(model, batch) -> batch      experience that needs no gradient (KD: the student's
                                      samples and the teacher's log-probs), run in eval mode
  loss_units(batch) -> int            how many terms the loss sums (response tokens; DPO pairs)
  loss(model, batch) -> (sum, metrics) the summed loss over those units, differentiable

Per optimizer step, on each rank:
  1. take `grad_accum` micro-batches and prepare them;
  2. count their loss units and all-reduce the count: N = units of the *global* batch;
  3. for each micro-batch: backward of loss_sum * world_size / N, inside DDP's `no_sync` for
     all but the last, so gradients are all-reduced (averaged over ranks) once per step. The
     world_size factor cancels DDP's averaging: the result is the gradient of
     (sum over every rank and micro-batch) / N, exactly what one process with the whole global
     batch computes (tests/train/test_loop.py checks this to 1e-6);
  4. clip the global gradient norm, AdamW step, warmup + cosine learning rate.

How ranks share the model (`run.strategy`, `wrap_for_training`):
  "ddp"    DDP wraps a small module whose forward *is* the stage's loss, so every model call of a
           stage (logits, hidden states for the fused KD loss, the DPO reference with adapters
           disabled) runs inside DDP's forward, and only the trainable parameters (LoRA,
           projector) are synchronised;
  "fsdp2"  the model itself is sharded (train/fsdp2.py: every weight split over the ranks, a
           block gathered while it runs, gradients reduce-scattered, `gradient_sync` in place of
           `no_sync`), so the optimizer is built after it, and checkpoints are gathered to rank 0
           in ddp's format (`FSDP2Checkpointer`). The calls outside the training forward, which
           ranks make unevenly (a stage's `prepare`, the held-out evaluation), run on the whole
           model gathered once (`whole_model`). Same global batch, same numbers: the two give
           the same losses to 1e-6 (tests/train/test_fsdp2.py).
On one process both are the plain model.

Batches are loaded one step ahead on a background thread (`Prefetcher`, through `StepBatches`).

Seams for what comes next: `wrap_for_training` returns the module the loop calls (DDP or
FSDP2), `Checkpointer` resumes and saves (a sharded on-disk format would replace
`FSDP2Checkpointer`), and KD's sampling engine is injected into its stage
(`KDStage(sampler=...)`, rollout.sampler.Sampler: a vLLM engine for KD rollouts plugs in
there). The run's length is computed (`total_steps`), never written back into the config, and
`train()` reads top to bottom as the four steps above.

Checkpoints, their manifests, the choice of the step to resume from and the checkpointers:
train/checkpoints.py. A NaN or inf loss: train/nonfinite.py.
Metrics (out_dir/metrics.jsonl, and TensorBoard / Weights & Biases when switched on): train/metrics.py.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.manifest import DataError, Issue
from . import fsdp2
from .checkpoints import Checkpointer, FSDP2Checkpointer, Position
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, is_distributed
from .metrics import MetricsLog, check_sink_packages, open_sinks
from .nonfinite import report_nonfinite

logger = logging.getLogger(__name__)


class Stage(Protocol):
    """Optionally also `prepare_uses_model` (a class attribute, True when absent): whether `prepare`
    calls the model. Under fsdp2 the loop gathers the whole model for it (`whole_model`), which
    SFT's prepare, a no-op, does not need."""

    name: str

    def prepare(self, model: nn.Module, batch: Any) -> Any: ...

    def loss_units(self, batch: Any) -> int: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """(loss summed over the batch's units, metrics). A metric is a sum over the same units
        (logged divided by the global units) or a (sum, count) pair with its own denominator."""


class BatchSource(Protocol):
    """Deterministic batches: the same (epoch, rank) always gives the same plans in the same order."""

    def epoch_plans(self, epoch: int) -> list[Any]: ...

    def load(self, plan: Any) -> Any: ...

    def sample_ids(self, batch: Any) -> list[str]: ...


class Prefetcher:
    """Loads the batch after the one in hand on a background thread (decoding 30-minute clips
    takes seconds), so it overlaps the step. Loading stays deterministic: the same plan gives
    the same batch whichever thread loads it; a failure surfaces when that batch is taken."""

    def __init__(self, data: BatchSource):
        self.data = data
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.pending: tuple[tuple[int, int], Future] | None = None

    def load(self, epoch: int, index: int, plans: list[Any]) -> Any:
        if self.pending is not None and self.pending[0] == (epoch, index):
            batch = self.pending[1].result()
        else:
            batch = self.data.load(plans[index])
        self.pending = None
        if index + 1 < len(plans):
            self.pending = ((epoch, index + 1), self.executor.submit(self.data.load, plans[index + 1]))
        return batch

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class StageForward(nn.Module):
    """forward(batch) = the stage's loss on the model: the unit DDP wraps."""

    def __init__(self, model: nn.Module, stage: Stage):
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, batch):
        return self.stage.loss(self.model, batch)


class ShardedStageForward(StageForward):
    """The stage's loss on an FSDP2-sharded model (the model is the FSDP2 root, this module is
    plain); `no_sync` as DDP's, so `accumulate_gradients` treats both alike."""

    def no_sync(self):
        return fsdp2.gradient_sync(self.model, False)


def learning_rate(step: int, optim, max_steps: int | None = None) -> float:
    """Linear warmup to optim.lr over warmup_steps, then cosine down to lr * min_lr_ratio at
    `max_steps` (default optim.max_steps; the loop passes `total_steps`)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, (optim.max_steps if max_steps is None else max_steps) - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: apply LoRA / mark the projector trainable before training")
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay)


# ---------------------------------------------------------------------------------------------
# the loop


def autocast_context(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def whole_model(wrapped: nn.Module, needed: bool = True):
    """Context for model calls outside the training forward (a stage's `prepare`, evaluation): under
    fsdp2 every weight is gathered for the block (train/fsdp2.py `gathered`: ranks may then call
    the model unevenly, as KD's rollouts do); nothing to do under ddp, on one process, or when
    not `needed` (a prepare that does not call the model)."""
    if needed and isinstance(wrapped, ShardedStageForward):
        return fsdp2.gathered(wrapped.model)
    return contextlib.nullcontext()


def wrap_for_training(model: nn.Module, stage: Stage, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """The module the loop calls, forward(batch) = the stage's loss (`StageForward`), by
    `run.strategy` across ranks: "ddp" wraps it in DDP (only the trainable parameters are
    synchronised); "fsdp2" shards `model` in place (train/fsdp2.py `shard_model`: its parameters
    become new, sharded ones, so build the optimizer after this). Plain on one process."""
    if strategy not in ("ddp", "fsdp2"):
        raise ValueError(f'run.strategy: expected "ddp" or "fsdp2", got {strategy!r}')
    if not is_distributed():
        return StageForward(model, stage)
    if strategy == "fsdp2":
        return ShardedStageForward(fsdp2.shard_model(model, info.device, info.world_size), stage)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(StageForward(model, stage), device_ids=device_ids, broadcast_buffers=False)


def total_steps(optim, data: BatchSource) -> int:
    """optim.max_steps, or with optim.epochs > 0 that many passes over the data (every rank has
    the same number of batches per epoch)."""
    if optim.epochs > 0:
        return max(1, math.ceil(len(data.epoch_plans(0)) * optim.epochs / optim.grad_accum))
    return optim.max_steps


class StepBatches:
    """The run's batches in training order across epochs, each loaded one ahead (`Prefetcher`);
    `take(position)` returns the batch at the position and moves it on."""

    def __init__(self, data: BatchSource, position: Position, config: TrainConfig, info: DistInfo):
        self.data, self.config, self.info = data, config, info
        self.plans = data.epoch_plans(position.epoch)
        self.loader = Prefetcher(data)

    def take(self, position: Position) -> Any:
        if position.batch_index >= len(self.plans):
            position.epoch, position.batch_index = position.epoch + 1, 0
            self.plans = self.data.epoch_plans(position.epoch)
            if not self.plans:
                raise DataError(Issue(", ".join(map(str, self.config.data.train)) or "[data] train", None, None,
                                      f"no batch for rank {self.info.rank}: no usable rows (see the warnings above) "
                                      f"or fewer than one batch; add data or lower data.batch_size"))
        batch = self.loader.load(position.epoch, position.batch_index, self.plans)
        position.batch_index += 1
        return batch

    def close(self) -> None:
        self.loader.close()


def train(
    config: TrainConfig,
    model: nn.Module,
    stage: Stage,
    data: BatchSource,
    info: DistInfo,
    *,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    stop_after: int | None = None,
) -> Position:
    """Run until `total_steps` optimizer steps (or `stop_after` steps in this call); the steps of
    the module docstring."""
    optim, run = config.optim, config.run
    out_dir = Path(run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:  # a switched-on sink without its package stops the run here, before anything loads
        check_sink_packages(run)
    model.to(info.device)
    wrapped = wrap_for_training(model, stage, info, run.strategy)  # before the optimizer: fsdp2 replaces parameters
    optimizer = build_optimizer(model, optim)
    sharded = isinstance(wrapped, ShardedStageForward)
    checkpointer = (FSDP2Checkpointer if sharded else Checkpointer)(out_dir, config, info)
    position = checkpointer.resume(model, optimizer)
    log = MetricsLog(out_dir, info, position.step, open_sinks(config, out_dir, info, position.step))
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_steps = total_steps(optim, data)
    batches = StepBatches(data, position, config, info)
    steps_this_call = 0

    with log, contextlib.closing(batches):  # closed on an error too: TensorBoard flushes, W&B marks it failed
        while position.step < max_steps and (stop_after is None or steps_this_call < stop_after):
            start = time.perf_counter()
            # 1. the micro-batches of this step, with their experience
            with whole_model(wrapped, getattr(stage, "prepare_uses_model", True)):
                micro_batches = [prepare(stage, model, batches.take(position), info) for _ in range(optim.grad_accum)]
            # 2. loss units of the global batch
            local_units = sum(stage.loss_units(b) for b in micro_batches)
            global_units = int(all_reduce_sum(torch.tensor([local_units], dtype=torch.float64,
                                                           device=info.device)).item())
            if global_units == 0:
                raise ValueError(f"step {position.step + 1}: the global batch has no loss tokens "
                                 "(all prompts, no response?)")
            # 3. forward / backward, gradients synchronised on the last micro-batch only
            sums, counts = accumulate_gradients(
                wrapped, model, micro_batches, info.world_size / global_units, info,
                on_nonfinite=lambda batch, own: report_nonfinite(out_dir, position.step + 1, info,
                                                                 data.sample_ids(batch), own, model))
            # 4. clip, step, schedule
            lr = learning_rate(position.step, optim, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable,
                                                       optim.grad_clip if optim.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            position.step += 1
            steps_this_call += 1

            elapsed = time.perf_counter() - start
            record = {"step": position.step, "lr": lr, "grad_norm": float(fsdp2.full_tensor(grad_norm)),
                      "units": global_units, "units_per_s": global_units / elapsed,
                      **reduce_metrics(sums, counts, global_units, info)}
            if position.step % run.log_every == 0 or position.step == max_steps:
                log.write(record, max_steps)
            if evaluate is not None and run.eval_every and position.step % run.eval_every == 0:
                with whole_model(wrapped):
                    log.write({"step": position.step, **evaluate(model, position.step)}, max_steps)
            if position.step >= max_steps or (run.save_every and position.step % run.save_every == 0):
                checkpointer.save(model, optimizer, position)
    return position


def prepare(stage: Stage, model: nn.Module, batch: Any, info: DistInfo) -> Any:
    """The stage's experience for one batch (KD: samples and teacher scores): eval mode, no grad."""
    model.eval()
    with torch.no_grad(), autocast_context(info.device):
        return stage.prepare(model, batch)


def accumulate_gradients(wrapped: nn.Module, model: nn.Module, micro_batches: list[Any], scale: float,
                         info: DistInfo, on_nonfinite: Callable[[Any, bool], None]
                         ) -> tuple[dict[str, float], dict[str, float]]:
    """Backward of loss_sum * scale for every micro-batch, DDP's gradient all-reduce on the last one
    only. Every rank learns whether any rank's loss is bad, so all stop together (none is left
    waiting in the all-reduce): `on_nonfinite(batch, own)` raises. Returns this rank's metric
    sums and the counts of the metrics with their own denominator (not loss units)."""
    model.train()
    sums: dict[str, float] = {"loss": 0.0}
    counts: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not is_distributed() else wrapped.no_sync()
        with sync:
            with autocast_context(info.device):
                loss_sum, metrics = wrapped(batch)
            bad = all_reduce_sum((~torch.isfinite(loss_sum.detach())).to(torch.float32).reshape(1))
            if bad.item():
                on_nonfinite(batch, not torch.isfinite(loss_sum.detach()))
            (loss_sum.float() * scale).backward()
        sums["loss"] += float(loss_sum.detach())
        for key, value in metrics.items():
            total, count = value if isinstance(value, tuple) else (value, None)
            sums[key] = sums.get(key, 0.0) + float(total)
            if count is not None:
                counts[key] = counts.get(key, 0.0) + float(count)
    return sums, counts


def reduce_metrics(sums: dict[str, float], counts: dict[str, float], global_units: int,
                   info: DistInfo) -> dict[str, float]:
    """Every rank's metric sums over the global batch, each divided by its own count or by the
    global loss units."""
    keys, counted = sorted(sums), sorted(counts)
    totals = all_reduce_sum(torch.tensor([sums[k] for k in keys] + [counts[k] for k in counted],
                                         dtype=torch.float64, device=info.device)).tolist()
    denominators = {k: totals[len(keys) + i] for i, k in enumerate(counted)}
    return {k: totals[i] / max(denominators.get(k, global_units), 1e-12) for i, k in enumerate(keys)}
