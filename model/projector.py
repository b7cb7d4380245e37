"""Speech projector: encoder states -> decoder embedding space.

Reference: the speech branch of transformers' `Phi4MultimodalAudioEmbedding`,
`down_proj_for_speech(gelu(up_proj_for_speech(h)))` with the exact (erf) GELU. The checkpoint
names `up_proj_for_speech` / `down_proj_for_speech` map to `up_proj` / `down_proj` here
(model/checkpoint.py renames them). The reference sizes the first layer's input as
hidden_size * downsample_rate but never stacks frames (the real checkpoint has rate 1), so
`encoder_dim` is simply the width of the vectors passed in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AudioProjector(nn.Module):
    """Linear(encoder_dim -> decoder_dim), exact GELU, Linear(decoder_dim -> decoder_dim)."""

    def __init__(self, encoder_dim: int, decoder_dim: int):
        super().__init__()
        self.up_proj = nn.Linear(encoder_dim, decoder_dim)
        self.down_proj = nn.Linear(decoder_dim, decoder_dim)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.up_proj(encoder_states))  # (..., decoder_dim), erf GELU
        return self.down_proj(hidden)  # (..., decoder_dim)
