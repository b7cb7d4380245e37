"""The training loop: DDP equivalence, exact resume after SIGKILL, frozen weights untouched."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.batching import ExampleSource
from train.config import load_config
from train.distributed import DistInfo
from train.loop import learning_rate, train
from train.stages import SFTStage

WORKER = Path(__file__).with_name("worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_worker(out_dir, *args, processes=1, expect_kill=False):
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(WORKER), str(out_dir), *args]
    else:
        command = [sys.executable, str(WORKER), str(out_dir), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if expect_kill:  # torchrun exits with 1 and names the signal its workers died of
        killed = result.returncode == -9 if processes == 1 else "Signal 9 (SIGKILL)" in result.stderr
        assert killed, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_weights(out_dir):
    latest = (Path(out_dir) / "latest").read_text().strip()
    return load_file(str(Path(out_dir) / latest / "trainable.safetensors"))


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_processes_equal_one_process_with_double_accumulation(tmp_path):
    """torchrun, 2 ranks x accumulation 2 vs 1 process x accumulation 4: same global batches."""
    run_worker(tmp_path / "ddp", "--grad-accum", "2", "--steps", "3", processes=2)
    run_worker(tmp_path / "single", "--grad-accum", "4", "--steps", "3")
    ddp, single = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    assert ddp.keys() == single.keys() and len(ddp) == 2 * 4 * 2  # lora_a, lora_b x 4 targets x 2 layers
    for name in ddp:
        torch.testing.assert_close(ddp[name], single[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ddp")), torch.tensor(losses(tmp_path / "single")),
                               rtol=1e-6, atol=0)


def test_sigkill_then_resume_gives_the_same_losses_and_weights(tmp_path):
    """6 steps in one go vs killed after step 3 (last checkpoint: step 2) and resumed; LoRA
    dropout on, so the resumed run must also restore the RNG state."""
    common = ["--steps", "6", "--save-every", "2", "--dropout", "0.2", "--grad-accum", "2"]
    run_worker(tmp_path / "full", *common)
    run_worker(tmp_path / "killed", *common, "--kill-after", "3", expect_kill=True)
    assert (tmp_path / "killed" / "latest").read_text() == "step_0000002"
    run_worker(tmp_path / "killed", *common)
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")
    full, resumed = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_frozen_parameters_are_bit_identical_and_only_lora_changes(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    from worker import examples, tiny_model

    model = tiny_model(dropout=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = ExampleSource(examples(), 2)
    everything = data.load(list(range(len(data.examples))))
    stage = SFTStage()
    with torch.no_grad():
        loss_before = stage.loss(model, everything)[0] / stage.loss_units(everything)
    config = load_config(None, [f"run.out_dir={tmp_path}", "optim.max_steps=3", "optim.lr=0.01"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train(config, model, stage, data, info)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    assert all(n.endswith((".lora_a", ".lora_b")) for n, p in model.named_parameters() if p.requires_grad)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    with torch.no_grad():
        loss_after = stage.loss(model, everything)[0] / stage.loss_units(everything)
    assert loss_after < loss_before


def test_warmup_then_cosine_schedule():
    optim = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=4", "optim.max_steps=14",
                               "optim.min_lr_ratio=0.1"]).optim
    assert [learning_rate(s, optim) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(9, optim) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert learning_rate(14, optim) == pytest.approx(0.1)


def test_nonfinite_loss_stops_with_the_sample_ids(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    from worker import examples, tiny_model

    from train.nonfinite import NonFiniteLoss

    class PoisonedSFT(SFTStage):
        def loss(self, model, batch):
            loss_sum, metrics = super().loss(model, batch)
            return loss_sum * float("nan") if "ex5" in batch.ids else loss_sum, metrics

    config = load_config(None, [f"run.out_dir={tmp_path}", "optim.max_steps=20", "data.batch_size=2"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    data = ExampleSource(examples(), 2, shuffle=False)
    with pytest.raises(NonFiniteLoss, match=r"step 3, rank 0: the loss is NaN or inf on samples \['ex4', 'ex5'\]"):
        train(config, tiny_model(0.0), PoisonedSFT(), data, info)
    saved = json.loads((tmp_path / "nonfinite_step3_rank0.json").read_text())
    assert saved == {"step": 3, "rank": 0, "sample_ids": ["ex4", "ex5"]}


def test_nonfinite_weights_are_blamed_on_the_weights_not_the_samples(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    from worker import examples, tiny_model

    from train.nonfinite import NonFiniteLoss

    class CorruptingSFT(SFTStage):  # a parameter turns NaN before step 3's forward
        def loss(self, model, batch):
            if "ex4" in batch.ids:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
            return super().loss(model, batch)

    config = load_config(None, [f"run.out_dir={tmp_path}", "optim.max_steps=20", "data.batch_size=2"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(NonFiniteLoss, match=r"step 3, rank 0: the loss is NaN or inf because the model's weights are: "
                                            r"1 parameter tensor\(s\) hold NaN or inf \(first .*\); the inputs are "
                                            r"not at fault"):
        train(config, tiny_model(0.0), CorruptingSFT(), ExampleSource(examples(), 2, shuffle=False), info)
    assert not list(tmp_path.glob("nonfinite_step*.json"))  # no sample ids blamed


def test_epochs_set_the_number_of_steps(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    from worker import examples, tiny_model

    config = load_config(None, [f"run.out_dir={tmp_path}", "optim.epochs=1.5", "optim.grad_accum=2"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    position = train(config, tiny_model(0.0), SFTStage(), ExampleSource(examples(), 4), info)
    assert position.step == 6  # 32 examples / 4 = 8 batches per epoch; 12 batches / 2 per step
    assert (position.epoch, position.batch_index) == (1, 4)
