"""LoRA: low-rank adapters on frozen Linear layers (Hu et al. 2021), torchtune-style.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A: (r, in), B: (out, r)

* A is Kaiming-uniform initialised (as nn.Linear and peft do), B is zero, so a fresh adapter
  leaves the model unchanged; dropout acts on the LoRA branch only.
* `LoRALinear`'s state dict is the wrapped Linear's `weight` (+ `bias`) plus `lora_a` and
  `lora_b`, so a base checkpoint loads into an adapted model key for key.
* merge: W <- W + (alpha / r) B A, unmerge subtracts it again (exact up to float rounding; into
  bf16 base weights the update is rounded to bf16, as any merged bf16 checkpoint is);
  `disabled` turns the branch off, which gives the reference model of DPO for free.
* The paper's adapters: rank 16, alpha 32, on every decoder projection; the public
  checkpoint's own speech LoRA (r 320, alpha 640) is merged at load time (model/checkpoint.py).
* `export_peft` writes `adapter_config.json` + `adapter_model.safetensors` with the key names
  peft expects for transformers' `Phi4MultimodalForCausalLM`, so an adapter trained here loads
  with `PeftModel.from_pretrained` onto the transformers model.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .safeio import atomic_save_safetensors, atomic_write_text

# The paper's targets: every projection of every decoder layer (the names of model/decoder.py).
DECODER_TARGETS = r"decoder\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.weight = base.weight
        self.bias = base.bias
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # A
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # B
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A, the update merged into W; computed in float32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # x W^T + b
        if self.merged:
            if self.disabled:
                raise RuntimeError("a merged LoRA layer cannot be disabled; call unmerge_lora(model) first")
            return out
        if self.disabled:
            return out
        # the factors may be kept in float32 while the base weights are bf16 (train/recipe.py)
        lora_hidden = F.linear(self.dropout(x), self.lora_a.to(x.dtype))  # dropout(x) A^T, (..., r)
        return out + F.linear(lora_hidden, self.lora_b.to(x.dtype)) * self.scale  # + (alpha/r) (.) B^T

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(model: nn.Module, target_regex: str = DECODER_TARGETS, rank: int = 16, alpha: float = 32.0,
               dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose qualified name fully matches `target_regex`; return their names."""
    pattern = re.compile(target_regex)
    targets = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and pattern.fullmatch(name)
    ]
    if not targets:
        raise ValueError(f"apply_lora: no nn.Linear matches {target_regex!r}; check the module names")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_trainable(model: nn.Module, extra_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Freeze everything but LoRA A/B and parameters under `extra_prefixes` (e.g. "projector.")."""
    trainable = []
    for name, param in model.named_parameters():
        is_lora = name.endswith(".lora_a") or name.endswith(".lora_b")
        param.requires_grad_(is_lora or name.startswith(extra_prefixes))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def merge_lora(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.unmerge()


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model (the DPO reference) inside the block: every adapter switched off."""
    modules = lora_modules(model).values()
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.disabled = was


def merge_and_remove_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put plain nn.Linear layers back.

    Used between training stages: the finished stage's LoRA becomes part of the base model and
    the next stage starts a fresh adapter on top.
    """
    for name, module in lora_modules(model).items():
        module.merge()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        linear.weight = module.weight
        if module.bias is not None:
            linear.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed as in model.state_dict()."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(".lora_a") or k.endswith(".lora_b")}


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Adapter tensors as safetensors plus a small JSON of rank/alpha per module (atomic write)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    modules = lora_modules(model)
    meta = {name: {"rank": m.rank, "alpha": m.alpha} for name, m in modules.items()}
    tensors = {k: v.detach().contiguous() for k, v in adapter_state_dict(model).items()}
    atomic_save_safetensors(tensors, path / "adapter.safetensors")
    atomic_write_text(path / "adapter.json", json.dumps(meta, indent=1))


def load_adapter(model: nn.Module, path: str | Path, dropout: float = 0.0) -> None:
    """Apply (if needed) and fill the adapters saved by `save_adapter`."""
    path = Path(path)
    meta_file, tensor_file = path / "adapter.json", path / "adapter.safetensors"
    for required in (meta_file, tensor_file):
        if not required.is_file():
            raise FileNotFoundError(f"{required} not found: expected a directory written by save_adapter")
    meta = json.loads(meta_file.read_text())
    existing = lora_modules(model)
    for name, spec in meta.items():
        if name not in existing:
            apply_lora(model, re.escape(name), spec["rank"], spec["alpha"], dropout)
    tensors = load_file(str(tensor_file))
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{tensor_file}: adapter keys do not match the model; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------------------------------------
# PEFT export (transformers' Phi4MultimodalForCausalLM module names)

def _peft_module_name(name: str) -> str:
    """Our module name -> transformers' (decoder.layers.3.mlp.down_proj -> model.layers.3.mlp.down_proj)."""
    if not name.startswith("decoder.layers."):
        raise ValueError(f"PEFT export supports adapters on decoder layers only, not {name!r}")
    return "model." + name[len("decoder."):]


def export_peft(model: nn.Module, path: str | Path, base_model_name_or_path: str = "") -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` loadable by peft.

    Keys: `base_model.model.{transformers module}.lora_A.weight` (r, in) and `.lora_B.weight`
    (out, r). `target_modules` is a regex over the exact module names, so the speech encoder's
    own `o_proj` layers are never matched by accident.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("export_peft: the model has no LoRA layers")
    ranks = {(m.rank, m.alpha) for m in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"export_peft: peft needs one rank/alpha for all modules, found {sorted(ranks)}")
    (rank, alpha), = ranks
    dropouts = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for m in modules.values()}
    tensors, names = {}, []
    for name, module in modules.items():
        peft_name = _peft_module_name(name)
        names.append(peft_name)
        tensors[f"base_model.model.{peft_name}.lora_A.weight"] = module.lora_a.detach().contiguous()
        tensors[f"base_model.model.{peft_name}.lora_B.weight"] = module.lora_b.detach().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "bias": "none",
        "target_modules": "|".join(re.escape(n) for n in names),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path / "adapter_model.safetensors")
    atomic_write_text(path / "adapter_config.json", json.dumps(config, indent=2))

