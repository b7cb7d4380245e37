"""A tiny SFT run, launched by the training tests in a subprocess (plain python or torchrun).

    python tests/train/worker.py OUT_DIR [--grad-accum A] [--steps S] [--save-every K]
                                 [--kill-after N] [--dropout P] [--strategy ddp|fsdp2] [--bfloat16]
                                 [--uneven-prepare]

Builds the same text-only toy SpeechLM and synthetic examples on every rank (fixed seeds),
applies LoRA, trains with train.loop.train and leaves checkpoints and metrics.jsonl in OUT_DIR.
--kill-after N: after N optimizer steps in this process, SIGKILL itself (no clean shutdown).
--strategy: run.strategy. --bfloat16: frozen weights in bf16, LoRA factors kept in float32 (as
train/recipe.py does for model.dtype = "bfloat16"). --uneven-prepare: the stage's prepare calls
the model rank + 1 times per batch (`UnevenPrepareSFT`), changing nothing of the run.
"""
import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.batching import Example, ExampleSource  # noqa: E402
from model import SpeechLM, toy  # noqa: E402
from model.lora import apply_lora, mark_trainable  # noqa: E402
from train.config import load_config  # noqa: E402
from train.distributed import init_distributed, seed_everything, shutdown  # noqa: E402
from train.loop import train  # noqa: E402
from train.stages import SFTStage  # noqa: E402

VOCAB = 64


def tiny_model(dropout: float) -> SpeechLM:
    torch.manual_seed(1234)
    config = dataclasses.replace(toy(vocab_size=VOCAB), encoder=None)
    config.decoder.hidden_size, config.decoder.intermediate_size, config.decoder.num_layers = 32, 64, 2
    config.decoder.num_heads, config.decoder.num_kv_heads, config.decoder.head_dim = 4, 2, 8
    model = SpeechLM(config)
    apply_lora(model, rank=4, alpha=8, dropout=dropout)
    with torch.no_grad():  # non-zero B so the first steps already move every adapter
        for name, param in model.named_parameters():
            if name.endswith(".lora_b"):
                param.normal_(0, 0.02)
    mark_trainable(model)
    return model


class UnevenPrepareSFT(SFTStage):
    """SFT whose prepare calls the model a different number of times on each rank, as KD's
    rollouts do when their samples end at different lengths; it returns the batch unchanged."""

    prepare_uses_model = True

    def __init__(self, rank: int):
        self.rank = rank

    def prepare(self, model, batch):
        for _ in range(self.rank + 1):
            model.hidden_states(batch.input_ids)
        return batch


def examples(count: int = 32) -> list[Example]:
    gen = torch.Generator().manual_seed(99)
    out = []
    for i in range(count):
        prompt = torch.randint(7, VOCAB, (int(torch.randint(3, 9, (), generator=gen)),), generator=gen).tolist()
        response = torch.randint(7, VOCAB, (int(torch.randint(2, 7, (), generator=gen)),), generator=gen).tolist()
        out.append(Example(id=f"ex{i}", prompt_ids=prompt, response_ids=response))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--kill-after", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--bfloat16", action="store_true")
    parser.add_argument("--uneven-prepare", action="store_true")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO)  # train/fsdp2.py says on stderr when it has sharded the model
    info = init_distributed("cpu")
    config = load_config(None, [f"run.out_dir={args.out_dir}", f"optim.grad_accum={args.grad_accum}",
                                f"optim.max_steps={args.steps}", f"run.save_every={args.save_every}",
                                "optim.lr=0.01", "optim.warmup_steps=1", "data.batch_size=2", "run.keep_last=10",
                                f"run.strategy={args.strategy}"])
    seed_everything(config.run.seed, info.rank)
    model = tiny_model(args.dropout)
    if args.bfloat16:
        model.to(torch.bfloat16)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    data = ExampleSource(examples(), config.data.batch_size, seed=config.run.seed, rank=info.rank,
                         world_size=info.world_size)
    stop_after = args.kill_after or None
    stage = UnevenPrepareSFT(info.rank) if args.uneven_prepare else SFTStage()
    train(config, model, stage, data, info, stop_after=stop_after)
    if args.kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    shutdown()


if __name__ == "__main__":
    main()
