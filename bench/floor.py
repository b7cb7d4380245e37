"""The hardware floor of a step: its weight matmuls alone, in the step's dtype, on this machine.

A decoder step cannot run faster than the matmuls of its weights: x (rows, in) @ W.T for
every projection of every layer and for the LM head (and, in training, the matmuls that carry
the gradient back through them). Attention, norms, rotary, the loss, sampling and Python are
what a real step adds on top. So each benchmark times those matmuls alone, with the same
shapes, dtype and threads, in the same run, and prints ours / floor beside ours / peer:
`fraction_of_floor` = floor seconds / our seconds (1.0 = nothing but the matmuls). The floor
is timed apart from the step (median of a few repeats), so on a noisy CPU a step that is all
matmuls can read a little above 1.0: that is "at the floor", within the timing noise.

    shapes = decoder_matmuls(rows=8, hidden=512, intermediate=2048, heads=8, kv_heads=2,
                             head_dim=64, layers=8, vocab=32000)      # one decode step, batch 8
    seconds = matmul_seconds(shapes, torch.float32)                  # (rows, in, out) -> seconds

bf16: `bf16_kernels()` asks oneDNN (`torch.ops.mkldnn._is_mkldnn_bf16_supported`); a CPU
without bf16 instructions (AVX512-BF16 or AMX) emulates bf16 matmuls, slower than float32, so
`benchmark_dtype` refuses bf16 there with a message and the benchmark says it skipped.
"""
from __future__ import annotations

import statistics
import time

import torch

Shape = tuple[int, int, int]  # (rows, in_features, out_features)


def decoder_matmuls(*, rows: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                    layers: int, vocab: int, lm_head_rows: int | None = None) -> list[Shape]:
    """The weight matmuls of one pass of the Phi-4-mini decoder over `rows` tokens: fused qkv,
    o_proj, gate_up, down per layer, then the LM head over `lm_head_rows` (default `rows`)."""
    per_layer = [(rows, hidden, (heads + 2 * kv_heads) * head_dim), (rows, heads * head_dim, hidden),
                 (rows, hidden, 2 * intermediate), (rows, intermediate, hidden)]
    return per_layer * layers + [(rows if lm_head_rows is None else lm_head_rows, hidden, vocab)]


def matmul_seconds(shapes: list[Shape], dtype: torch.dtype, *, passes: tuple[str, ...] = ("forward",),
                   repeats: int = 5, warmup: bool = True) -> float:
    """Median over `repeats` of the time of every matmul of `shapes`, each in the given passes:
    "forward" x @ W.T, "input_grad" g @ W (the gradient to the input), "weight_grad" g.T @ x.
    One weight per distinct shape (the same size means the same time)."""
    operands = {}
    for rows, fan_in, fan_out in set(shapes):
        operands[(rows, fan_in, fan_out)] = (torch.randn(rows, fan_in, dtype=dtype),
                                            torch.randn(fan_out, fan_in, dtype=dtype),
                                            torch.randn(rows, fan_out, dtype=dtype))

    def once() -> float:
        start = time.perf_counter()
        for shape in shapes:
            x, weight, grad = operands[shape]
            if "forward" in passes:
                x @ weight.T
            if "input_grad" in passes:
                grad @ weight
            if "weight_grad" in passes:
                grad.T @ x
        return time.perf_counter() - start

    if warmup:  # allocator and kernel selection
        once()
    return statistics.median(once() for _ in range(repeats))


def bf16_kernels() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN's own check). The benchmarks here run
    on the CPU, so a GPU beside it does not count (bench/gpu_check.py is the GPU's check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def benchmark_dtype(name: str) -> tuple[torch.dtype | None, str | None]:
    """(dtype, None), or (None, why it is skipped) for bf16 on a CPU without bf16 kernels."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    if dtype == torch.bfloat16 and not bf16_kernels():
        return None, ("this CPU has no bf16 matmul kernels (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False: "
                      "no AVX512-BF16 or AMX), so bf16 would be emulated and slower than float32; skipped")
    return dtype, None


def add_dtype_argument(parser) -> None:
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and activations (bfloat16 needs a CPU with bf16 kernels, or a GPU)")


def main(argv=None) -> int:
    """`python bench/floor.py`: the bf16 / float32 ratio of the floors themselves on this CPU, at the
    sampler benchmark's decode step (batch 8) and prefill (8 x 256 tokens) and the SFT step's
    forward + input-gradient matmuls: where it is above 1, bf16 cannot beat float32 here, whatever
    the code around the matmuls does. Last line: JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = dict(hidden=512, intermediate=2048, heads=8, kv_heads=2, head_dim=64, layers=8, vocab=32000)
    steps = {"decode_batch8": (decoder_matmuls(rows=8, **sizes), ("forward",)),
             "prefill_8x256": (decoder_matmuls(rows=8 * 256, lm_head_rows=8, **sizes), ("forward",)),
             "train_4x192": (decoder_matmuls(rows=4 * 192, **sizes), ("forward", "input_grad"))}
    result = {"bench": "floor", "bf16_kernels": bf16_kernels(), "threads": torch.get_num_threads()}
    for name, (shapes, passes) in steps.items():
        fp32 = matmul_seconds(shapes, torch.float32, passes=passes, repeats=args.repeats)
        bf16 = matmul_seconds(shapes, torch.bfloat16, passes=passes, repeats=args.repeats)
        print(f"{name}: float32 {fp32 * 1e3:.1f} ms, bfloat16 {bf16 * 1e3:.1f} ms, bf16 / fp32 time {bf16 / fp32:.2f}")
        result[name] = {"float32_ms": round(fp32 * 1e3, 2), "bfloat16_ms": round(bf16 * 1e3, 2),
                        "bf16_over_fp32_time": round(bf16 / fp32, 3)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
