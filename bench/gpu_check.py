"""One-shot GPU check: bf16 accuracy, attention kernels, DDP, decode bandwidth, sampler speed, KD-loss memory.

Kept in one file: it is copied to and run on a lent GPU machine as a single script.

Meant to run once on one NVIDIA H100 / H200 in a few minutes (well under 8), with random
weights (no checkpoint, no data, no network), so a GPU session answers in one script what this
project's CPU benchmarks cannot: whether bf16 logits stay close to fp32, which attention kernels
run, whether a DDP training step works, how near decoding gets to the memory-bandwidth roofline,
how the sampler compares with transformers, and how much memory the fused KD loss needs.

    python bench/gpu_check.py --out results/gpu/gpu_check.json [--peak-gbs 3350] [--skip-compile]
    python bench/gpu_check.py --dry-run     # the same code paths at toy sizes on CPU (seconds)

Results go to results/gpu/ (``--out``; written atomically after every figure, with
``"complete": false`` until the last one, so a run cut short still leaves what it measured).
The last line of stdout is the same JSON object; a figure that fails is ``{"error": ...}`` and
the script exits 1, and without CUDA and without ``--dry-run`` it exits 2.

Details of every figure (``bf16_vs_fp32``, ``sdpa_kernels``, ``ddp_step``, ``decode_roofline``,
``sampler_vs_transformers``, ``kd_loss_memory``): docs/gpu-check.md.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_loss import fused_loss, make_inputs  # noqa: E402
from reference import reference_model  # noqa: E402

from data.batching import Batch  # noqa: E402
from model import SpeechLM, SpeechLMConfig, load_pretrained, phi4mm, toy  # noqa: E402
from model.decoder import attend, build_attention_mask  # noqa: E402
from model.lora import apply_lora, mark_trainable  # noqa: E402
from model.safeio import atomic_write_text  # noqa: E402
from rollout.sampler import SamplingParams, generate  # noqa: E402
from train.loop import StageForward, autocast_context  # noqa: E402
from train.stages import SFTStage  # noqa: E402

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
FIRST_TEXT_ID = 8  # random text ids start above the toy tokenizer's special ids
FRAMES_PER_AUDIO_TOKEN = 8


@dataclass(frozen=True)
class Sizes:
    """Every size the checks use: `gpu_sizes()` for the real run, `dry_run_sizes()` for CPU."""

    accuracy_model: SpeechLMConfig  # bf16_vs_fp32
    accuracy_batch: tuple[int, int, int]  # (rows, tokens per row, audio frames per clip)
    attention: tuple[int, int, int, int, int]  # (B, H, H_kv, T, D)
    ddp_model: SpeechLMConfig
    ddp_batch: tuple[int, int, int]  # (rows, response tokens, audio frames per clip)
    decode_model: SpeechLMConfig  # text only
    decode_tokens: tuple[int, int]  # (prompt, new)
    sampler_decoder: dict  # reference_model() sizes
    sampler_tokens: tuple[int, int, int, int]  # (batch, prompt, new, repeats)
    kd: tuple[int, int, int, int]  # (vocab, hidden, tokens, chunk)


def with_decoder(config: SpeechLMConfig, **decoder_sizes) -> SpeechLMConfig:
    return replace(config, decoder=replace(config.decoder, **decoder_sizes))


def gpu_sizes() -> Sizes:
    return Sizes(
        accuracy_model=with_decoder(toy(vocab_size=32000), hidden_size=1024, intermediate_size=4096, num_layers=8,
                                    num_heads=16, num_kv_heads=4, head_dim=64),
        accuracy_batch=(4, 256, 400),
        attention=(2, 24, 8, 1024, 128),
        ddp_model=toy(),
        ddp_batch=(2, 32, 128),
        decode_model=replace(phi4mm(), encoder=None),  # the Phi-4-mini decoder
        decode_tokens=(128, 256),
        sampler_decoder=dict(vocab=32000, hidden=1024, layers=8, heads=16, kv_heads=4),
        sampler_tokens=(8, 128, 128, 3),
        kd=(200064, 3072, 2048, 256),
    )


def dry_run_sizes() -> Sizes:
    return Sizes(
        accuracy_model=toy(),
        accuracy_batch=(2, 24, 32),
        attention=(1, 4, 2, 16, 32),
        ddp_model=toy(),
        ddp_batch=(2, 8, 32),
        decode_model=replace(toy(), encoder=None),
        decode_tokens=(8, 6),
        sampler_decoder=dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2),
        sampler_tokens=(8, 8, 6, 1),
        kd=(512, 64, 32, 16),
    )


# ---------------------------------------------------------------------------------------------
# helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds), the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def error_text(err: BaseException, limit: int = 300) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:limit]


def random_text(shape: tuple[int, ...], vocab: int, avoid: int, gen: torch.Generator) -> torch.Tensor:
    """Random ids in [FIRST_TEXT_ID, vocab), never `avoid` (the audio placeholder)."""
    ids = torch.randint(FIRST_TEXT_ID, vocab, shape, generator=gen)
    return ids.masked_fill(ids == avoid, FIRST_TEXT_ID)


def speech_prompts(config: SpeechLMConfig, rows: int, length: int, frames: int, gen: torch.Generator):
    """Rows of `length` ids: 4 text ids, one clip's placeholders, text; clip features (rows, frames, 80)."""
    audio_tokens = frames // FRAMES_PER_AUDIO_TOKEN
    input_ids = random_text((rows, length), config.decoder.vocab_size, config.audio_token_id, gen)  # (B, T)
    input_ids[:, 4 : 4 + audio_tokens] = config.audio_token_id
    features = torch.randn(rows, frames, config.encoder.input_size, generator=gen)  # (B, F, 80)
    return input_ids, features, torch.full((rows,), frames)


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Float32 reference logits (B, T, V) vs another precision's."""
    diff = (reference - other.float()).abs()
    agree = (reference.argmax(-1) == other.float().argmax(-1)).float().mean()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "argmax_agreement": agree.item()}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# 1. bf16 vs fp32 logits


