"""DPO stage: a few steps raise reward accuracy and margin; reference log-probs computed once."""
import json
import sys
from pathlib import Path

import torch

from data.pairs import PairSource, PreferencePair
from model.lora import lora_disabled
from train.config import load_config
from train.distributed import DistInfo
from train.loop import train
from losses.dpo import sequence_logprobs
from train.stages import DPOStage, response_window

sys.path.insert(0, str(Path(__file__).parent))
from worker import VOCAB, tiny_model  # noqa: E402


def pairs(count=8):
    gen = torch.Generator().manual_seed(5)
    ints = lambda n: torch.randint(7, VOCAB, (n,), generator=gen).tolist()  # noqa: E731
    return [PreferencePair(f"pair{i}", ints(5), ints(4), ints(6)) for i in range(count)]


def test_response_window_scores_exactly_the_response_tokens():
    """The window's labels are each row's response, in order, and its logits are the full
    forward's logits at the positions that predict them."""
    model = tiny_model(dropout=0.0).eval()
    batch = PairSource(pairs(2), 2).load([0, 1])
    with torch.no_grad():
        logits, labels, mask = response_window(model, batch)
        full = model(batch.input_ids, batch.attention_mask)
    for row, example in enumerate(batch.examples):
        n = len(example.response_ids)
        assert labels[row, :n].tolist() == example.response_ids and mask[row].sum() == n
        start = len(example.prompt_ids) - 1
        torch.testing.assert_close(logits[row, :n], full[row, start : start + n], rtol=0, atol=1e-5)


def fresh_adapters(model):
    """B = 0, as a new stage's LoRA starts: the policy equals the reference at step 0."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".lora_b"):
                param.zero_()
    return model


def test_dpo_steps_raise_accuracy_and_margin_with_reference_computed_once(tmp_path):
    model = fresh_adapters(tiny_model(dropout=0.0))
    data = PairSource(pairs(), batch_size=2)
    stage = DPOStage(model, beta=0.5)
    config = load_config(None, [f"run.out_dir={tmp_path}", "optim.max_steps=8", "optim.lr=0.02"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    everything = data.load(list(range(8)))

    def margins():
        with torch.no_grad():
            _, metrics = DPOStage.loss(stage, model, everything)
        return metrics["reward_accuracy"] / 8, metrics["reward_margin"] / 8

    with torch.no_grad():
        stage.prepare(model.eval(), everything)  # the reference of all 8 pairs, in one pass
    accuracy_before, margin_before = margins()
    assert accuracy_before == 0.0 and margin_before == 0.0  # ties count as wrong
    train(config, model, stage, data, info)  # 8 steps = 2 epochs of 4 batches
    assert stage.reference_computations == 1  # never recomputed by the 8 training steps
    assert len(stage.reference_logps) == 8
    with torch.no_grad(), lora_disabled(model):  # the cached reference is the adapter-free model
        logits, labels, mask = response_window(model.eval(), everything)
    reference = sequence_logprobs(logits, labels, mask)
    cached = torch.tensor([stage.reference_logps[f"pair{i}"] for i in range(8)]).flatten()
    torch.testing.assert_close(reference, cached, rtol=0, atol=1e-5)
    accuracy, margin = margins()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["reward_margin"] == 0.0  # policy = reference before the first update
    assert accuracy == 1.0 and margin > 0.1


def test_reference_is_the_starting_model_even_when_the_projector_trains():
    """pi_ref = the model as the stage found it: a pair first scored after the projector and
    the adapters moved gets the starting model's log-probs, and training state is restored."""
    import dataclasses

    from model import SpeechLM, toy
    from model.config import EncoderConfig
    from model.lora import apply_lora, mark_trainable

    torch.manual_seed(0)
    config = toy(vocab_size=VOCAB)
    config = dataclasses.replace(config, encoder=EncoderConfig(
        hidden_size=32, intermediate_size=64, num_blocks=1, num_heads=2, nemo_conv_channels=8,
        ext_pw_out_channel=32, depthwise_separable_out_channel=32, bias_max_distance=20))
    model = SpeechLM(config).eval()
    apply_lora(model, rank=2, alpha=4)
    mark_trainable(model, extra_prefixes=("projector.",))
    stage = DPOStage(model, beta=0.1)
    pair = PreferencePair("p", [1] + [4] * 13 + [9, 10], [11, 12, 13], [14, 15], features=torch.randn(100, 80))
    batch = PairSource([pair], 1).load([0])
    with torch.no_grad():
        expected = sequence_logprobs(*response_window(model, batch))  # LoRA B = 0: the starting model
        model.projector.up_proj.weight.add_(0.1)  # "training" moved the projector and the adapters
        for name, param in model.named_parameters():
            if name.endswith(".lora_b"):
                param.normal_(0, 0.1)
        moved = model.projector.up_proj.weight.clone()
        stage.prepare(model, batch)
    torch.testing.assert_close(torch.tensor(stage.reference_logps["p"]), expected, rtol=0, atol=1e-5)
    assert torch.equal(model.projector.up_proj.weight, moved)  # the trained value is back
