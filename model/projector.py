"""Speech projector: encoder states -> decoder embedding space.

Reference: the speech branch of transformers' `Phi4MultimodalAudioEmbedding`,
`down_proj_for_speech(gelu(up_proj_for_speech(h)))` with the exact (erf) GELU. The checkpoint
names `up_proj_for_speech` / `down_proj_for_speech` map to `up_proj` / `down_proj` here
(model/checkpoint.py renames them). The reference sizes the first layer's input as
hidden_size * downsample_rate but never stacks frames (the real checkpoint has rate 1), so
`encoder_dim` is simply the width of the vectors passed in.

`standardize_clips` is this project's own option (SpeechLMConfig.standardize_audio_embeddings,
off for Phi-4MM checkpoints): per clip, subtract the mean over its valid tokens and divide by
their root mean square, so the decoder sees only how the clip varies in time. The toy world's
from-scratch alignment needs it (toy/pretrain.py): without it, a tiny encoder trained by
ASR collapses to one constant output vector and the decoder learns to ignore the audio.
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


def standardize_clips(audio_embeds: torch.Tensor, token_counts: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, T', H) projected clips, (N,) valid tokens -> each clip minus its time mean, over its
    RMS (one scalar per clip, over valid tokens and channels). Padded tokens come out zero."""
    valid = (torch.arange(audio_embeds.shape[1], device=audio_embeds.device)[None, :]
             < token_counts.to(audio_embeds.device)[:, None])[..., None]  # (N, T', 1)
    count = valid.sum(dim=1, keepdim=True).clamp_min(1)  # (N, 1, 1)
    centred = (audio_embeds - (audio_embeds * valid).sum(dim=1, keepdim=True) / count) * valid  # (N, T', H)
    mean_square = centred.pow(2).sum(dim=(1, 2), keepdim=True) / (count * audio_embeds.shape[-1])  # (N, 1, 1)
    return centred * torch.rsqrt(mean_square + eps)
