"""Every shipped config parses into the dataclasses, with the paper's fixed values."""
from pathlib import Path

import pytest

from train.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(path):
    config = load_config(path)
    assert config.model.checkpoint and config.data.train


def test_paper_settings():
    root = Path(__file__).resolve().parents[2] / "configs" / "phi4mm"
    sft, kd, dpo = (load_config(root / name) for name in ("sft_32xa100.toml", "kd_8xa100.toml", "dpo_32xa100.toml"))
    for config in (sft, kd, dpo):
        assert (config.model.lora_rank, config.model.lora_alpha) == (16, 32.0)
        assert config.model.train_projector and config.model.gradient_checkpointing
        assert config.data.max_audio_seconds == 1800.0
    assert sft.optim.epochs == 2.0 and dpo.optim.epochs == 1.0
    assert kd.kd.on_policy_fraction == 1.0 and kd.kd.divergence == "forward"


def test_overrides_and_errors(tmp_path):
    config = load_config(None, ["optim.lr=3e-4", "data.train=a.jsonl", 'kd.divergence="jsd"', "run.out_dir=runs/x"])
    assert (config.optim.lr, config.data.train, config.kd.divergence, config.run.out_dir) == (
        3e-4, ["a.jsonl"], "jsd", "runs/x")
    with pytest.raises(ConfigError, match=r"\[optim\]\.lr: expected float, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = \n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['optimizer'\]"):
        load_config(None, ["optimizer.lr=1"])
