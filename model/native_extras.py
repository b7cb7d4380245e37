"""What a transformers-native checkpoint keeps outside its weights: the speech LoRA and the stop ids.

transformers' Phi-4MM converter (the hub's `refs/pr/70` layout) drops every LoRA tensor from
`model.safetensors` and the `speech_lora` entry from config.json. It writes the speech adapter
as a peft folder beside the weights instead:

    speech-lora/adapter_config.json         {"r": 320, "lora_alpha": 640, "target_modules": ...}
    speech-lora/adapter_model.safetensors   model.layers.N.self_attn.qkv_proj.lora_A.weight, ...

(keys with or without peft's `base_model.model.` prefix, and with or without the original
`.speech` adapter name, are all read). Without that adapter the model is Phi-4-mini with an
audio encoder it was never tuned to listen to, so `speech_lora_tensors` reports its absence
and `load_pretrained` says so in one warning line.

The converter also writes `eos_token_id: 199999` alone into config.json; `<|end|>` (200020),
where every chat turn stops, is only in `generation_config.json`. `generation_eos_ids` reads
it, so rollouts on such a checkpoint stop where the reference model's `generate` stops.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

SPEECH_LORA_DIR = "speech-lora"
GENERATION_CONFIG = "generation_config.json"
_ADAPTER_KEY = re.compile(r"(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.speech)?\.weight")


class NativeExtrasError(ValueError):
    """A speech-lora/ folder or generation_config.json that cannot be read; names the file."""


def speech_lora_tensors(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], float, int] | None:
    """The `speech-lora/` adapter beside a native checkpoint: (module -> {"A", "B"}, scale, rank), or None.

    Module names are the native ones (`model.layers.3.mlp.down_proj`); scale is alpha / r, or
    alpha / sqrt(r) for an rsLoRA adapter (peft's `use_rslora`).
    """
    folder = path / SPEECH_LORA_DIR
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not folder.is_dir():
        return None
    for required in (config_file, weights_file):
        if not required.is_file():
            raise NativeExtrasError(f"{required}: missing; a {SPEECH_LORA_DIR}/ folder needs adapter_config.json "
                                    "and adapter_model.safetensors (copy both from the converted checkpoint)")
    config = _read_json(config_file)
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise NativeExtrasError(f"{config_file}: needs numeric 'r' and 'lora_alpha' fields") from None
    if rank <= 0:
        raise NativeExtrasError(f"{config_file}: 'r' must be positive, got {rank}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    from safetensors import safe_open  # the loader's reader; imported here to keep this module light

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file), framework="pt", device="cpu") as handle:
        for key in handle.keys():
            match = _ADAPTER_KEY.fullmatch(key)
            if match is None:
                raise NativeExtrasError(f"{weights_file}: {key!r} is not a LoRA weight "
                                        "(expected '<module>.lora_A.weight' / '<module>.lora_B.weight')")
            pairs.setdefault(match.group(1), {})[match.group(2)] = handle.get_tensor(key)
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise NativeExtrasError(f"{weights_file}: {module} has lora_{''.join(pair)} but not its partner")
        if pair["A"].shape[0] != rank or pair["B"].shape[1] != rank:
            raise NativeExtrasError(f"{weights_file}: {module} has A {tuple(pair['A'].shape)} and B "
                                    f"{tuple(pair['B'].shape)}, but adapter_config.json says r = {rank}")
    return pairs, scale, rank


def generation_eos_ids(path: Path) -> tuple[int, ...]:
    """`eos_token_id` of `generation_config.json` (an int or a list), () when the file is absent."""
    file = path / GENERATION_CONFIG
    if not file.is_file():
        return ()
    eos = _read_json(file).get("eos_token_id")
    if eos is None:
        return ()
    values = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(v, int) for v in values):
        raise NativeExtrasError(f"{file}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return tuple(values)


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise NativeExtrasError(f"{file}, line {err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise NativeExtrasError(f"{file}: expected a JSON object")
    return value
