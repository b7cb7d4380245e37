"""The three smoke configs, chained SFT -> KD -> DPO, each under torchrun with 2 CPU processes:
checkpoints, metrics and the merged hand-off checkpoint are written; bad configs fail cleanly."""
import json
import subprocess
import sys
from pathlib import Path

from tests.train.toy_files import build_toy_files

ROOT = Path(__file__).resolve().parents[2]


def torchrun(stage, cwd, *overrides):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", f"train.{stage}", "--config", str(ROOT / "configs" / "toy" / f"smoke_{stage}.toml"), *overrides]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_smoke_configs_chain_under_torchrun(tmp_path):
    build_toy_files(tmp_path)
    for stage in ("sft", "kd", "dpo"):
        result = torchrun(stage, tmp_path)
        assert result.returncode == 0, f"{stage}:\n{result.stderr[-4000:]}"
        run = tmp_path / "runs" / "smoke" / stage
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert records and all(r["loss"] == r["loss"] for r in records if "loss" in r)  # written and finite
        latest = run / (run / "latest").read_text().strip()
        assert (latest / "trainable.safetensors").is_file() and (latest / "rng_rank1.json").is_file()
        merged = run / "merged"
        assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.model").is_file()
    sft = [json.loads(line) for line in (tmp_path / "runs/smoke/sft/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft if "eval_loss" in r] == [2, 4]  # the held-out hook, every 2 steps
    kd = [json.loads(line) for line in (tmp_path / "runs/smoke/kd/metrics.jsonl").read_text().splitlines()]
    assert {"divergence", "eos_rate", "repetition_rate", "response_length"} <= set(kd[0])
    dpo = [json.loads(line) for line in (tmp_path / "runs/smoke/dpo/metrics.jsonl").read_text().splitlines()]
    assert {"reward_accuracy", "reward_margin"} <= set(dpo[0])


def test_bad_config_is_one_clear_line(tmp_path):
    command = [sys.executable, "-m", "train.sft", "--config", str(ROOT / "configs/toy/smoke_sft.toml"),
               "optim.lrr=1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "unknown key(s) ['lrr']" in result.stderr and "Traceback" not in result.stderr


def test_training_data_without_a_batch_is_one_clear_message(tmp_path):
    """A DPO run whose pairs file was never written (every pair tied): the manifest is left out with a
    warning, and the loop stops with a DataError naming the file, not a traceback."""
    build_toy_files(tmp_path)
    missing = tmp_path / "no_pairs.jsonl"
    command = [sys.executable, "-m", "train.dpo", "--config", str(ROOT / "configs/toy/smoke_dpo.toml"),
               f'data.train=["{missing}"]', f'run.out_dir="{tmp_path / "dpo"}"',
               'model.checkpoint="toy/checkpoints/student"']
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"train.dpo: {missing}: no batch for rank 0" in result.stderr and "Traceback" not in result.stderr


def test_bfloat16_model_trains_float32_adapters(tmp_path):
    """dtype bfloat16: frozen weights in bf16, LoRA and projector kept in float32 (master
    weights), and a loss + backward runs on CPU without autocast."""
    import torch

    from data.batching import Example, collate
    from train.config import load_config
    from train.recipe import build_model
    from train.stages import SFTStage

    build_toy_files(tmp_path)
    config = load_config(None, [f"model.checkpoint={tmp_path}/toy/checkpoints/student", 'model.dtype="bfloat16"'])
    model = build_model(config, torch.device("cpu"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert any(n.startswith("projector.") for n in trainable)
    assert model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    prompt = [7] + [model.config.audio_token_id] * 13 + [9, 10]
    batch = collate([Example("a", prompt, [11, 12, 13], torch.randn(100, 80))], 0)
    loss_sum, _ = SFTStage().loss(model, batch)
    loss_sum.backward()
    assert torch.isfinite(loss_sum) and all(p.grad is not None and p.grad.dtype == torch.float32
                                            for p in trainable.values())
