"""Resuming past damaged checkpoints: a step whose manifest does not match (or that has none)
is skipped with a warning and the run resumes from the newest intact step, with the losses of an
undamaged run resumed from that step; no intact step, or a bad `latest`, is a clear refusal."""
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.batching import ExampleSource
from model.checkpoint import CheckpointError
from tests.train.worker import examples, tiny_model
from train.config import load_config
from train.distributed import DistInfo
from train.loop import train
from tests.train.counting_stage import CountingSFT

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
ACCUM = 2
STEP_2, STEP_4 = "step_0000002", "step_0000004"


def run(out_dir: Path, stop_after: int | None = None) -> CountingSFT:
    """The tiny 6-step SFT run (LoRA dropout on, so the RNG state matters), saving every 2 steps, keeping all."""
    config = load_config(None, [f"run.out_dir={out_dir}", "optim.max_steps=6", "run.save_every=2",
                                f"optim.grad_accum={ACCUM}", "optim.lr=0.01", "optim.warmup_steps=1",
                                "data.batch_size=2", "run.keep_last=10"])
    stage = CountingSFT()
    train(config, tiny_model(dropout=0.2), stage, ExampleSource(examples(), 2, seed=0), INFO, stop_after=stop_after)
    return stage


def losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / (out_dir / "latest").read_text() / "trainable.safetensors"))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """The run stopped after 4 steps: step_0000002 and step_0000004 saved, `latest` = step 4."""
    out_dir = tmp_path_factory.mktemp("saved") / "run"
    run(out_dir, stop_after=4)
    assert (out_dir / "latest").read_text() == STEP_4
    return out_dir


@pytest.fixture(scope="module")
def from_step_2(four_steps, tmp_path_factory) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and final weights of the undamaged run resumed from step 2 (step 4 removed) to step 6."""
    out_dir = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(four_steps, out_dir)
    shutil.rmtree(out_dir / STEP_4)
    (out_dir / "latest").write_text(STEP_2)
    assert run(out_dir).calls == 4 * ACCUM
    return losses(out_dir), final_weights(out_dir)


def copy_of(four_steps: Path, tmp_path: Path) -> Path:
    shutil.copytree(four_steps, tmp_path / "run")
    return tmp_path / "run"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage(step: Path, how: str) -> str:
    """Damage one file of `step`; returns what the warning must say."""
    if how == "trainable":
        size = (step / "trainable.safetensors").stat().st_size
        truncate(step / "trainable.safetensors")
        return f"trainable.safetensors has {size // 2} bytes, its manifest says {size}"
    if how == "optimizer":
        size = (step / "optimizer.pt").stat().st_size
        truncate(step / "optimizer.pt")
        return f"optimizer.pt has {size // 2} bytes, its manifest says {size}"
    if how == "position":  # torn, and the same size: only the hash can tell
        text = (step / "position.json").read_text()
        (step / "position.json").write_text(text[: len(text) // 2].ljust(len(text)))
        return "position.json's SHA-256 differs from its manifest's"
    assert how == "manifest"
    (step / "manifest.json").unlink()
    return "has no manifest.json"


def test_every_file_of_a_saved_step_is_in_its_manifest(four_steps):
    manifest = json.loads((four_steps / STEP_4 / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["config.json", "optimizer.pt", "position.json", "rng_rank0.json",
                                "trainable.safetensors"]
    assert manifest["optimizer.pt"]["bytes"] == (four_steps / STEP_4 / "optimizer.pt").stat().st_size
    assert all(len(record["sha256"]) == 64 for record in manifest.values())


def test_undamaged_latest_resumes_from_itself_with_the_same_losses(four_steps, from_step_2, tmp_path):
    out_dir = copy_of(four_steps, tmp_path)
    assert run(out_dir).calls == 2 * ACCUM  # steps 5 and 6 only
    assert losses(out_dir) == from_step_2[0]


@pytest.mark.parametrize("how", ["trainable", "optimizer", "position", "manifest"])
def test_damaged_latest_falls_back_to_the_step_before(four_steps, from_step_2, tmp_path, caplog, how):
    out_dir = copy_of(four_steps, tmp_path)
    expected_warning = damage(out_dir / STEP_4, how)
    with caplog.at_level(logging.WARNING, logger="train.loop"):
        stage = run(out_dir)
    assert stage.calls == 4 * ACCUM  # steps 3 to 6: resumed from step 2
    assert losses(out_dir) == from_step_2[0]
    resumed = final_weights(out_dir)
    for name, tensor in from_step_2[1].items():
        assert torch.equal(resumed[name], tensor), name
    assert expected_warning in caplog.text and str(out_dir / STEP_4) in caplog.text
    assert f"resuming from {STEP_2} instead of {STEP_4}" in caplog.text


def test_steps_without_manifests_are_used_unverified_newest_readable_first(four_steps, tmp_path, caplog):
    """As saved before manifests: step 4 is used with a warning; once it is truncated, step 2."""
    out_dir = copy_of(four_steps, tmp_path)
    for step in (STEP_2, STEP_4):
        (out_dir / step / "manifest.json").unlink()
    backup = tmp_path / "backup"
    shutil.copytree(out_dir, backup)
    with caplog.at_level(logging.WARNING, logger="train.loop"):
        assert run(out_dir).calls == 2 * ACCUM
    assert f"{out_dir / STEP_4} has no manifest.json" in caplog.text and "cannot be verified" in caplog.text
    caplog.clear()
    truncate(backup / STEP_4 / "trainable.safetensors")
    with caplog.at_level(logging.WARNING, logger="train.loop"):
        assert run(backup).calls == 4 * ACCUM
    assert f"{backup / STEP_4} is damaged: trainable.safetensors cannot be read" in caplog.text


def test_no_intact_step_is_refused(four_steps, tmp_path):
    out_dir = copy_of(four_steps, tmp_path)
    damage(out_dir / STEP_4, "optimizer")
    damage(out_dir / STEP_2, "trainable")
    with pytest.raises(CheckpointError) as caught:
        run(out_dir)
    message = str(caught.value)
    assert message.startswith(f"{out_dir}: no intact checkpoint to resume from ({STEP_4}: optimizer.pt has ")
    assert f"{STEP_2}: trainable.safetensors has " in message and "delete `latest`" in message


@pytest.mark.parametrize("latest, says", [
    ("", "latest: empty; write the name of a step_* directory"),
    ("/etc", "latest names '/etc', which is not a step directory of"),
    ("../x", "latest names '../x', which is not a step directory of"),
    ("step_0000009", "latest names step_0000009, which does not exist"),
])
def test_bad_latest_is_a_clear_error(four_steps, tmp_path, latest, says):
    out_dir = copy_of(four_steps, tmp_path)
    (out_dir / "latest").write_text(latest)
    with pytest.raises(CheckpointError) as caught:
        run(out_dir)
    assert str(caught.value).startswith(str(out_dir / "latest")) and says in str(caught.value)