def bf16_vs_fp32(device: torch.device, sizes: Sizes) -> dict:
    config = sizes.accuracy_model
    rows, length, frames = sizes.accuracy_batch
    torch.manual_seed(0)
    model = SpeechLM(config).to(device).eval()
    input_ids, features, lengths = (t.to(device) for t in speech_prompts(config, rows, length, frames,
                                                                          torch.Generator().manual_seed(0)))
    with torch.no_grad():
        fp32 = model(input_ids, None, features, lengths)  # (B, T, V)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            autocast = model(input_ids, None, features, lengths)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)(input_ids, None, features, lengths)
    decoder = config.decoder
    return {
        **compare_logits(fp32, bf16),
        "autocast": compare_logits(fp32, autocast),
        "logit_std": fp32.std().item(),
        "positions": rows * length,
        "model": f"decoder hidden {decoder.hidden_size}, {decoder.num_layers} layers, {decoder.num_heads}/"
                 f"{decoder.num_kv_heads} heads, vocab {decoder.vocab_size}; toy encoder; {frames}-frame clips",
    }


# ---------------------------------------------------------------------------------------------
# 2. which scaled_dot_product_attention backends run


def attention_cases(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int, int]) -> dict:
    """The three calls of `attend` the decoder makes, each a function of no arguments."""
    batch, heads, kv_heads, length, head_dim = shape
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, length, head_dim, generator=gen).to(device, dtype)  # (B, H, T, D)
    key = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(device, dtype)  # (B, H_kv, T, D)
    value = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(device, dtype)
    padding = torch.ones(batch, length, dtype=torch.long, device=device)  # (B, T)
    padding[0, : length // 4] = 0  # row 0 left-padded, as the sampler's prefill of unequal prompts
    mask = build_attention_mask(padding, 0, length, device)  # (B, 1, T, T) bool
    return {
        "causal_no_mask": lambda: attend(query, key, value, None),
        "padding_mask": lambda: attend(query, key, value, mask, expand_kv=False),
        "padding_mask_expand_kv": lambda: attend(query, key, value, mask, expand_kv=True),
    }


def probe_backends(call, device: torch.device) -> dict:
    """Run `call` with each backend alone: which work, why the others did not, the default pick."""
    works, why_not = {}, {}
    for name, backend in BACKENDS.items():
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
            warnings.simplefilter("always")
            try:
                call()
                synchronize(device)
                works[name] = True
            except RuntimeError as err:
                works[name] = False
                reasons = [str(w.message).strip() for w in caught] + [error_text(err)]
                why_not[name] = " | ".join(reasons)[:400]
    priority = [SDPBackend(i) for i in torch._C._get_sdp_priority_order()]
    default = next((name for backend in priority for name, b in BACKENDS.items() if b == backend and works[name]), None)
    return {**works, "default": default, "why_not": why_not}


def sdpa_kernels(device: torch.device, sizes: Sizes) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = attention_cases(device, dtype, sizes.attention)
    result = {name: probe_backends(call, device) for name, call in cases.items()}
    result["shape"] = "B, H, H_kv, T, D = " + ", ".join(map(str, sizes.attention)) + f", {dtype}"
    return result


# ---------------------------------------------------------------------------------------------
# 3. one DDP step of the SFT loss


def sft_batch(config: SpeechLMConfig, rows: int, response: int, frames: int) -> Batch:
    """Rows [4 text ids, clip placeholders, 8 text ids, response]; the loss on the response only."""
    prompt_length = 4 + frames // FRAMES_PER_AUDIO_TOKEN + 8
    input_ids, features, lengths = speech_prompts(config, rows, prompt_length + response, frames,
                                                  torch.Generator().manual_seed(0))
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[:, prompt_length:] = True
    return Batch([str(i) for i in range(rows)], input_ids, torch.ones_like(input_ids), loss_mask,
                 torch.full((rows,), prompt_length), features, lengths, [])


def ddp_step(device: torch.device, sizes: Sizes) -> dict:
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = SpeechLM(sizes.ddp_model)
        apply_lora(model, rank=8, alpha=16)
        mark_trainable(model, extra_prefixes=("projector.",))
        model.to(device).train()
        stage = SFTStage()
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(StageForward(model, stage), device_ids=device_ids, broadcast_buffers=False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        batch = sft_batch(sizes.ddp_model, *sizes.ddp_batch).to(device)

        def step() -> torch.Tensor:
            with autocast_context(device):
                loss_sum, _ = wrapped(batch)
            loss = loss_sum.float() / stage.loss_units(batch)
            loss.backward()
            optimizer.step()
            return loss.detach()

        loss, seconds = timed(step, device)
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in trainable if p.grad is not None)
        return {"backend": backend, "loss": loss.item(), "loss_finite": bool(torch.isfinite(loss)),
                "grads_finite": grads_finite, "trainable_parameters": sum(p.numel() for p in trainable),
                "seconds": seconds}
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# 4. batch-1 decode against the memory-bandwidth roofline


def decode_step_seconds(model, prompt: torch.Tensor, new: int, device: torch.device, repeats: int = 2) -> float:
    """Seconds per decode step: (a run of `new` tokens - a run of 1) / (new - 1), best of `repeats`."""
    def run(count: int):
        return generate(model, [prompt], SamplingParams(max_new_tokens=count, temperature=0.0, eos_token_ids=()))

    steps = []
    for _ in range(repeats):
        _, full = timed(lambda: run(new), device)
        _, prefill_only = timed(lambda: run(1), device)
        steps.append((full - prefill_only) / (new - 1))
    return min(steps)


def roofline(step_s: float, weight_bytes: int, peak_gbs: float) -> dict:
    achieved_gbs = weight_bytes / step_s / 1e9
    return {"step_ms": step_s * 1e3, "tokens_per_s": 1 / step_s, "achieved_gbs": achieved_gbs,
            "fraction_of_peak": achieved_gbs / peak_gbs}


def decode_model(device: torch.device, sizes: Sizes):
    """The random bf16 text decoder and a prompt: (model, prompt (P,), new tokens, weight bytes)."""
    config = sizes.decode_model
    prompt_length, new = sizes.decode_tokens
    torch.manual_seed(0)
    with torch.device(device):
        model = SpeechLM(config)
    model = model.to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied LM head once
    prompt = random_text((prompt_length,), config.decoder.vocab_size, config.audio_token_id,
                         torch.Generator().manual_seed(0)).to(device)
    return model, prompt, new, weight_bytes


def decode_roofline(device: torch.device, sizes: Sizes, peak_gbs: float) -> dict:
    model, prompt, new, weight_bytes = decode_model(device, sizes)
    generate(model, [prompt], SamplingParams(max_new_tokens=4, temperature=0.0, eos_token_ids=()))  # warm-up
    decoder = sizes.decode_model.decoder
    return {
        **roofline(decode_step_seconds(model, prompt, new, device), weight_bytes, peak_gbs),
        "weight_bytes": weight_bytes,
        "peak_gbs": peak_gbs,
        "model": f"decoder hidden {decoder.hidden_size}, {decoder.num_layers} layers, {decoder.num_heads}/"
                 f"{decoder.num_kv_heads} heads, vocab {decoder.vocab_size}, bf16; {prompt.numel()}-token prompt, "
                 f"{new} new tokens",
    }


def decode_roofline_compiled(device: torch.device, sizes: Sizes, peak_gbs: float) -> dict:
    """The same with torch.compile on the decoder forward; the first full run compiles. A
    compile failure is a result here (its text), not a failed check."""
    model, prompt, new, weight_bytes = decode_model(device, sizes)
    model.decoder.forward = torch.compile(model.decoder.forward)
    counters.clear()
    try:
        first = SamplingParams(max_new_tokens=new, temperature=0.0, eos_token_ids=())
        _, first_run_s = timed(lambda: generate(model, [prompt], first), device)
        generate(model, [prompt], replace(first, max_new_tokens=1))
        figures = roofline(decode_step_seconds(model, prompt, new, device), weight_bytes, peak_gbs)
    except Exception as err:
        return {"error": error_text(err, 1000)}
    return {**figures, "first_run_s": first_run_s, **compile_counters()}


def compile_counters() -> dict:
    """What dynamo did: graphs compiled and graph breaks, each of which falls back to eager in
    part (a break inside the layer loop runs the whole decoder forward eagerly)."""
    breaks = counters["graph_break"]
    return {"graphs_compiled": counters["stats"]["unique_graphs"], "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": [short_reason(reason) for reason in list(breaks)[:3]]}


def short_reason(reason: str) -> str:
    """Dynamo's headline and its 'Developer debug context' (the actual cause), on one line."""
    headline = reason.strip().splitlines()[0] if reason.strip() else ""
    _, _, context = reason.partition("Developer debug context:")
    context = context.strip().splitlines()[0] if context.strip() else ""
    return f"{headline}: {context}"[:300] if context else headline[:300]


# ---------------------------------------------------------------------------------------------
# 5. our sampler vs transformers' generate()


def sampler_vs_transformers(device: torch.device, sizes: Sizes) -> dict:
    if importlib.util.find_spec("transformers") is None:
        return {"skipped": "transformers is not installed"}
    batch, prompt_length, new, repeats = sizes.sampler_tokens
    dims = sizes.sampler_decoder
    dtype = torch.bfloat16
    reference = reference_model(vocab=dims["vocab"], hidden=dims["hidden"], layers=dims["layers"],
                                heads=dims["heads"], kv_heads=dims["kv_heads"], original_max=4096).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        ours = load_pretrained(directory, dtype=dtype, device=device).eval()
    reference = reference.to(device=device, dtype=dtype)
    input_ids = random_text((batch, prompt_length), dims["vocab"], dims["vocab"] - 1,
                            torch.Generator().manual_seed(0)).to(device)  # (B, P), no padding
    prompts = list(input_ids)

    def run_ours(count: int):
        return generate(ours, prompts, SamplingParams(max_new_tokens=count, temperature=0.0, eos_token_ids=()))

    def run_transformers(count: int):
        with torch.no_grad():
            return reference.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)

    run_ours(2)  # warm-up
    run_transformers(2)
    ours_times, hf_times = [], []
    for _ in range(repeats):  # alternate, so background load hits both alike
        rollout, elapsed = timed(lambda: run_ours(new), device)
        ours_times.append(elapsed)
        hf_out, elapsed = timed(lambda: run_transformers(new), device)
        hf_times.append(elapsed)
    ours_rate = batch * new / statistics.median(ours_times)
    hf_rate = batch * new / statistics.median(hf_times)
    return {
        "ours_tokens_per_s": ours_rate,
        "transformers_tokens_per_s": hf_rate,
        "speedup": ours_rate / hf_rate,
        "token_agreement": (rollout.tokens == hf_out[:, prompt_length:]).float().mean().item(),
        "model": f"decoder hidden {dims['hidden']}, {dims['layers']} layers, {dims['heads']}/{dims['kv_heads']} heads, "
                 f"vocab {dims['vocab']}, bf16; batch {batch} x {prompt_length}-token prompts, {new} new tokens",
    }


