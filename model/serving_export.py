"""Export a fine-tuned model for serving: the original Phi-4MM layout with one speech LoRA.

Every stage here merges its LoRA into the weights it hands on, so the final model is the hub
base + the hub's speech LoRA + the SFT, KD and DPO deltas, a base that exists nowhere else.
A stock server (vLLM's `Phi4MMForCausalLM`) loads the hub base *without* any LoRA (it skips
every weight whose name contains "lora") and applies the speech adapter per request
(`--enable-lora --lora-modules speech=DIR/speech-lora`). So the export writes what that server
reads, in the layout of the hub checkpoint it started from (`source`):

* the decoder's LoRA targets (qkv_proj, o_proj, gate_up_proj, down_proj of every layer) keep the
  hub's base weights as `*.base_layer.weight`; everything they changed, speech LoRA and every
  stage's delta together, becomes one low-rank adapter
      W_ours - W_hub_base = B A,   B: (out, R), A: (R, in),   alpha = R (scale 1),
  factored by a truncated SVD (exact when the stages' ranks add up to at most R: the default R
  is the hub's speech rank + `extra_rank`, 320 + 64 for the paper's three rank-16 stages);
* that adapter twice: as `lora_A.speech` / `lora_B.speech` in the weights (the hub's own
  remote code and this project's loader merge it) and as a peft folder `speech-lora/` (keys
  `base_model.model.model.layers.N.<proj>.lora_{A,B}.weight`, `r` = `lora_alpha` = R), which
  vLLM loads with `--max-lora-rank` at least R (`vllm_max_lora_rank` gives the flag's value);
* every other weight (projector, encoder, embeddings, norms) is the fine-tuned one under the
  hub's name, so a trained projector is served as trained; the vision tower, its LoRA and its
  projector are copied from `source`, because vLLM refuses a checkpoint with uninitialised
  weights; so are the tokenizer, processor and generation configs, the remote-code files and
  `vision-lora/`. config.json is the source's with `speech_lora.r` / `lora_alpha` set to R.

The truncation's relative error ||delta - B A||_F / ||delta||_F is measured per module and the
export is refused above `tolerance` (a model merged in bf16 carries bf16 rounding in its delta,
which no rank removes: raise the tolerance for it knowingly). Weights are written in the
source's dtype, atomically, into a directory that replaces `out` whole.

CLI: python -m model.serving_export --checkpoint runs/dpo/merged --source PHI4MM_DIR --out served
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import INDEX_FILE, CheckpointError, checkpoint_files, classify_key, load_pretrained, open_weights
from .checkpoint_save import write_safetensors
from .lora import lora_modules
from .native_extras import SPEECH_LORA_DIR
from .safeio import atomic_save_safetensors, atomic_write_text, replace_directory

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
HUB_TARGET_MODULES = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"


@dataclass
class ExportReport:
    rank: int  # R of the written adapter
    max_relative_error: float  # max over modules of ||delta - B A||_F / ||delta||_F
    modules: int  # modules carrying the adapter
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def vllm_max_lora_rank(self) -> int:
        return vllm_max_lora_rank(self.rank)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that holds an adapter of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every unmerged LoRA folded into its base weight (the model is not changed)."""
    state = dict(model.state_dict())
    for name, module in lora_modules(model).items():
        state.pop(f"{name}.lora_a"), state.pop(f"{name}.lora_b")
        if not module.merged:
            state[f"{name}.weight"] = module.weight.float() + module.delta_weight()
    return state


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B (out, R), A (R, in) with B A the best rank-R approximation of `delta` (float32), and its
    relative Frobenius error. Exact SVD for small matrices, a seeded randomized one otherwise."""
    delta = delta.float()
    norm = torch.linalg.matrix_norm(delta).item()
    if min(delta.shape) <= 2 * rank + 16:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(delta, q=rank + 16, niter=4)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    lora_b, lora_a = u * s, vh.contiguous()
    error = torch.linalg.matrix_norm(delta - lora_b @ lora_a).item()
    return lora_b.contiguous(), lora_a, (error / norm if norm > 0 else 0.0)


def export_for_serving(model: nn.Module, source: str | Path, out: str | Path, *, rank: int | None = None,
                       extra_rank: int = 64, tolerance: float = 1e-3,
                       max_shard_bytes: int = 5 * 1024**3) -> ExportReport:
    """Write `model` as the original layout of `source` with one combined speech LoRA (module docstring)."""
    source, out = Path(source), Path(out)
    source_config = _original_config(source)
    speech = source_config.get("speech_lora") or {}
    ours = effective_weights(model)
    files = checkpoint_files(source)
    targets = _speech_lora_targets(files)
    if rank is None:
        rank = int(speech.get("r", 0)) + extra_rank
    tensors, errors = {}, {}
    for file, keys in files.items():
        with open_weights(source / file) as handle:
            for key in keys:
                kind, our_key = classify_key(key)
                if kind == "speech_lora":
                    continue  # replaced by the combined adapter below
                tensor = handle.get_tensor(key)
                if kind == "skip":
                    tensors[key] = tensor  # vision: carried unchanged
                    continue
                if our_key is None or our_key not in ours:
                    raise CheckpointError(f"{source / file}: {key!r} maps to nothing in the fine-tuned model; "
                                          "was the model fine-tuned from this source checkpoint?")
                mine = ours[our_key]
                if tuple(mine.shape) != tuple(tensor.shape):
                    raise CheckpointError(f"{source / file}: {key!r} has shape {tuple(tensor.shape)}, the fine-tuned "
                                          f"model's {our_key} {tuple(mine.shape)}: not the source of this model")
                module = key.replace(".base_layer.", ".")[: -len(".weight")]
                if module not in targets:
                    tensors[key] = mine.detach().to(tensor.dtype).contiguous()
                    continue
                tensors[key] = tensor  # the hub base; the change goes into the adapter
                width = min(rank, *tensor.shape)
                lora_b, lora_a, errors[module] = low_rank_factors(mine.detach().float() - tensor.float(), width)
                pad = rank - width  # zero rows/columns keep one rank R for every module
                tensors[f"{module}.lora_A.speech.weight"] = torch.cat(
                    [lora_a, lora_a.new_zeros(pad, lora_a.shape[1])]).to(tensor.dtype)
                tensors[f"{module}.lora_B.speech.weight"] = torch.cat(
                    [lora_b, lora_b.new_zeros(lora_b.shape[0], pad)], dim=1).to(tensor.dtype)
    missing = set(targets) - set(errors)
    if missing:
        raise CheckpointError(f"{source}: speech LoRA on {sorted(missing)[:3]} without a base_layer weight")
    report = ExportReport(rank, max(errors.values(), default=0.0), len(errors), errors)
    if report.max_relative_error > tolerance:
        worst = max(errors, key=errors.get)
        raise ValueError(f"export_for_serving: a rank-{rank} adapter leaves a relative error of "
                         f"{errors[worst]:.2e} on {worst} (tolerance {tolerance:g}); raise the rank (extra_rank) or, "
                         "for weights merged in bf16 whose rounding no rank removes, the tolerance")
    _write_directory(source, out, source_config, tensors, rank, max_shard_bytes)
    return report


def _original_config(source: Path) -> dict:
    config_file = source / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found; --source is the original-layout Phi-4MM checkpoint")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "phi4mm" and "embd_layer" not in config:
        raise CheckpointError(f"{config_file}: model_type {config.get('model_type')!r} is not the original layout "
                              "('phi4mm', the hub's main branch of microsoft/Phi-4-multimodal-instruct), which is "
                              "the layout vLLM serves with a speech LoRA")
    return config


def _speech_lora_targets(files: dict[str, list[str]]) -> set[str]:
    """Modules (original names, without base_layer) that carry a speech LoRA in the source."""
    targets = set()
    for keys in files.values():
        for key in keys:
            if key.endswith(".lora_A.speech.weight"):
                targets.add(key[: -len(".lora_A.speech.weight")])
    if not targets:
        raise CheckpointError("the source checkpoint has no lora_A.speech weights: it is not the original layout")
    return targets


def _write_directory(source: Path, out: Path, config: dict, tensors: dict, rank: int, max_shard_bytes: int) -> None:
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in source.iterdir():  # tokenizer, processor and generation configs, remote code, vision-lora/
        if item.name.endswith(".safetensors") or item.name in (INDEX_FILE, "config.json", SPEECH_LORA_DIR):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    config = dict(config)
    config["speech_lora"] = {**(config.get("speech_lora") or {}), "r": rank, "lora_alpha": rank}
    atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
    write_safetensors(tensors, tmp, max_shard_bytes)
    adapter = {f"base_model.model.{key.replace('.speech.', '.')}": value
               for key, value in tensors.items() if ".lora_A.speech." in key or ".lora_B.speech." in key}
    (tmp / SPEECH_LORA_DIR).mkdir()
    atomic_save_safetensors(adapter, tmp / SPEECH_LORA_DIR / "adapter_model.safetensors", metadata={"format": "pt"})
    atomic_write_text(tmp / SPEECH_LORA_DIR / "adapter_config.json", json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(out.resolve()),
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "target_modules": HUB_TARGET_MODULES,
        "fan_in_fan_out": False, "inference_mode": True}, indent=2))
    replace_directory(tmp, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the fine-tuned model (e.g. runs/dpo/merged)")
    parser.add_argument("--source", required=True, help="the original-layout Phi-4MM checkpoint it started from")
    parser.add_argument("--out", required=True, help="directory to write (replaced whole)")
    parser.add_argument("--rank", type=int, default=None, help="adapter rank R (default: source speech rank + 64)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max relative error of the factorization")
    args = parser.parse_args(argv)
    try:
        model = load_pretrained(args.checkpoint)
        report = export_for_serving(model, args.source, args.out, rank=args.rank, tolerance=args.tolerance)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: speech LoRA rank {report.rank} on {report.modules} modules, max relative error "
          f"{report.max_relative_error:.2e}\nserve with: vllm serve {args.out} --trust-remote-code --enable-lora "
          f"--max-lora-rank {report.vllm_max_lora_rank} --lora-modules speech={args.out}/{SPEECH_LORA_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
