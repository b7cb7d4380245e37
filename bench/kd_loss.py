"""Distillation loss + backward: fused (losses.kd_fused.fused_kd_loss) vs naive (full logits + log_softmax).

Phi-4-mini sizes by default: hidden 3072, vocabulary 200064, 2048 response tokens, float32 on
CPU. The student's LM head is frozen (in this project only the projector and LoRA train), so
the backward pass produces d loss / d hidden states. Two teachers (``--teachers``):

* ``head``: a local teacher given by its hidden states and its own [V, H] LM head. The naive form
  builds both models' [N, V] logits; the fused form builds (chunk, V) pieces of both.
* ``topk``: an API teacher's top 20 tokens + tail bucket. The naive form builds the student's
  [N, V] logits and log-softmax; the fused form builds (chunk, V) pieces.

Each (teacher, variant) runs in a fresh child process, so its peak resident memory (ru_maxrss)
is its own; the runs alternate naive / fused. Reported per run: the time of one loss + backward
(best of ``--repeats``), the peak RSS of the process, and the peak above the RSS measured once
the inputs exist (the loss's own memory: the inputs, chiefly the LM head(s), 2.46 GB each in
float32, 1.23 GB in bf16, are the same for both forms). The last line is JSON with the ratios
fused / naive.

    python bench/kd_loss.py                       # full size, float32, a few minutes on 2 cores
    python bench/kd_loss.py --vocab 32000 --tokens 512 --repeats 1   # quick look
    python bench/kd_loss.py --head-dtype bfloat16  # LM heads stored in bf16, computed in float32
    python bench/kd_loss.py --dtype bfloat16      # bf16 everything (skipped on a CPU without bf16 kernels)

``--head-dtype bfloat16`` stores both LM heads in bf16, as a bf16 model holds them, beside float32
hidden states; both forms compute float32 logits, so it runs on any CPU. The fused form upcasts
one block of vocabulary rows at a time (losses/kd_fused.py) and never holds a float32 head. The
naive form, to get float32 logits, must upcast each head whole first (``.to(float32)``): on a CPU
without bf16 matmul kernels that is the textbook form's only choice (a bf16 matmul would be
emulated, slower than float32), and the student's float32 copy (2.46 GB) lives until its
backward. A device with bf16 kernels (a GPU) would let the textbook form multiply in bf16 and
hold no copy, so the JSON also gives ``memory_ratio_naive_less_head_copy``: fused peak / (naive
peak - the student's float32 head copy), an upper bound on the ratio against such a naive form.
Inputs are created a block of rows at a time, so no float32 head exists in either child.

The floor (bench/floor.py), timed in a child of its own in the same run and dtype: the loss's
matmuls alone, the student's logits (N, H) @ (H, V) and their gradient to the hidden states,
plus the teacher's logits for the ``head`` teacher; each variant's time is also reported as a
fraction of it. With ``--head-dtype bfloat16`` the floor is the same float32 matmuls (both forms
multiply in float32); the upcasts of the heads are the forms' own cost, not the floor's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.floor import add_dtype_argument, benchmark_dtype, matmul_seconds
from losses.kd_fused import TeacherHead, TeacherTopK, fused_kd_loss

TOP_K = 20
TEACHER_HIDDEN = 3072


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def random_head(vocab: int, hidden: int, scale: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """(V, H) N(0, scale^2) weights stored in `dtype`. float32: one randn, as always; another dtype:
    drawn 4096 rows at a time into the head (the same draws, rounded), so no float32 head exists."""
    if dtype == torch.float32:
        return torch.randn(vocab, hidden, generator=gen).mul_(scale)
    head = torch.empty(vocab, hidden, dtype=dtype)
    for start in range(0, vocab, 4096):
        rows = min(4096, vocab - start)
        head[start : start + rows] = torch.randn(rows, hidden, generator=gen).mul_(scale)
    return head


def make_inputs(args, teacher: str):
    """Random inputs, created in place so that no temporary exceeds the tensors themselves; the LM
    heads in `args.head_dtype` (float32 if absent), everything else float32."""
    head_dtype = getattr(torch, getattr(args, "head_dtype", None) or "float32")
    gen = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(1, args.tokens, args.hidden, generator=gen)  # (1, N, H)
    lm_head_weight = random_head(args.vocab, args.hidden, args.hidden**-0.5, gen, head_dtype)  # (V, H), frozen
    mask = torch.ones(1, args.tokens, dtype=torch.bool)
    if teacher == "head":
        teacher_hidden = torch.randn(1, args.tokens, TEACHER_HIDDEN, generator=gen)
        teacher_weight = random_head(args.vocab, TEACHER_HIDDEN, 2 * TEACHER_HIDDEN**-0.5, gen, head_dtype)
        teacher_inputs = (teacher_hidden, teacher_weight)
    else:
        # distinct ids per position, one from each of TOP_K equal slices of the vocabulary (randperm
        # per position would leave gigabytes of allocator high-water mark in the peak RSS)
        stride = args.vocab // TOP_K
        ids = torch.arange(TOP_K) * stride + torch.randint(0, stride, (1, args.tokens, TOP_K), generator=gen)
        logprobs = torch.log_softmax(torch.randn(1, args.tokens, TOP_K + 1, generator=gen) * 2, -1)[..., :TOP_K]
        teacher_inputs = (ids, logprobs.contiguous())  # top-k mass < 1: the tail bucket is non-empty
    return student_hidden, lm_head_weight, mask, teacher_inputs


def naive_loss(student_hidden, lm_head_weight, mask, teacher: str, teacher_inputs):
    """Textbook forms: every [N, V] tensor materialised in float32 (TRL-style). A head stored in a
    lower precision than the hidden states (``--head-dtype bfloat16``) is upcast whole to get
    float32 logits (module docstring); for heads in the hidden states' dtype ``.to`` is a no-op."""
    num_tokens = int(mask.sum())
    # (N, V); the upcast student head (V, H) is kept by autograd for the backward
    logits = student_hidden[mask] @ lm_head_weight.to(student_hidden.dtype).T
    student_logprobs = torch.log_softmax(logits, dim=-1)  # (N, V)
    if teacher == "head":
        teacher_hidden, teacher_weight = teacher_inputs
        with torch.no_grad():  # the upcast teacher head lives for this matmul only
            teacher_logits = teacher_hidden[mask] @ teacher_weight.to(teacher_hidden.dtype).T  # (N, V)
            teacher_logprobs = torch.log_softmax(teacher_logits, dim=-1)  # (N, V)
        return F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="sum") / num_tokens
    ids, topk_logprobs = teacher_inputs[0][mask], teacher_inputs[1][mask]  # (N, k)
    student_topk = student_logprobs.gather(-1, ids)  # (N, k)
    student_tail = torch.log1p(-student_topk.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))  # (N, 1)
    teacher_tail = torch.log1p(-topk_logprobs.exp().sum(-1, keepdim=True))  # (N, 1)
    student_buckets = torch.cat([student_topk, student_tail], -1)
    teacher_buckets = torch.cat([topk_logprobs, teacher_tail], -1)
    return F.kl_div(student_buckets, teacher_buckets, log_target=True, reduction="sum") / num_tokens


