"""save_pretrained: a SpeechLM as a transformers-native checkpoint directory.

The weights use transformers' `Phi4MultimodalForCausalLM` names (so transformers and this
project's loader both read them); config.json carries the native fields, the legacy fields
transformers 4.x reads, and this project's exact config under "speechsum". Everything is
written into a temporary directory that then replaces the target whole, keeping the files of
the old directory that save_pretrained does not own (a tokenizer, notes).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import INDEX_FILE, ours_to_native
from .config import SpeechLMConfig
from .lora import lora_modules
from .safeio import atomic_save_safetensors, atomic_write_text, replace_directory
from .speech_lm import SpeechLM


VISION_PLACEHOLDER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 28, "crop_size": 28, "patch_size": 14}


def native_config(config: SpeechLMConfig) -> dict:
    """A transformers-native config.json for `config`, plus our exact config under "speechsum"."""
    dec = config.decoder
    rope: dict = {"rope_type": dec.rope_type, "rope_theta": dec.rope_theta,
                  "partial_rotary_factor": dec.partial_rotary_factor}
    if dec.rope_type == "longrope":
        rope.update(short_factor=dec.short_factor, long_factor=dec.long_factor)
        if dec.rope_attention_factor is not None:
            rope["attention_factor"] = dec.rope_attention_factor
    out = {
        "model_type": "phi4_multimodal",
        "architectures": ["Phi4MultimodalForCausalLM"],
        "vocab_size": dec.vocab_size,
        "hidden_size": dec.hidden_size,
        "intermediate_size": dec.intermediate_size,
        "num_hidden_layers": dec.num_layers,
        "num_attention_heads": dec.num_heads,
        "num_key_value_heads": dec.num_kv_heads,
        "rms_norm_eps": dec.rms_norm_eps,
        "max_position_embeddings": dec.max_position_embeddings,
        "original_max_position_embeddings": dec.original_max_position_embeddings,
        "rope_parameters": rope,
        # transformers 4.x reads these instead (without them it takes no LongRoPE and a full rotary
        # dimension, and its logits drift by ~0.5); 5.x reads rope_parameters and ignores them
        "rope_theta": dec.rope_theta,
        "partial_rotary_factor": dec.partial_rotary_factor,
        "rope_scaling": ({"type": "longrope", "short_factor": dec.short_factor, "long_factor": dec.long_factor}
                         if dec.rope_type == "longrope" else None),
        "tie_word_embeddings": dec.tie_word_embeddings,
        "bos_token_id": dec.bos_token_id,
        "eos_token_id": list(dec.eos_token_ids),
        "pad_token_id": dec.pad_token_id,
        "speechsum": config.to_dict(),
        # this project keeps no vision tower; transformers 4.57 cannot even print a config without
        # one, so a one-layer placeholder (random weights wherever it is built) stands in
        "vision_config": dict(VISION_PLACEHOLDER),
    }
    if config.encoder is not None:
        enc = config.encoder
        out["audio_config"] = {
            "hidden_size": enc.hidden_size, "intermediate_size": enc.intermediate_size,
            "num_blocks": enc.num_blocks, "num_attention_heads": enc.num_heads, "input_size": enc.input_size,
            "kernel_size": enc.kernel_size, "nemo_conv_channels": enc.nemo_conv_channels,
            "time_reduction": enc.time_reduction, "bias_max_distance": enc.bias_max_distance,
            "bias_symmetric": enc.bias_symmetric, "ext_pw_out_channel": enc.ext_pw_out_channel,
            "depthwise_separable_out_channel": enc.depthwise_separable_out_channel,
            "depthwise_multiplier": enc.depthwise_multiplier, "chunk_size": enc.chunk_size,
            "left_chunk": enc.left_chunk, "downsample_rate": enc.downsample_rate,
            "audio_token_id": config.audio_token_id,
        }
    return out


def save_pretrained(model: SpeechLM, path, *, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json and native-layout safetensors (sharded above `max_shard_bytes`)."""
    if lora_modules(model):
        raise ValueError("save_pretrained: the model has LoRA adapters; fold them in with "
                         "model.lora.merge_and_remove_lora(model) or save them with model.lora.save_adapter")
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_weights(model, tmp, max_shard_bytes)
    atomic_write_text(tmp / "config.json", json.dumps(native_config(model.config), indent=1))
    # keep what else the directory holds (a tokenizer, notes); the weights and config are replaced
    if path.is_dir():
        for item in path.iterdir():
            if not _owned_by_save(item.name):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    replace_directory(tmp, path)  # a crash leaves either the old checkpoint or the new one, never a mix


def _owned_by_save(name: str) -> bool:
    return name.endswith(".safetensors") or name in (INDEX_FILE, "config.json")


def _write_weights(model: SpeechLM, path: Path, max_shard_bytes: int) -> None:
    state = model.state_dict()
    if model.config.decoder.tie_word_embeddings:
        state.pop("decoder.lm_head.weight")
    write_safetensors({ours_to_native(k): v for k, v in state.items()}, path, max_shard_bytes)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int) -> None:
    """`tensors` as model.safetensors, or as numbered shards + model.safetensors.index.json above
    `max_shard_bytes` (the layout transformers and vLLM read); every file written atomically."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_save_safetensors(shard, path / name, metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(path / INDEX_FILE, json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=1))
