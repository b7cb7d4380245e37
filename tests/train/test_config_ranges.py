"""Config values are checked for range, not only type: one ConfigError naming the key, where it
was set and the allowed range; what the config names on this machine (device, out_dir,
checkpoint) is checked by the recipe before anything loads; a byte-order mark is ignored."""
import dataclasses
import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import recipe
from train.config import RANGES, ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "toy" / "smoke_sft.toml"

OUT_OF_RANGE = [  # (override, what the message must say after "override '...': ")
    ("optim.lr=-1e-3", "optim.lr = -0.001 is out of range; allowed: a finite number > 0"),
    ("optim.lr=nan", "optim.lr = nan is out of range; allowed: a finite number > 0"),
    ("optim.lr=inf", "optim.lr = inf is out of range; allowed: a finite number > 0"),
    ("data.batch_size=0", "data.batch_size = 0 is out of range; allowed: an integer >= 1"),
    ("data.max_tokens=0", "data.max_tokens = 0 is out of range; allowed: an integer >= 1"),
    ("model.lora_rank=0", "model.lora_rank = 0 is out of range; allowed: an integer >= 1"),
    ("model.lora_rank=-4", "model.lora_rank = -4 is out of range; allowed: an integer >= 1"),
    ("data.on_too_long=cut", 'data.on_too_long = "cut" is not allowed; allowed: one of "error", "truncate"'),
    ("optim.grad_accum=0", "optim.grad_accum = 0 is out of range; allowed: an integer >= 1"),
    ("run.save_every=-1", "run.save_every = -1 is out of range; allowed: an integer >= 0 (0: only at the end)"),
    ("optim.max_steps=0", "optim.max_steps = 0 trains nothing (and would hand an untrained model to the next "
                          "stage); set optim.max_steps >= 1 or optim.epochs > 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas = [0.9, 1.0] is not allowed; allowed: two numbers in [0, 1)"),
    ("optim.eps=0", "optim.eps = 0.0 is out of range; allowed: a finite number > 0"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio = 1.5 is out of range; allowed: a number in [0, 1]"),
    ("model.lora_dropout=1", "model.lora_dropout = 1.0 is out of range; allowed: a number in [0, 1)"),
    ("run.log_every=0", "run.log_every = 0 is out of range; allowed: an integer >= 1"),
    ("kd.beta=1.5", "kd.beta = 1.5 is out of range; allowed: a number in (0, 1)"),
    ("kd.beta=0", "kd.beta = 0.0 is out of range; allowed: a number in (0, 1)"),
    ("kd.temperature=-1", "kd.temperature = -1.0 is out of range; allowed: a finite number >= 0"),
    ("kd.divergence=kl", 'kd.divergence = "kl" is not allowed; allowed: one of "forward", "reverse", "jsd"'),
    ("dpo.label_smoothing=0.6", "dpo.label_smoothing = 0.6 is out of range; allowed: a number in [0, 0.5]"),
    ("data.train=[1]", "data.train = [1] is not allowed; allowed: a list of non-empty file paths"),
]


@pytest.mark.parametrize("override, says", OUT_OF_RANGE, ids=[case[0] for case in OUT_OF_RANGE])
def test_out_of_range_override_names_key_and_range(override, says):
    with pytest.raises(ConfigError) as caught:
        load_config(SMOKE, [override])
    assert str(caught.value).startswith(f"override {override!r}: {says}")


@pytest.mark.parametrize("pasted", ["sk-proj-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c", "a1b2c3d4e5f60718293a4b5c6d7e8f90",
                                    "4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"])
def test_a_key_pasted_into_api_key_env_is_refused_and_never_repeated(pasted):
    with pytest.raises(ConfigError) as caught:
        load_config(SMOKE, [f"kd.api_key_env={pasted}"])
    message = str(caught.value)
    assert message.startswith("override 'kd.api_key_env=...': kd.api_key_env must name an environment variable")
    assert "looks like a key" in message and pasted not in message and pasted[:12] not in message


def test_kd_timeout_and_attempts_reach_the_teacher_client(tmp_path, monkeypatch):
    from train.kd import make_teacher

    monkeypatch.setenv("TEST_TEACHER_KEY", "not-a-real-key")
    config = load_config(SMOKE, ["kd.teacher=openai:m", "kd.base_url=http://127.0.0.1:9/v1", "kd.timeout_s=7.5",
                                 "kd.max_attempts=2", "kd.max_concurrency=3", "kd.api_key_env=TEST_TEACHER_KEY",
                                 f"run.out_dir={tmp_path}"])
    client = make_teacher(config, None, None).client
    assert (client.timeout_s, client.retry.max_attempts, client.max_concurrency, client.cache) == (7.5, 2, 3, None)
    cached = make_teacher(load_config(SMOKE, ["kd.teacher=openai:m", "kd.base_url=http://127.0.0.1:9/v1",
                                              "kd.api_key_env=TEST_TEACHER_KEY", "kd.response_cache=true",
                                              f"run.out_dir={tmp_path}"]), None, None).client
    assert cached.cache.directory == tmp_path / "teacher_cache"
    for bad, says in (("kd.timeout_s=0", "kd.timeout_s = 0.0 is out of range; allowed: a finite number > 0"),
                      ("kd.max_attempts=0", "kd.max_attempts = 0 is out of range; allowed: an integer >= 1")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(SMOKE, [bad])


def test_every_numeric_field_has_a_range():
    numeric = {f"{section.name}.{f.name}" for section in dataclasses.fields(TrainConfig)
               for f in dataclasses.fields(getattr(TrainConfig(), section.name))
               if type(getattr(getattr(TrainConfig(), section.name), f.name)) in (int, float, tuple)}
    assert numeric - {key for key, _, _ in RANGES} == set()


def test_limits_themselves_are_allowed():
    config = load_config(SMOKE, ["optim.max_steps=0", "optim.epochs=1.0", "run.save_every=0", "optim.grad_clip=0",
                                 "kd.divergence=\"jsd\"", "kd.beta=0.999", "dpo.label_smoothing=0.5",
                                 "model.lora_rank=1", "kd.temperature=0"])
    assert (config.optim.max_steps, config.optim.epochs, config.kd.beta, config.kd.temperature) == (0, 1.0, 0.999, 0.0)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_a_jsd_beta_with_a_kl_divergence_is_an_error_not_ignored(divergence):
    """kd.beta weighs the generalized JSD only: set beside a KL it would silently do nothing."""
    with pytest.raises(ConfigError, match=rf'kd.beta is the generalized JSD\'s mixture weight, used only with '
                                          rf'kd.divergence = "jsd" \(here "{divergence}"\)'):
        load_config(SMOKE, [f'kd.divergence="{divergence}"', "kd.beta=0.3"])
    assert load_config(SMOKE, [f'kd.divergence="{divergence}"']).kd.divergence == divergence  # no beta: fine


def test_a_bad_value_in_a_file_names_its_line_and_a_byte_order_mark_is_ignored(tmp_path):
    text = SMOKE.read_text()
    with_bom = tmp_path / "bom.toml"
    with_bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_config(with_bom) == load_config(SMOKE)
    lines = text.splitlines()
    number = next(i for i, line in enumerate(lines, start=1) if line.startswith("lr = "))
    lines[number - 1] = "lr = -1e-3   # negative"
    with_bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    with pytest.raises(ConfigError) as caught:
        load_config(with_bom)
    assert str(caught.value) == (f"{with_bom}, line {number}: optim.lr = -0.001 is out of range; "
                                 "allowed: a finite number > 0")


def test_a_file_that_is_not_utf8(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[run]\nout_dir = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml, line 2: not UTF-8 text; save the file as UTF-8"):
        load_config(latin1)


@pytest.mark.parametrize("device, says", [
    ("banana", "run.device = 'banana' is not a device; allowed:"),
    ("meta", "run.device = 'meta': not supported for training"),
    ("cuda:7", "run.device = 'cuda:7': this machine has"),
])
def test_device_that_does_not_exist_here(device, says):
    if device == "cuda:7" and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ConfigError) as caught:
        recipe.check_device(device)
    assert str(caught.value).startswith(says)


def test_devices_that_exist_pass():
    for device in ("", "cpu", *(["cuda", "cuda:0"] if torch.cuda.is_available() else [])):
        recipe.check_device(device)


def test_out_dir_that_is_a_file_or_cannot_be_written(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"run\.out_dir = '.*afile' is an existing file, not a directory"):
        recipe.check_out_dir(str(afile))
    with pytest.raises(ConfigError, match=r"run\.out_dir = '.*afile/run' cannot be written \(Not a directory\)"):
        recipe.check_out_dir(str(afile / "run"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(recipe.tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError, match=r"run\.out_dir = '.*ro' cannot be written \(Read-only file system\); "
                                          r"choose a writable directory"):
        recipe.check_out_dir(str(tmp_path / "ro"))


def test_out_dir_is_made_and_left_clean(tmp_path):
    recipe.check_out_dir(str(tmp_path / "a" / "b"))
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_missing_checkpoint_is_named_as_the_checkpoint():
    with pytest.raises(ConfigError, match=r"model\.checkpoint = '/nonexistent': no such directory; point it at a "
                                          r"checkpoint directory"):
        recipe.check_checkpoint("/nonexistent")


@pytest.mark.parametrize("override, says", [
    ("optim.lr=-1e-3", "optim.lr = -0.001 is out of range"),
    ("run.device=banana", "run.device = 'banana' is not a device"),
    ("model.checkpoint=/nonexistent", "model.checkpoint = '/nonexistent': no such directory"),
])
def test_recipe_exits_with_status_2_and_one_message(tmp_path, override, says):
    command = [sys.executable, "-m", "train.sft", "--config", str(SMOKE), override]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("train.sft: ") and says in result.stderr


def test_speechsum_debug_shows_the_traceback_of_an_expected_error(tmp_path):
    command = [sys.executable, "-m", "train.sft", "--config", str(SMOKE), "optim.lr=-1"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    plain = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    debug = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**env, "SPEECHSUM_DEBUG": "1"})
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError: override 'optim.lr=-1'" in debug.stderr
    quiet = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**env, "RANK": "3"})  # torchrun's other ranks: the same status, no second copy
    assert quiet.returncode == 2 and quiet.stderr.strip() == ""
