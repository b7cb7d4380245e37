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


def test_configs_read_without_tomllib_as_on_python_3_10():
    """Python 3.10 has no tomllib: train/config.py falls back to the tomli package (setup.py
    installs it there). Simulated here by hiding tomllib from the import system."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.modules['tomllib'] = None\n"
            "from train.config import load_config\n"
            "config = load_config('configs/toy/smoke_sft.toml', ['optim.lr=3e-4'])\n"
            "import tomli; assert sys.modules['train.config'].tomllib is tomli\n"
            "print(config.optim.lr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0 and result.stdout.strip() == "0.0003", result.stderr[-2000:]
