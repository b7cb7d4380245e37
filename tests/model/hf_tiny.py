"""Tiny random transformers Phi-4MM checkpoints, the parity oracle of the model tests.

transformers is imported here, in tests only; library code never imports it. Every parameter
is perturbed after construction (norm weights start at one, some projections at zero), so a
wrong split, a swapped gate/up or a missing scale shows up as a difference.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 300
AUDIO_TOKEN = VOCAB - 1  # the placeholder must lie inside the tiny vocabulary


def longrope(rotary_dim: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    half = rotary_dim // 2
    return {
        "short_factor": (1 + torch.rand(half, generator=gen)).tolist(),
        "long_factor": (2 + 4 * torch.rand(half, generator=gen)).tolist(),
    }


def tiny_config(
    hidden=64, heads=4, kv_heads=2, layers=2, partial=0.75, rope_type="longrope", original_max=32,
    max_positions=256, tie=True, seed=0, audio_blocks=1,
):
    head_dim = hidden // heads
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "partial_rotary_factor": partial}
    if rope_type == "longrope":
        rope.update(longrope(int(head_dim * partial), seed))
    return transformers.Phi4MultimodalConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        original_max_position_embeddings=original_max, rope_parameters=rope, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=[2], pad_token_id=0,
        audio_config=dict(
            hidden_size=32, intermediate_size=48, num_blocks=audio_blocks, num_attention_heads=2,
            nemo_conv_channels=8, ext_pw_out_channel=32, depthwise_separable_out_channel=32,
            bias_max_distance=20, audio_token_id=AUDIO_TOKEN,
        ),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, crop_size=28, patch_size=14),
        attn_implementation="eager",
    )


def random_model(config, seed=0):
    """A transformers Phi4MultimodalForCausalLM in eval mode with every tensor randomised."""
    torch.manual_seed(seed)
    model = transformers.Phi4MultimodalForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                scale = 0.5 if name.endswith("norm.weight") or "layer_norm" in name else 0.05
                if ".encoder.embed." in name:
                    scale = 0.5  # the subsampling convs: keep the audio signal well above the biases
                tensor.add_(scale * torch.randn_like(tensor))
    return model


def random_ids(batch, length, seed=0):
    """Token ids that avoid the special ids 0-2 and the audio placeholder."""
    return torch.randint(3, VOCAB - 1, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, input_ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


# ---------------------------------------------------------------------------------------------
# the original remote-code layout, made from a native checkpoint

ORIGINAL_RENAMES = [  # native -> original (the inverse of transformers' conversion script)
    (r"(.*\.encoders\.\d+\.feed_forward_(?:in|out))\.gate_up_proj\.(.*)", r"\1.net.0.linear.\2"),
    (r"(.*\.encoders\.\d+\.feed_forward_(?:in|out))\.down_proj\.(.*)", r"\1.net.2.\2"),
    (r"(.*\.encoders\.\d+\.self_attn)\.([qkv])_proj\.(.*)", r"\1.linear_\2.\3"),
    (r"(.*\.encoders\.\d+\.self_attn)\.o_proj\.(.*)", r"\1.linear_out.\2"),
    (r"(.*\.audio_embed)\.up_proj_for_speech\.(.*)", r"\1.audio_projection.speech.0.\2"),
    (r"(.*\.audio_embed)\.down_proj_for_speech\.(.*)", r"\1.audio_projection.speech.2.\2"),
    (r"(.*\.audio_embed)\.up_proj_for_vision_speech\.(.*)", r"\1.audio_projection.vision.0.\2"),
    (r"(.*\.audio_embed)\.down_proj_for_vision_speech\.(.*)", r"\1.audio_projection.vision.2.\2"),
]
DECODER_LORA_TARGET = re.compile(r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))")


def to_original_key(native_key: str) -> str:
    for pattern, replacement in ORIGINAL_RENAMES:
        if re.fullmatch(pattern, native_key):
            return re.sub(pattern, replacement, native_key)
    return native_key


def original_keys(native_shapes: dict[str, tuple], rank: int) -> dict[str, tuple]:
    """Key -> shape of the original layout: renamed encoder, LoRA-wrapped decoder projections."""
    out = {}
    for key, shape in native_shapes.items():
        module = key[: -len(".weight")]
        if DECODER_LORA_TARGET.fullmatch(module):
            out[f"{module}.base_layer.weight"] = shape
            for adapter in ("speech", "vision"):
                out[f"{module}.lora_A.{adapter}.weight"] = (rank, shape[1])
                out[f"{module}.lora_B.{adapter}.weight"] = (shape[0], rank)
        else:
            out[to_original_key(key)] = shape
    return out


def original_config(config) -> dict:
    """A config.json in the original remote-code style for a transformers config."""
    audio = config.audio_config
    rope = dict(config.rope_parameters)
    return {
        "model_type": "phi4mm",
        "architectures": ["Phi4MMForCausalLM"],
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "original_max_position_embeddings": config.original_max_position_embeddings,
        "partial_rotary_factor": rope["partial_rotary_factor"], "rope_theta": rope["rope_theta"],
        "rope_scaling": None if rope["rope_type"] == "default" else {
            "type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]},
        "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id[0], "pad_token_id": config.pad_token_id,
        "audio_processor": {"name": "cascades", "config": {
            "attention_dim": audio.hidden_size, "attention_heads": audio.num_attention_heads,
            "linear_units": audio.intermediate_size, "num_blocks": audio.num_blocks, "input_size": audio.input_size,
            "kernel_size": audio.kernel_size, "nemo_conv_settings": {"conv_channels": audio.nemo_conv_channels},
            "relative_attention_bias_args": {"type": "t5", "t5_bias_max_distance": audio.bias_max_distance},
            "time_reduction": audio.time_reduction, "ext_pw_out_channel": audio.ext_pw_out_channel,
            "depthwise_seperable_out_channel": audio.depthwise_separable_out_channel,
            "depthwise_multiplier": audio.depthwise_multiplier, "chunk_size": audio.chunk_size,
            "left_chunk": audio.left_chunk}},
        "embd_layer": {"audio_embd_layer": {"downsample_rate": audio.downsample_rate, "compression_rate": 8}},
        "audio_token_id": audio.audio_token_id,
        "speech_lora": {"r": 4, "lora_alpha": 8, "dp": 0.0, "layer": "layers.*"},
    }


def write_original_checkpoint(model, directory: Path, seed: int = 0, rank: int = 4, alpha: float = 8.0):
    """Save `model` in the original layout with random non-zero speech and vision LoRA.

    Returns the native state dict with the *speech* LoRA merged (W + alpha/r B A): the weights
    a correct loader must reproduce. Vision LoRA must be ignored.
    """
    gen = torch.Generator().manual_seed(seed)
    native = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        native.pop("lm_head.weight")
    tensors, merged = {}, dict(native)
    for key, tensor in native.items():
        module = key[: -len(".weight")]
        if DECODER_LORA_TARGET.fullmatch(module):
            tensors[f"{module}.base_layer.weight"] = tensor
            for adapter in ("speech", "vision"):
                lora_a = 0.1 * torch.randn(rank, tensor.shape[1], generator=gen)
                lora_b = 0.1 * torch.randn(tensor.shape[0], rank, generator=gen)
                tensors[f"{module}.lora_A.{adapter}.weight"] = lora_a
                tensors[f"{module}.lora_B.{adapter}.weight"] = lora_b
                if adapter == "speech":
                    merged[key] = tensor + (alpha / rank) * lora_b @ lora_a
        else:
            tensors[to_original_key(key)] = tensor
    directory.mkdir(parents=True, exist_ok=True)
    config = original_config(model.config)
    config["speech_lora"].update(r=rank, lora_alpha=alpha)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return merged