def fused_loss(student_hidden, lm_head_weight, mask, teacher: str, teacher_inputs, chunk_size: int):
    spec = TeacherHead(*teacher_inputs) if teacher == "head" else TeacherTopK(*teacher_inputs)
    return fused_kd_loss(student_hidden, lm_head_weight, spec, mask, chunk_size=chunk_size)


def floor_child(args) -> None:
    """The loss's matmuls alone (module docstring), for the teacher args.teacher."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = [(args.tokens, args.hidden, args.vocab)]
    runs = []
    for _ in range(args.repeats):  # best of --repeats, as the variants report theirs
        seconds = matmul_seconds(shapes, dtype, passes=("forward", "input_grad"), repeats=1, warmup=False)
        if args.teacher == "head":
            seconds += matmul_seconds([(args.tokens, TEACHER_HIDDEN, args.vocab)], dtype, repeats=1, warmup=False)
        runs.append(seconds)
    print(json.dumps({"time_s": min(runs)}))


def child(args) -> None:
    torch.set_num_threads(args.threads)
    student_hidden, lm_head_weight, mask, teacher_inputs = make_inputs(args, args.teacher)  # heads in head dtype
    dtype = getattr(torch, args.dtype)
    student_hidden = student_hidden.to(dtype)
    if args.teacher == "head":
        teacher_inputs = (teacher_inputs[0].to(dtype), teacher_inputs[1])
    rss_with_inputs = current_rss_bytes()
    times, loss_value, grad = [], None, None
    for _ in range(args.repeats):
        hidden = student_hidden.clone().requires_grad_(True)
        start = time.perf_counter()
        if args.variant == "naive":
            loss = naive_loss(hidden, lm_head_weight, mask, args.teacher, teacher_inputs)
        else:
            loss = fused_loss(hidden, lm_head_weight, mask, args.teacher, teacher_inputs, args.chunk_size)
        loss.backward()
        times.append(time.perf_counter() - start)
        loss_value, grad = loss.item(), hidden.grad
        del loss, hidden
    print(
        json.dumps(
            {
                "time_s": min(times),
                "times_s": times,
                "peak_rss": peak_rss_bytes(),
                "rss_with_inputs": rss_with_inputs,
                "loss": loss_value,
                "grad_norm": grad.norm().item(),
                "grad_sample": grad[0, :4, :4].flatten().tolist(),
            }
        )
    )


def run_child(args, teacher: str, variant: str) -> dict:
    command = [
        sys.executable, __file__, "--child", "--teacher", teacher, "--variant", variant,
        "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--tokens", str(args.tokens),
        "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats), "--threads", str(args.threads),
        "--dtype", args.dtype, "--head-dtype", args.head_dtype,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} / {teacher} child failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=200064)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed loss + backward runs per child (best is kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--teachers", default="head,topk", help="comma list of: head, topk")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    add_dtype_argument(parser)
    parser.add_argument("--head-dtype", choices=("float32", "bfloat16"), default=None,
                        help="how the LM heads are stored (default: --dtype); bfloat16 beside --dtype float32: "
                             "stored in bf16, computed in float32 (module docstring), on any CPU")
    args = parser.parse_args()
    args.head_dtype = args.head_dtype or args.dtype
    if args.dtype == "bfloat16" and args.head_dtype != "bfloat16":
        parser.error("--dtype bfloat16 computes in bf16: a float32 head beside it is not a case here")
    if args.child:
        floor_child(args) if args.variant == "floor" else child(args)
        return
    dtype, skipped = benchmark_dtype(args.dtype)
    if dtype is None:
        print(skipped + "; --head-dtype bfloat16 (with --dtype float32) stores the heads in bf16 and computes in "
              "float32, on any CPU")
        print(json.dumps({"bench": "kd_loss", "dtype": args.dtype, "skipped": skipped}))
        return

    gb = 1e9
    head_copy_bytes = args.vocab * args.hidden * 4 if args.head_dtype != args.dtype else 0  # the naive student's
    print(
        f"distillation loss + backward: N={args.tokens} tokens, H={args.hidden}, V={args.vocab}, {args.dtype}, "
        f"LM heads stored in {args.head_dtype}, CPU ({args.threads} threads), frozen LM head, chunk "
        f"{args.chunk_size}, best of {args.repeats}"
    )
    if head_copy_bytes:
        print(f"(the naive form upcasts each {args.head_dtype} head whole to float32 for float32 logits: no bf16 "
              f"kernels assumed; the student's copy, {head_copy_bytes / 1e9:.2f} GB, lives until its backward)")
    header = f"{'teacher':8} {'variant':7} {'time s':>8} {'peak RSS GB':>12} {'above inputs GB':>16} {'loss':>12}"
    print(header)
    print("-" * len(header))
    summary = {}
    for teacher in args.teachers.split(","):
        results = {variant: run_child(args, teacher, variant) for variant in ("naive", "fused")}
        floor_s = run_child(args, teacher, "floor")["time_s"]
        for variant, r in results.items():
            above = (r["peak_rss"] - r["rss_with_inputs"]) / gb
            peak = r["peak_rss"] / gb
            print(f"{teacher:8} {variant:7} {r['time_s']:8.2f} {peak:12.2f} {above:16.2f} {r['loss']:12.6f}"
                  f"  ({floor_s / r['time_s']:.0%} of the floor)")
        print(f"{teacher:8} {'floor':7} {floor_s:8.2f}  (the loss's matmuls alone)")
        naive, fused = results["naive"], results["fused"]
        ratios = {
            "fused_fraction_of_floor": floor_s / fused["time_s"],
            "naive_fraction_of_floor": floor_s / naive["time_s"],
            "memory_ratio": fused["peak_rss"] / naive["peak_rss"],
            "memory_ratio_above_inputs": (fused["peak_rss"] - fused["rss_with_inputs"])
            / (naive["peak_rss"] - naive["rss_with_inputs"]),
            "memory_ratio_naive_less_head_copy": fused["peak_rss"] / (naive["peak_rss"] - head_copy_bytes),
            "time_ratio": fused["time_s"] / naive["time_s"],
            "loss_rel_diff": abs(fused["loss"] - naive["loss"]) / abs(naive["loss"]),
            "grad_norm_rel_diff": abs(fused["grad_norm"] - naive["grad_norm"]) / naive["grad_norm"],
            "grad_sample_max_abs_diff": max(abs(a - b) for a, b in zip(fused["grad_sample"], naive["grad_sample"])),
        }
        summary[teacher] = {key: float(f"{value:.4g}") for key, value in ratios.items()}
        print(
            f"  {teacher}: fused / naive: peak RSS {ratios['memory_ratio']:.3f}, peak above inputs "
            f"{ratios['memory_ratio_above_inputs']:.3f}, time {ratios['time_ratio']:.3f}; "
            f"loss rel diff {ratios['loss_rel_diff']:.1e}, grad norm rel diff {ratios['grad_norm_rel_diff']:.1e}"
            + (f"; peak RSS vs naive less its float32 student head {ratios['memory_ratio_naive_less_head_copy']:.3f}"
               if head_copy_bytes else "")
        )
    primary = summary[args.teachers.split(",")[0]]  # the top-level ratios are those of the first teacher
    print(
        json.dumps(
            {
                "bench": "kd_loss",
                "dtype": args.dtype,
                "head_dtype": args.head_dtype,
                "tokens": args.tokens,
                "hidden": args.hidden,
                "vocab": args.vocab,
                "teacher": args.teachers.split(",")[0],
                "memory_ratio": primary["memory_ratio"],
                "memory_ratio_above_inputs": primary["memory_ratio_above_inputs"],
                "time_ratio": primary["time_ratio"],
                "fused_fraction_of_floor": primary["fused_fraction_of_floor"],
                "by_teacher": summary,
            }
        )
    )


if __name__ == "__main__":
    main()
