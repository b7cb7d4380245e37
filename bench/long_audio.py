"""Long audio through the speech encoder: peak memory and time at 5, 10 and 30 minutes.

The encoder cuts anything longer than 500 encoder frames (40 s) into windows encoded
independently, so cost should grow linearly with duration (no attention over the whole
input). Each duration runs in a fresh child process, so its peak resident memory
(ru_maxrss) is its own; the baseline RSS of a child that built the encoder and features but
did not encode is subtracted. A reduced-width encoder (hidden 256, 4 blocks, 4 heads) keeps
the CPU run short; the real encoder has the same structure.

    python bench/long_audio.py [--minutes 5 10 30]

Last line: JSON with the 30-min / 5-min ratios of time and memory (linear: 6.0).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import EncoderConfig  # noqa: E402
from model.encoder import ConformerEncoder  # noqa: E402

FRAMES_PER_MINUTE = 6000  # 100 log-mel frames per second


def child(minutes: float, encode: bool, repeats: int = 3) -> None:
    """Build the encoder and features; encode if asked; print time and peak RSS as JSON."""
    torch.manual_seed(0)
    config = EncoderConfig(hidden_size=256, intermediate_size=512, num_blocks=4, num_heads=4,
                           nemo_conv_channels=128, ext_pw_out_channel=256, depthwise_separable_out_channel=256)
    encoder = ConformerEncoder(config).eval()
    features = torch.randn(1, int(minutes * FRAMES_PER_MINUTE), 80)
    elapsed = 0.0
    if encode:
        with torch.no_grad():
            timings = []
            for _ in range(repeats):  # the first pass also pays for fresh pages; report the fastest
                start = time.perf_counter()
                hidden, lengths = encoder(features)
                timings.append(time.perf_counter() - start)
                del hidden
            elapsed = min(timings)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": elapsed, "peak_mib": peak_mib}))


def run_child(minutes: float, encode: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(minutes), "--encode", str(int(encode))],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 30])
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--encode", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, bool(args.encode))
        return

    rows = {}
    for minutes in args.minutes:
        baseline = run_child(minutes, encode=False)["peak_mib"]
        result = run_child(minutes, encode=True)
        rows[minutes] = {"seconds": result["seconds"], "extra_mib": result["peak_mib"] - baseline}
        print(f"{minutes:5.1f} min ({int(minutes * FRAMES_PER_MINUTE / 8):6d} audio tokens): "
              f"{result['seconds']:7.2f} s, peak memory above baseline {rows[minutes]['extra_mib']:8.1f} MiB")
    first, last = min(rows), max(rows)
    print(json.dumps({
        "benchmark": "encoder_long_audio",
        "minutes": list(rows),
        "seconds": [round(r["seconds"], 3) for r in rows.values()],
        "extra_mib": [round(r["extra_mib"], 1) for r in rows.values()],
        "duration_ratio": last / first,
        "time_ratio": round(rows[last]["seconds"] / rows[first]["seconds"], 3),
        "memory_ratio": round(rows[last]["extra_mib"] / rows[first]["extra_mib"], 3),
    }))


if __name__ == "__main__":
    main()
