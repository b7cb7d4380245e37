"""Where a training run's metrics go: out_dir/metrics.jsonl always; TensorBoard and Weights & Biases
when the config asks for them.

The loop hands every record it logs (a dict with "step") to `MetricsLog.write`. Rank 0 appends it
to out_dir/metrics.jsonl (the run's own record) and passes its numeric values (ints and floats;
not bools, not strings) to each sink, under the same keys and step. The other ranks write nothing.

    run.tensorboard = true       event files in out_dir/tensorboard (torch.utils.tensorboard)
    run.wandb_project = "NAME"   a W&B run in that project (run.wandb_entity: its user or team),
                                 with the whole config, its files under out_dir/wandb

Why run.* fields and not a section of their own: like run.out_dir and run.log_every they say
where a run's output goes, not how it trains, and three keys do not need a table that every
config and the loader would have to learn.

Both are off by default, and then neither package is imported: a machine without them trains as
before. Switched on without the package, the run stops before it loads anything with one
ConfigError that names the field and the pip command (`check_sink_packages`: the recipe calls it
on every rank before the model loads, `train()` on rank 0 again for callers that skip the recipe).

Resuming keeps the sinks in step with metrics.jsonl, which drops the lines after the checkpoint
it resumes from: TensorBoard purges the events after that step (SummaryWriter's purge_step), and
W&B continues the same run, whose id is kept in out_dir/wandb_run_id (a run that starts from step
0 gets a new id, so a run that crashed before its first checkpoint does not collide with its
retry). W&B's steps only increase, so it keeps the first value of a step logged twice, the step
between the checkpoint and the crash; a resume recomputes those steps exactly (tests/train/
test_loop.py), so that value is the same. The sinks are closed when train() returns, and on an
error too (W&B marks the run failed).
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import secrets
import sys
from pathlib import Path
from typing import Any, Protocol, Sequence

from model.safeio import atomic_write_text

from .config import ConfigError, RunSection, TrainConfig
from .distributed import DistInfo

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


class Sink(Protocol):
    """Somewhere besides metrics.jsonl that scalars go (rank 0 only)."""

    def write(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


def _step_of(line: str) -> float:
    """The step of a metrics line; infinity for a line a crash left half-written."""
    try:
        return json.loads(line).get("step", math.inf)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def numeric_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers (not its step, not bools or strings) as floats: what a sink can plot."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)}


class MetricsLog:
    """One JSON line per step (rank 0) in out_dir/metrics.jsonl, and a progress line on a terminal;
    the numeric values also go to `sinks`. A context manager: leaving it closes the sinks."""

    def __init__(self, out_dir: Path, info: DistInfo, resume_step: int, sinks: Sequence[Sink] = ()):
        self.enabled = info.is_main
        self.path = out_dir / "metrics.jsonl"
        if self.enabled and self.path.exists():  # drop lines after the checkpoint we resume from, and torn ones
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.terminal = sys.stderr.isatty()
        self.sinks = list(sinks) if self.enabled else []

    def write(self, record: dict[str, Any], max_steps: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.terminal:
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
            print(f"\r[{record['step']}/{max_steps}] {shown}", end="", file=sys.stderr, flush=True)
        else:
            print(json.dumps(record), flush=True)
        scalars = numeric_scalars(record)
        for sink in self.sinks:
            sink.write(record["step"], scalars)

    def close(self, failed: bool = False) -> None:
        """Close every sink once; a sink that fails to close is a warning, never the run's error."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close(failed)
            except Exception as err:  # noqa: BLE001 - the run's own outcome matters more than a logger's
                logger.warning("closing the %s metrics sink failed: %s", type(sink).__name__, err)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.close(failed=error_type is not None)


# ---------------------------------------------------------------------------------------------
# the sinks


class TensorBoardSink:
    """Event files in out_dir/tensorboard, one scalar per metrics.jsonl key. Events after the
    checkpoint a run resumes from are purged, as metrics.jsonl drops its lines."""

    def __init__(self, out_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self, failed: bool) -> None:
        self.writer.close()


def wandb_run_id(out_dir: Path, resume_step: int) -> str:
    """The W&B run id kept in out_dir: the stored one when the run resumes a checkpoint, else a new one."""
    path = out_dir / WANDB_ID_FILE
    if resume_step > 0 and path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    run_id = secrets.token_hex(8)
    atomic_write_text(path, run_id + "\n")
    return run_id


class WandbSink:
    """A W&B run in run.wandb_project with the whole config; a resumed run continues the same one."""

    def __init__(self, config: TrainConfig, out_dir: Path, resume_step: int):
        import wandb

        run = config.run
        try:
            self.run = wandb.init(project=run.wandb_project, entity=run.wandb_entity or None, dir=str(out_dir),
                                  config=config.to_dict(), resume="allow", id=wandb_run_id(out_dir, resume_step),
                                  name=out_dir.resolve().name or None)
        except Exception as err:  # noqa: BLE001 - not logged in, no network, no such entity: say which field
            raise ConfigError(f"run.wandb_project = {run.wandb_project!r}: wandb.init failed ({err}); log in with "
                              "`wandb login` (or set WANDB_API_KEY), set WANDB_MODE=offline to log without a "
                              "network, or set run.wandb_project = \"\"") from None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ---------------------------------------------------------------------------------------------
# switching them on


def _require(modules: tuple[str, ...], setting: str, package: str, off: str) -> None:
    """Import `modules`, or raise one ConfigError naming the setting and the pip command."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - absent or broken, the answer is the same
            raise ConfigError(f"{setting} needs the {package} package, which cannot be imported here ({err}); "
                              f"install it with `pip install {package}` (or `pip install -e .[{package}]`), "
                              f"or set {off}") from None


def check_sink_packages(run: RunSection) -> None:
    """A ConfigError when a sink is switched on and its package is missing; imports nothing when off."""
    if run.tensorboard:
        _require(("tensorboard", "torch.utils.tensorboard"), "run.tensorboard = true", "tensorboard",
                 "run.tensorboard = false")
    if run.wandb_project:
        _require(("wandb",), f"run.wandb_project = {run.wandb_project!r}", "wandb", 'run.wandb_project = ""')


def open_sinks(config: TrainConfig, out_dir: Path, info: DistInfo, resume_step: int) -> list[Sink]:
    """The sinks the config switches on, opened on rank 0 (none on the other ranks)."""
    if not info.is_main:
        return []
    check_sink_packages(config.run)
    sinks: list[Sink] = []
    try:
        if config.run.tensorboard:
            sinks.append(TensorBoardSink(out_dir, resume_step))
        if config.run.wandb_project:
            sinks.append(WandbSink(config, out_dir, resume_step))
    except BaseException:
        for sink in sinks:
            sink.close(failed=True)
        raise
    return sinks
