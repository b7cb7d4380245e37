"""One SFT training step: our SpeechLM + LoRA vs transformers' Phi4Multimodal + peft LoRA.

Same config and weights (ours is loaded from the transformers checkpoint), same batch of clips
with instructions and reference summaries, the same trainable set (LoRA r 16 / alpha 32 on every
decoder projection, plus the speech projector), AdamW, float32 on CPU. A step is forward,
backward (cross-entropy on the summary tokens only) and the optimizer step. Each side runs in
its own child process, so its peak resident memory (ru_maxrss) is its own.

    python bench/train_step.py [--batch 4 --seconds 10 --response 96 --steps 4] [--dtype float32|bfloat16]

The floor (bench/floor.py), timed in the same run and dtype: the decoder's weight matmuls over
every token of the batch, forward and the gradient to their inputs (the base weights are frozen,
so no weight gradient), with the LM head over the summary tokens only; the encoder's and the
LoRA matmuls are left out (small at these sizes), so the floor is a little optimistic.
`--dtype bfloat16` puts both sides' weights in bf16 (not mixed precision) and is skipped on a CPU
without bf16 kernels.

Last line: JSON with `speedup` = our tokens/s / transformers' tokens/s (target >= 1.2), each
side's fraction of the floor and the peak memories.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import add_dtype_argument, benchmark_dtype, decoder_matmuls, matmul_seconds  # noqa: E402
from reference import reference_model  # noqa: E402

VOCAB, PROMPT_TEXT = 32000, 24


def make_batch(args, audio_token: int):
    """Rows: [text, audio placeholders, text prompt, summary]; labels -100 outside the summary."""
    gen = torch.Generator().manual_seed(0)
    frames = args.seconds * 100
    audio_tokens = -(-frames // 8)
    length = 4 + audio_tokens + PROMPT_TEXT + args.response
    input_ids = torch.randint(3, VOCAB - 1, (args.batch, length), generator=gen)
    input_ids[:, 4 : 4 + audio_tokens] = audio_token
    labels = torch.full_like(input_ids, -100)
    labels[:, length - args.response :] = input_ids[:, length - args.response :]
    features = torch.randn(args.batch, frames, 80, generator=gen)
    return input_ids, labels, features, audio_tokens


def run_side(side: str, directory: str, args) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    input_ids, labels, features, audio_tokens = make_batch(args, VOCAB - 1)
    features = features.to(dtype)
    if side == "ours":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from data.batching import Batch
        from model import load_pretrained
        from model.lora import apply_lora, mark_trainable
        from train.stages import SFTStage

        model = load_pretrained(directory, dtype=dtype).train()
        apply_lora(model, rank=16, alpha=32)
        mark_trainable(model, extra_prefixes=("projector.",))
        prompt_length = input_ids.shape[1] - args.response
        batch = Batch([str(i) for i in range(args.batch)], input_ids, torch.ones_like(input_ids), labels != -100,
                      torch.full((args.batch,), prompt_length), features, None, [])
        stage = SFTStage()

        def loss_fn():
            loss_sum, _ = stage.loss(model, batch)
            return loss_sum / stage.loss_units(batch)
    else:
        import peft
        import transformers

        model = transformers.Phi4MultimodalForCausalLM.from_pretrained(directory, dtype=dtype).train()
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                               target_modules=r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))")
        model = peft.get_peft_model(model, lora)
        for name, param in model.named_parameters():
            if "up_proj_for_speech" in name or "down_proj_for_speech" in name:
                param.requires_grad_(True)
        sizes = torch.full((args.batch,), audio_tokens)

        def loss_fn():
            return model(input_ids=input_ids, labels=labels, audio_input_features=features,
                         audio_embed_sizes=sizes).loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses.append(float(loss))
        if step >= args.warmup:
            times.append(elapsed)
    return {"step_s": statistics.median(times), "tokens": input_ids.numel(), "first_loss": losses[0],
            "trainable": sum(p.numel() for p in params),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--response", type=int, default=96)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    add_dtype_argument(parser)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.dir, args)))
        return
    dtype, skipped = benchmark_dtype(args.dtype)
    if dtype is None:
        print(skipped)
        print(json.dumps({"benchmark": "sft_train_step", "dtype": args.dtype, "skipped": skipped}))
        return

    with tempfile.TemporaryDirectory() as directory:
        reference_model(vocab=VOCAB, hidden=512, layers=8, heads=8, kv_heads=2, original_max=4096,
                        audio_hidden=256).save_pretrained(directory)
        results = {}
        for side in ("ours", "transformers"):
            command = [sys.executable, __file__, "--side", side, "--dir", directory, "--batch", str(args.batch),
                       "--seconds", str(args.seconds), "--response", str(args.response), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--dtype", args.dtype]
            out = subprocess.run(command, check=True, capture_output=True, text=True)
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = results["ours"]["tokens"]
    shapes = decoder_matmuls(rows=rows, lm_head_rows=args.batch * args.response, hidden=512, intermediate=2048,
                             heads=8, kv_heads=2, head_dim=64, layers=8, vocab=VOCAB)
    floor_s = matmul_seconds(shapes, dtype, passes=("forward", "input_grad"), repeats=3)
    print(f"SFT step: decoder hidden 512 x 8 layers, vocab {VOCAB}, encoder hidden 256; batch {args.batch} x "
          f"({args.seconds} s audio + {PROMPT_TEXT} prompt + {args.response} summary tokens), {args.dtype}, CPU")
    for side, r in results.items():
        print(f"{side:>12}: {r['step_s'] * 1e3:8.1f} ms/step, {r['tokens'] / r['step_s']:8.0f} tokens/s, "
              f"peak {r['peak_mib']:7.0f} MiB, {r['trainable']} trainable, first loss {r['first_loss']:.4f}, "
              f"{floor_s / r['step_s']:.0%} of the floor")
    print(f"{'floor':>12}: {floor_s * 1e3:8.1f} ms/step (the weight matmuls alone, forward + input gradient)")
    ours, theirs = results["ours"], results["transformers"]
    print(json.dumps({"benchmark": "sft_train_step", "dtype": args.dtype,
                      "ours_tokens_per_s": round(ours["tokens"] / ours["step_s"], 1),
                      "floor_tokens_per_s": round(rows / floor_s, 1),
                      "ours_fraction_of_floor": round(floor_s / ours["step_s"], 3),
                      "transformers_fraction_of_floor": round(floor_s / theirs["step_s"], 3),
                      "transformers_tokens_per_s": round(theirs["tokens"] / theirs["step_s"], 1),
                      "speedup": round(theirs["step_s"] / ours["step_s"], 3),
                      "ours_peak_mib": round(ours["peak_mib"]), "transformers_peak_mib": round(theirs["peak_mib"]),
                      "first_loss_diff": abs(ours["first_loss"] - theirs["first_loss"])}))


if __name__ == "__main__":
    main()