# ---------------------------------------------------------------------------------------------
# 6. peak memory of the fused KD loss


def kd_loss_peak(device: torch.device, teacher: str, vocab: int, hidden: int, tokens: int, chunk: int) -> dict:
    """One fused loss + backward, the inputs of bench/kd_loss.py moved to `device`."""
    student_hidden, lm_head_weight, mask, teacher_inputs = make_inputs(
        SimpleNamespace(vocab=vocab, hidden=hidden, tokens=tokens), teacher)
    tensors = [t.to(device) for t in (student_hidden, lm_head_weight, mask, *teacher_inputs)]
    del student_hidden, lm_head_weight, teacher_inputs
    student_hidden, lm_head_weight, mask, *teacher_inputs = tensors
    student_hidden.requires_grad_(True)
    input_bytes = sum(t.numel() * t.element_size() for t in tensors)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else None
    loss = fused_loss(student_hidden, lm_head_weight, mask, teacher, tuple(teacher_inputs), chunk)
    loss.backward()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None  # not measured on CPU
    return {"loss": loss.item(), "loss_finite": bool(torch.isfinite(loss)), "input_bytes": input_bytes,
            "peak_bytes": peak, "peak_above_inputs_bytes": None if peak is None else peak - before}


def kd_loss_memory(device: torch.device, sizes: Sizes) -> dict:
    vocab, hidden, tokens, chunk = sizes.kd
    by_teacher = {}
    for teacher in ("head", "topk"):
        by_teacher[teacher] = kd_loss_peak(device, teacher, vocab, hidden, tokens, chunk)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        **by_teacher,
        "peak_measured": device.type == "cuda",
        "naive_logits_bytes": tokens * vocab * 4,  # one [N, V] float32 tensor
        "chunk_logits_bytes": chunk * vocab * 4,  # one (chunk, V) float32 tensor
        "sizes": f"V={vocab}, H={hidden}, N={tokens} tokens, chunk {chunk}, float32"
                 + ("" if device.type == "cuda" else "; CPU dry run: peak memory not measured (null)"),
    }


# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def put(report: dict, key: tuple[str, ...], value) -> None:
    """report[key[0]][key[1]]... = value (the parents exist)."""
    for part in key[:-1]:
        report = report[part]
    report[key[-1]] = value


def get(report: dict, key: tuple[str, ...]):
    for part in key:
        report = report[part]
    return report


def write_report(path: str | None, report: dict) -> None:
    if path:
        atomic_write_text(path, json.dumps(report, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU: exercise the code paths")
    parser.add_argument("--out", help="also write the JSON here (e.g. results/gpu/gpu_check.json)")
    parser.add_argument("--peak-gbs", type=float, default=3350.0, help="peak memory bandwidth, GB/s (H100 SXM)")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile decode run")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.exit(2, "gpu_check: needs a CUDA GPU and none is visible; on CPU run it with --dry-run\n")

    start = time.perf_counter()
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    sizes = dry_run_sizes() if args.dry_run else gpu_sizes()
    skip_compile = "dry run" if args.dry_run else "--skip-compile" if args.skip_compile else ""
    checks = [  # (where the result goes in the report, the check); the biggest model last
        (("bf16_vs_fp32",), lambda: bf16_vs_fp32(device, sizes)),
        (("sdpa_kernels",), lambda: sdpa_kernels(device, sizes)),
        (("ddp_step",), lambda: ddp_step(device, sizes)),
        (("kd_loss_memory",), lambda: kd_loss_memory(device, sizes)),
        (("sampler_vs_transformers",), lambda: sampler_vs_transformers(device, sizes)),
        (("decode_roofline",), lambda: decode_roofline(device, sizes, args.peak_gbs)),
        (("decode_roofline", "compiled"),
         (lambda: {"skipped": f"skipped ({skip_compile})"}) if skip_compile
         else lambda: decode_roofline_compiled(device, sizes, args.peak_gbs)),
    ]
    report = {"device": device_name(device), "dry_run": args.dry_run, "torch": torch.__version__,
              "complete": False, "seconds": 0.0}
    failed = []
    for key, check in checks:
        label = ".".join(key)
        put(report, key, {"error": "did not finish: the run ended during this check"})
        write_report(args.out, report)
        print(f"[gpu_check] {label} ...", flush=True)
        check_start = time.perf_counter()
        try:
            put(report, key, check())
        except Exception as err:  # one failed figure must not lose the others
            put(report, key, {"error": error_text(err, 1000)})
            failed.append(label)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        outcome = f"FAILED {get(report, key)['error']}" if label in failed else "done"
        print(f"[gpu_check] {label}: {outcome} ({time.perf_counter() - check_start:.1f} s)", flush=True)
        report["seconds"] = time.perf_counter() - start
    report["complete"] = True
    write_report(args.out, report)
    print(json.dumps(report))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
