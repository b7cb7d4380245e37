"""Greedy generation: our KV-cached sampler vs transformers' generate() vs a recompute loop.

Same weights (ours is loaded from the transformers checkpoint), same prompts, greedy, no EOS
(every row generates exactly --new tokens), float32 on CPU by default: a decoder of hidden 512,
8 layers, 8 heads / 2 KV heads, vocabulary 32000, batch 8, 256-token prompts that each hold one
audio clip of a different length, 128 new tokens.

    python bench/sampler.py [--batch 8 --prompt 256 --new 128] [--dtype float32|bfloat16]

The floor (bench/floor.py), timed in the same run and dtype: the decoder's weight matmuls
alone, for the prefill (batch x prompt rows; the LM head on the last position only) and for
each decode step (batch rows); ours and transformers are reported as a fraction of it.

Ours and transformers run --repeats times in alternation (median reported). The recompute loop (rollout/recompute.py: full forward over prompt + generated tokens at each
step, no cache) is timed on the first --recompute-prompts prompts only, since it is slow; its
tokens/s are per generated token like the others. Last line: JSON with both speedups.
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

from floor import add_dtype_argument, benchmark_dtype, decoder_matmuls, matmul_seconds  # noqa: E402
from reference import add_size_arguments, reference_model  # noqa: E402

from model import load_pretrained  # noqa: E402
from rollout.recompute import greedy_by_recompute  # noqa: E402
from rollout.sampler import SamplingParams, generate  # noqa: E402


def make_batch(args, audio_token: int):
    """Prompts of exactly args.prompt tokens: text, one clip of 40-96 audio tokens, text."""
    gen = torch.Generator().manual_seed(0)
    audio_tokens = torch.linspace(40, 96, args.batch).long()
    frames = audio_tokens * 8
    prompts = []
    for n in audio_tokens.tolist():
        text = torch.randint(3, args.vocab - 1, (args.prompt - n,), generator=gen)
        prompts.append(torch.cat([text[:5], torch.full((n,), audio_token), text[5:]]))
    features = torch.randn(args.batch, int(frames.max()), 80, generator=gen)
    features[torch.arange(features.shape[1])[None] >= frames[:, None]] = 0.0
    return prompts, features, frames, audio_tokens


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser, vocab=32000, batch=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--recompute-prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    add_dtype_argument(parser)
    args = parser.parse_args()
    dtype, skipped = benchmark_dtype(args.dtype)
    if dtype is None:
        print(skipped)
        print(json.dumps({"benchmark": "greedy_generation", "dtype": args.dtype, "skipped": skipped}))
        return

    reference = reference_model(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                kv_heads=args.kv_heads, original_max=4096).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = load_pretrained(directory, dtype=dtype).eval()
    reference = reference.to(dtype)
    prompts, features, frames, audio_tokens = make_batch(args, args.vocab - 1)
    features = features.to(dtype)
    params = SamplingParams(max_new_tokens=args.new, temperature=0, eos_token_ids=())

    input_ids = torch.stack(prompts)  # all prompts have the same length: no text padding
    audio_mask = torch.arange(features.shape[1])[None] < frames[:, None]

    def run_ours():
        return generate(ours, prompts, params, audio_features=features, audio_lengths=frames)

    def run_transformers():
        with torch.no_grad():
            return reference.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), audio_input_features=features,
                audio_embed_sizes=audio_tokens, audio_attention_mask=audio_mask, max_new_tokens=args.new,
                min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)

    generate(ours, prompts[:1], SamplingParams(max_new_tokens=2, temperature=0),
             audio_features=features[:1], audio_lengths=frames[:1])  # warm-up
    ours_times, hf_times = [], []
    for _ in range(args.repeats):  # alternate, so background load hits both alike
        rollout, elapsed = timed(run_ours)
        ours_times.append(elapsed)
        hf_out, elapsed = timed(run_transformers)
        hf_times.append(elapsed)
    ours_s, hf_s = statistics.median(ours_times), statistics.median(hf_times)
    hf_tokens = hf_out[:, args.prompt:]

    count = args.recompute_prompts
    recomputed, recompute_s = timed(lambda: [
        greedy_by_recompute(ours, prompts[i], args.new, audio_features=features[i:i + 1, : int(frames[i])],
                            audio_lengths=frames[i:i + 1])
        for i in range(count)])

    sizes = dict(hidden=args.hidden, intermediate=4 * args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                 head_dim=args.hidden // args.heads, layers=args.layers, vocab=args.vocab)
    prefill = decoder_matmuls(rows=args.batch * args.prompt, lm_head_rows=args.batch, **sizes)
    decode = decoder_matmuls(rows=args.batch, **sizes)
    floor_s = matmul_seconds(prefill, dtype) + (args.new - 1) * matmul_seconds(decode, dtype)

    agree_hf = (rollout.tokens == hf_tokens).float().mean().item()
    agree_recompute = (rollout.tokens[:count] == torch.tensor(recomputed)).float().mean().item()
    rates = {
        "ours": args.batch * args.new / ours_s,
        "transformers_generate": args.batch * args.new / hf_s,
        "recompute_loop": count * args.new / recompute_s,
        "floor (weight matmuls alone)": args.batch * args.new / floor_s,
    }
    print(f"decoder hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab "
          f"{args.vocab}; batch {args.batch} x {args.prompt}-token prompts with audio, {args.new} new tokens, "
          f"greedy, {args.dtype}, {torch.get_num_threads()} threads")
    for name, rate in rates.items():
        print(f"{name:>22}: {rate:8.1f} generated tokens/s")
    print(f"greedy tokens equal to transformers: {agree_hf:.1%}, to the recompute loop: {agree_recompute:.1%}")
    print(f"ours at {floor_s / ours_s:.0%} of the floor, transformers at {floor_s / hf_s:.0%}")
    print(json.dumps({
        "benchmark": "greedy_generation",
        "dtype": args.dtype,
        "ours_tokens_per_s": round(rates["ours"], 1),
        "floor_tokens_per_s": round(args.batch * args.new / floor_s, 1),
        "ours_fraction_of_floor": round(floor_s / ours_s, 3),
        "transformers_fraction_of_floor": round(floor_s / hf_s, 3),
        "transformers_tokens_per_s": round(rates["transformers_generate"], 1),
        "recompute_tokens_per_s": round(rates["recompute_loop"], 1),
        "speedup_vs_transformers": round(rates["ours"] / rates["transformers_generate"], 2),
        "speedup_vs_recompute": round(rates["ours"] / rates["recompute_loop"], 2),
        "token_agreement_transformers": agree_hf,
    }))


if __name__ == "__main__":
    main()
