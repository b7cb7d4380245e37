"""run.strategy = "fsdp2" (train/fsdp2.py): under torchrun with 2 CPU processes on gloo, the smoke
configs give ddp's losses step by step, a run killed with SIGKILL resumes exactly, checkpoints keep
ddp's format (a ddp step resumes under fsdp2), bf16 weights with float32 LoRA factors train as under
ddp, and model calls that ranks make unevenly outside the training forward do not hang the run."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.test_loop import WORKER, final_weights, losses, run_worker
from tests.train.test_recipes import torchrun
from tests.train.toy_files import build_toy_files
from train.config import ConfigError, load_config

TOLERANCE = 1e-6  # absolute, on losses of about 1 to 6
SHARDED = "groups + the root over 2 ranks"  # train/fsdp2.py logs it on every rank once the model is sharded


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return build_toy_files(tmp_path_factory.mktemp("toy"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_both(stage: str, root: Path, *overrides: str) -> dict[str, Path]:
    """The smoke config of `stage` under each strategy, from the toy student (no earlier stage
    needed). An override may name {out_dir}, the run's directory."""
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        out_dir = root / "runs" / strategy / stage
        result = torchrun(stage, root, f"run.strategy={strategy}", f"run.out_dir={out_dir}",
                          "model.checkpoint=toy/checkpoints/student",
                          *(override.format(out_dir=out_dir) for override in overrides))
        assert result.returncode == 0, f"{stage} {strategy}:\n{result.stderr[-4000:]}"
        assert (result.stderr.count(SHARDED) == 2) == (strategy == "fsdp2"), result.stderr[-2000:]
        runs[strategy] = out_dir
    return runs


def assert_same_numbers(runs: dict[str, Path], keys: tuple[str, ...]) -> dict[str, float]:
    """Every logged value of `keys` equal to TOLERANCE between the strategies; returns the largest differences."""
    ddp, fsdp2 = records(runs["ddp"]), records(runs["fsdp2"])
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp2] and ddp
    largest = {}
    for key in keys:
        pairs = [(a[key], b[key]) for a, b in zip(ddp, fsdp2) if key in a]
        assert pairs and all(key in b for a, b in zip(ddp, fsdp2) if key in a), key
        largest[key] = max(abs(a - b) for a, b in pairs)
        assert largest[key] <= TOLERANCE, (key, pairs)
    return largest


@pytest.fixture(scope="module")
def sft_runs(toy_root) -> dict[str, Path]:
    return run_both("sft", toy_root)


