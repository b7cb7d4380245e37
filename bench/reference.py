"""Shared by the benchmarks: a random transformers Phi-4MM of a given decoder size (tiny audio
and vision towers), saved once and loaded by ours, so both sides hold the same weights."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def reference_model(*, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
                    original_max: int, audio_hidden: int = 32):
    """transformers' Phi4MultimodalForCausalLM with LongRoPE (partial rotary 0.75), random weights."""
    import transformers

    half = int(hidden // heads * 0.75) // 2
    config = transformers.Phi4MultimodalConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32 * original_max,
        original_max_position_embeddings=original_max,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0] * half, "long_factor": [2.0] * half},
        bos_token_id=1, eos_token_id=[2], pad_token_id=0,
        audio_config=dict(hidden_size=audio_hidden, intermediate_size=2 * audio_hidden, num_blocks=1,
                          num_attention_heads=2, nemo_conv_channels=8, ext_pw_out_channel=audio_hidden,
                          depthwise_separable_out_channel=audio_hidden, audio_token_id=vocab - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, crop_size=28, patch_size=14),
    )
    torch.manual_seed(0)
    return transformers.Phi4MultimodalForCausalLM(config)


def add_size_arguments(parser, *, vocab: int, batch: int) -> None:
    """The decoder and batch sizes every decoder benchmark takes (the issues' default sizes)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--batch", type=int, default=batch)
