"""TensorBoard and W&B sinks (train/metrics.py): the same numbers and steps as metrics.jsonl, kept in
step across a resume; switched on without the package, one ConfigError before any step; switched
off, neither package is needed."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from data.batching import ExampleSource
from tests.train.worker import examples, tiny_model
from train import sft
from train.config import ConfigError, load_config
from train.distributed import DistInfo
from train.loop import train
from train.metrics import WANDB_ID_FILE, wandb_run_id
from tests.train.counting_stage import CountingSFT
from train.stages import SFTStage

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "toy" / "smoke_sft.toml"


def run(out_dir: Path, *overrides: str, stop_after=None, evaluate=None, stage=None) -> SFTStage:
    """The tiny 4-step SFT run, saving every 2 steps, so stop_after=3 resumes from step 2."""
    config = load_config(None, [f"run.out_dir={out_dir}", "optim.max_steps=4", "run.save_every=2", "optim.lr=0.01",
                                "data.batch_size=2", "run.keep_last=10", *overrides])
    stage = stage or CountingSFT()
    train(config, tiny_model(dropout=0.0), stage, ExampleSource(examples(), 2, seed=0), INFO,
          stop_after=stop_after, evaluate=evaluate)
    return stage


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def numbers_of(record: dict) -> dict[str, float]:
    """What a sink must receive for a metrics.jsonl record: its ints and floats but the step."""
    return {k: float(v) for k, v in record.items() if k != "step" and type(v) in (int, float)}


# ---------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tmp_path / "run"
    run(out_dir, "run.tensorboard=true", stop_after=3)  # logs steps 1-3, saves step 2
    run(out_dir, "run.tensorboard=true")  # resumes from step 2: step 3 again, then 4
    lines = records(out_dir)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]

    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(numbers_of(lines[0])) >= {"loss", "lr", "grad_norm", "units"}
    for key in ("loss", "lr", "grad_norm", "units"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3, 4], key  # the first run's step 3 is purged, not doubled
        assert [s.value for s in scalars] == [float(np.float32(r[key])) for r in lines], key
    assert len({r["loss"] for r in lines}) == 4  # the values compared above are four different losses


# ---------------------------------------------------------------------------------------------
# Weights & Biases, through a stand-in module that records what the run hands it


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finishes = [], [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return FakeRun(self)


class FakeRun:
    def __init__(self, wandb: FakeWandb):
        self.wandb = wandb

    def log(self, data, step=None):
        self.wandb.logs.append((step, dict(data)))

    def finish(self, exit_code=None):
        self.wandb.finishes.append(exit_code)


def install_fake_wandb(monkeypatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def held_out(model, step):
    """An evaluate() whose record mixes numbers with values a sink must skip."""
    return {"eval_loss": 0.5 + step, "eval_note": "held out", "eval_flag": True}


def test_wandb_gets_the_metrics_jsonl_numbers_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    wandb_keys = ["run.wandb_project=speechsum-test", "run.wandb_entity=team", "run.eval_every=2"]
    first = install_fake_wandb(monkeypatch)
    run(out_dir, *wandb_keys, stop_after=3, evaluate=held_out)
    run_id = (out_dir / WANDB_ID_FILE).read_text().strip()
    config = load_config(None, [f"run.out_dir={out_dir}", "optim.max_steps=4", "run.save_every=2", "optim.lr=0.01",
                                "data.batch_size=2", "run.keep_last=10", *wandb_keys])
    assert first.inits == [dict(project="speechsum-test", entity="team", dir=str(out_dir), config=config.to_dict(),
                                resume="allow", id=run_id, name="run")]
    assert first.logs == [(r["step"], numbers_of(r)) for r in records(out_dir)]
    assert [step for step, _ in first.logs] == [1, 2, 2, 3] and first.logs[2] == (2, {"eval_loss": 2.5})
    assert first.finishes == [0]

    resumed = install_fake_wandb(monkeypatch)
    run(out_dir, *wandb_keys, evaluate=held_out)  # from step 2
    lines = records(out_dir)
    assert [r["step"] for r in lines] == [1, 2, 2, 3, 4, 4]
    assert resumed.inits[0]["id"] == run_id and resumed.inits[0]["resume"] == "allow"
    assert resumed.logs == [(r["step"], numbers_of(r)) for r in lines[3:]]
    assert resumed.logs[0][1]["loss"] == first.logs[3][1]["loss"]  # step 3 recomputed exactly
    assert resumed.finishes == [0]


def test_a_run_from_step_0_gets_a_new_wandb_id_and_a_resume_keeps_the_stored_one(tmp_path):
    first = wandb_run_id(tmp_path, resume_step=0)
    assert (tmp_path / WANDB_ID_FILE).read_text() == first + "\n"
    assert wandb_run_id(tmp_path, resume_step=4) == first
    fresh = wandb_run_id(tmp_path, resume_step=0)  # a retry of a run that crashed before its first checkpoint
    assert fresh != first and wandb_run_id(tmp_path, resume_step=2) == fresh


def test_a_failing_run_still_finishes_its_wandb_run_as_failed(tmp_path, monkeypatch):
    class FailsAtStep2(SFTStage):
        calls = 0

        def loss(self, model, batch):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return super().loss(model, batch)

    fake = install_fake_wandb(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"):
        run(tmp_path, "run.wandb_project=p", stage=FailsAtStep2())
    assert [step for step, _ in fake.logs] == [1] and fake.finishes == [1]


# ---------------------------------------------------------------------------------------------
# switched on without the package; switched off without either


@pytest.mark.parametrize("module, override, says", [
    ("tensorboard", "run.tensorboard=true",
     r"run.tensorboard = true needs the tensorboard package, which cannot be imported here \(.*\); install it with "
     r"`pip install tensorboard` \(or `pip install -e .\[tensorboard\]`\), or set run.tensorboard = false"),
    ("wandb", "run.wandb_project=p",
     r"run.wandb_project = 'p' needs the wandb package, which cannot be imported here \(.*\); install it with "
     r"`pip install wandb` \(or `pip install -e .\[wandb\]`\), or set run.wandb_project = \"\""),
])
def test_a_sink_without_its_package_stops_before_any_step(tmp_path, monkeypatch, module, override, says):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails as if it were not installed
    stage = CountingSFT()
    with pytest.raises(ConfigError, match=says):
        run(tmp_path, override, stage=stage)
    assert stage.calls == 0 and not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "step_0000002").exists()


def test_the_recipe_reports_a_missing_package_in_one_line_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.delenv("SPEECHSUM_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    status = sft.main(["--config", str(SMOKE), f"model.checkpoint={tmp_path}", f"run.out_dir={tmp_path / 'run'}",
                       "run.wandb_project=p"])  # an empty checkpoint directory: loading it would fail differently
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.startswith("train.sft: run.wandb_project = 'p' needs the wandb package") and "pip install wandb" in err


def test_switched_off_neither_package_is_needed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    run(tmp_path)
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / WANDB_ID_FILE).exists()


@pytest.mark.parametrize("overrides, says", [
    (["run.wandb_project=a/b"], r"run.wandb_project = \"a/b\" is not allowed; allowed: \"\" or a W&B name"),
    (["run.wandb_project=" + "p" * 129], r"run.wandb_project = \"p{129}\" is not allowed"),
    (["run.wandb_entity=team"], r"run.wandb_entity is set but run.wandb_project is empty"),
])
def test_wandb_names_are_checked_when_the_config_loads(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, overrides)
    assert load_config(None, ["run.wandb_project=speechsum kd", "run.wandb_entity=team"]).run.wandb_entity == "team"