def test_sft_smoke_config_gives_ddp_losses_checkpoints_and_merged_weights(sft_runs):
    """Also the LoRA factors drawn with each rank's own seed: rank 0's must reach every shard, as
    DDP's constructor broadcasts them. The checkpoints have ddp's format, tensor for tensor."""
    runs = sft_runs
    print("largest |ddp - fsdp2|:", assert_same_numbers(runs, ("loss", "eval_loss", "grad_norm")))
    step = "step_0000002"
    ddp_opt, fsdp2_opt = (torch.load(runs[s] / step / "optimizer.pt", weights_only=True) for s in ("ddp", "fsdp2"))
    assert ddp_opt["param_groups"] == fsdp2_opt["param_groups"] and ddp_opt["state"].keys() == fsdp2_opt["state"].keys()
    for index, state in ddp_opt["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(fsdp2_opt["state"][index][name], value, rtol=0, atol=1e-6)
    for folder, filename in ((step, "trainable.safetensors"), ("merged", "model.safetensors")):
        ddp, fsdp2 = (load_file(str(runs[s] / folder / filename)) for s in ("ddp", "fsdp2"))
        assert ddp.keys() == fsdp2.keys()
        for name in ddp:
            torch.testing.assert_close(fsdp2[name], ddp[name], rtol=0, atol=1e-6, msg=f"{folder} {name}")


def test_a_ddp_checkpoint_resumes_under_fsdp2(sft_runs, toy_root):
    """One format for both: the ddp SFT run's step 2, resumed under fsdp2, continues with ddp's losses."""
    out_dir = toy_root / "runs" / "ddp_then_fsdp2" / "sft"
    shutil.copytree(sft_runs["ddp"], out_dir)
    shutil.rmtree(out_dir / "step_0000004")
    (out_dir / "latest").write_text("step_0000002")
    result = torchrun("sft", toy_root, "run.strategy=fsdp2", f"run.out_dir={out_dir}",
                      "model.checkpoint=toy/checkpoints/student")
    assert result.returncode == 0 and result.stderr.count(SHARDED) == 2, result.stderr[-4000:]
    print("largest |ddp - resumed|:", assert_same_numbers({"ddp": sft_runs["ddp"], "fsdp2": out_dir},
                                                          ("loss", "eval_loss", "grad_norm")))


def test_kd_smoke_config_gives_ddp_losses(toy_root):
    """On-policy KD: the student samples through the sharded model (hidden_states registered as an
    FSDP2 forward method) and the fused loss reads the LM head's gathered weight."""
    runs = run_both("kd", toy_root)
    print("largest |ddp - fsdp2|:", assert_same_numbers(runs, ("loss", "divergence", "response_length")))


def test_dpo_smoke_config_gives_ddp_losses(toy_root):
    """DPO swaps the trainable projector back to its starting value for the reference (on the
    gathered model under fsdp2), so the pairs first scored after a step still get pi_ref's values.
    With the frozen-encoder output cache on, which hits on one rank while it misses on the other:
    the encoder is kept whole on every rank, so its calls need not pair up."""
    runs = run_both("dpo", toy_root, "model.encoder_cache={out_dir}/encoder_cache")
    print("largest |ddp - fsdp2|:", assert_same_numbers(runs, ("loss", "reward_margin", "reward_accuracy")))


def test_sigkill_then_resume_under_fsdp2_gives_the_same_losses_and_weights(tmp_path):
    """As test_loop's ddp test: 6 steps in one go vs killed after step 3 (last checkpoint: step 2)
    and resumed, LoRA dropout on (the RNG state is restored too), all under fsdp2."""
    common = ["--steps", "6", "--save-every", "2", "--dropout", "0.2", "--grad-accum", "2", "--strategy", "fsdp2"]
    result = run_worker(tmp_path / "full", *common, processes=2)
    assert result.stderr.count(SHARDED) == 2, result.stderr[-2000:]
    run_worker(tmp_path / "killed", *common, "--kill-after", "3", processes=2, expect_kill=True)
    assert (tmp_path / "killed" / "latest").read_text() == "step_0000002"
    run_worker(tmp_path / "killed", *common, processes=2)
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")
    full, resumed = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    assert full.keys() == resumed.keys() and full
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_bfloat16_lora_and_uneven_prepare_calls_give_ddp_losses(tmp_path):
    """Frozen weights in bf16 and LoRA factors in float32 in the same layers: FSDP2 gathers each
    layer in bf16 (MixedPrecisionPolicy), as LoRALinear casts the factors under ddp, and reduces and
    accumulates gradients in float32 into the float32 shards; the saved factors stay float32. And
    the stage's prepare calls the model once on rank 0 and twice on rank 1 per batch (as KD's
    rollouts that end at different lengths): sharded per call, the all-gathers would not pair up."""
    for strategy in ("ddp", "fsdp2"):
        run_worker(tmp_path / strategy, "--bfloat16", "--uneven-prepare", "--strategy", strategy, "--steps", "3",
                   "--grad-accum", "2", processes=2)
    difference = max(abs(a - b) for a, b in zip(losses(tmp_path / "fsdp2"), losses(tmp_path / "ddp")))
    print("largest |ddp - fsdp2| loss:", difference)
    assert len(losses(tmp_path / "fsdp2")) == 3 and difference <= TOLERANCE
    sharded, ddp = final_weights(tmp_path / "fsdp2"), final_weights(tmp_path / "ddp")
    assert sharded.keys() == ddp.keys()
    for name in ddp:
        assert sharded[name].dtype == torch.float32, name
        torch.testing.assert_close(sharded[name], ddp[name], rtol=0, atol=1e-6, msg=name)


def test_precision_policy_per_group():
    """One dtype: no policy. bf16 frozen + float32 trainable: gathered in bf16, reduced in float32.
    Frozen weights of two dtypes in one group: a ConfigError naming them."""
    sys.path.insert(0, str(WORKER.parent))
    from worker import tiny_model

    from train.fsdp2 import precision_policy

    model = tiny_model(0.0)
    assert precision_policy(model.decoder.layers[0], "decoder.layers.0").param_dtype is None
    layer = model.decoder.layers[0].to(torch.bfloat16)
    for param in layer.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    policy = precision_policy(layer, "decoder.layers.0")
    assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (torch.bfloat16, torch.float32,
                                                                                     False)
    layer.mlp.down_proj.weight.data = layer.mlp.down_proj.weight.data.half()
    with pytest.raises(ConfigError, match=r'the parameters of decoder.layers.0 mix dtypes .* use model.dtype = '
                                          r'"float32" or run.strategy = "ddp"'):
        precision_policy(layer, "decoder.layers.0")


def test_strategy_is_range_checked():
    assert load_config(None, []).run.strategy == "ddp"
    assert load_config(None, ['run.strategy="fsdp2"']).run.strategy == "fsdp2"
    with pytest.raises(ConfigError, match=r'override .*: run.strategy = "fsdp" is not allowed; allowed: one of "ddp", '
                                          r'"fsdp2"'):
        load_config(None, ["run.strategy=fsdp"])


def test_one_process_trains_plainly_under_fsdp2(tmp_path):
    """Without torchrun there is nothing to shard: the plain model, the same run as under ddp."""
    sys.path.insert(0, str(WORKER.parent))
    from worker import examples, tiny_model

    from data.batching import ExampleSource
    from train.distributed import DistInfo
    from train.fsdp2 import is_sharded
    from train.loop import train
    from train.stages import SFTStage

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for strategy in ("ddp", "fsdp2"):
        config = load_config(None, [f"run.out_dir={tmp_path / strategy}", "optim.max_steps=2",
                                    f"run.strategy={strategy}"])
        model = tiny_model(0.0)
        train(config, model, SFTStage(), ExampleSource(examples(), 2), info)
        assert not any(is_sharded(p) for p in model.parameters())
    assert losses(tmp_path / "fsdp2") == losses(tmp_path / "ddp")
