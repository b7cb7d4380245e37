"""Log-mel extraction: ours (model.features.log_mel) vs transformers' Phi4MultimodalFeatureExtractor.

Same waveform for both: a synthetic 16 kHz float32 signal (speech-like harmonics under a
syllable-rate envelope, plus noise), 10 minutes by default. Both start from the numpy array and
end with a float32 torch tensor of log-mel features; ours uses the "transformers" filterbank so
the outputs are comparable. The two run in alternation, so background load affects both alike,
and the median of the repeats is reported.

Single-threaded by default (--threads 1), for both sides: that is how extraction runs in a
DataLoader worker, and on a shared, oversubscribed machine multi-threaded timings of many short
kernels measure the scheduler more than the code. Pass --threads N to time N threads.

    python bench/features.py [--minutes 10 --repeats 5 --threads 1]

Last line: JSON with `speedup` = transformers time / our time (>= 1.0: ours at least as fast).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.features import log_mel  # noqa: E402


def synthetic_speech(minutes: float, seed: int = 0) -> np.ndarray:
    """(samples,) float32 at 16 kHz, peak ~0.5: harmonics of a gliding pitch, envelope, noise."""
    sample_rate = 16_000
    t = np.arange(int(minutes * 60 * sample_rate)) / sample_rate
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = np.random.default_rng(seed).standard_normal(t.shape[0])
    return (0.15 * envelope * voiced + 0.01 * noise).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import Phi4MultimodalFeatureExtractor

    extractor = Phi4MultimodalFeatureExtractor()
    waveform = synthetic_speech(args.minutes)
    runners = {
        "ours": lambda: log_mel(waveform, filterbank="transformers"),
        "transformers": lambda: extractor(waveform, sampling_rate=16_000, return_tensors="pt")[
            "audio_input_features"][0],
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, torch.Tensor] = {}
    for repeat in range(args.warmup + args.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            outputs[name] = run()
            elapsed = time.perf_counter() - start
            if repeat >= args.warmup:
                times[name].append(elapsed)

    max_diff = (outputs["ours"] - outputs["transformers"]).abs().max().item()
    medians = {name: statistics.median(values) for name, values in times.items()}
    frames = outputs["ours"].shape[0]
    print(f"input: {args.minutes:g} min at 16 kHz ({waveform.shape[0]:,} samples -> {frames:,} frames x 80), "
          f"{torch.get_num_threads()} threads")
    for name, median in medians.items():
        print(f"{name:>12}: {median * 1e3:8.1f} ms (median of {args.repeats}), "
              f"{args.minutes * 60 / median:8.0f} x real time")
    print(f"max |log-mel difference| = {max_diff:.2e} (filterbank 'transformers' on both sides)")
    speedup = medians["transformers"] / medians["ours"]
    print(json.dumps({"benchmark": "log_mel_10min" if args.minutes == 10 else f"log_mel_{args.minutes:g}min",
                      "ours_s": round(medians["ours"], 4), "transformers_s": round(medians["transformers"], 4),
                      "speedup": round(speedup, 3), "max_abs_diff": max_diff, "threads": args.threads}))


if __name__ == "__main__":
    main()
