"""Decoder forward + backward: ours vs transformers' Phi4MultimodalForCausalLM, side by side.

Same config, same weights (ours is loaded from the transformers checkpoint), same inputs,
float32 on CPU by default. The two are timed in alternation, so background load affects both
alike; the median of the repeats is reported. transformers runs with its default attention
(sdpa), its fastest CPU path.

    python bench/decoder.py [--hidden 512 --layers 8 --heads 8 --kv-heads 2 --batch 4 --seq 512]

Last line: JSON with `speedup` = transformers time / our time (>= 1.0: ours at least as fast).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import add_size_arguments, reference_model  # noqa: E402

from model import load_pretrained  # noqa: E402


def step_time(forward, input_ids) -> float:
    start = time.perf_counter()
    logits = forward(input_ids)
    logits.float().pow(2).mean().backward()  # a loss that touches every logit
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, vocab=4096, batch=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    reference = reference_model(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                kv_heads=args.kv_heads, original_max=args.seq).train()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = load_pretrained(directory).train()
    input_ids = torch.randint(3, args.vocab - 1, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        max_diff = (ours(input_ids) - reference(input_ids=input_ids).logits).abs().max().item()

    runners = {
        "ours": lambda ids: ours(ids),
        "transformers": lambda ids: reference(input_ids=ids).logits,
    }
    models = {"ours": ours, "transformers": reference}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(args.warmup + args.repeats):
        for name, run in runners.items():
            models[name].zero_grad(set_to_none=True)
            elapsed = step_time(run, input_ids)
            if repeat >= args.warmup:
                times[name].append(elapsed)

    medians = {name: statistics.median(values) for name, values in times.items()}
    tokens = args.batch * args.seq
    print(f"config: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
          f"batch {args.batch} x seq {args.seq}, float32, {torch.get_num_threads()} threads")
    print(f"max |logits difference| = {max_diff:.2e}")
    for name, median in medians.items():
        print(f"{name:>12}: forward+backward {median * 1e3:8.1f} ms (median of {args.repeats}), "
              f"{tokens / median:8.0f} tokens/s")
    speedup = medians["transformers"] / medians["ours"]
    print(json.dumps({"benchmark": "decoder_forward_backward", "ours_s": round(medians["ours"], 4),
                      "transformers_s": round(medians["transformers"], 4), "speedup": round(speedup, 3),
                      "max_abs_logit_diff": max_diff}))


if __name__ == "__main__":
    main()
