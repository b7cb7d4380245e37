"""Conformer speech encoder of Phi-4-multimodal (log-mel frames in, one vector per 80 ms out).

The reference is transformers' `Phi4MultimodalAudioModel` (itself a port of the remote-code
`ConformerEncoder` of microsoft/Phi-4-multimodal-instruct). Pipeline, for features (N, T, 80):

1. `encoder_embedding`: (x - global_mean) * global_invstd, buffers from the checkpoint.
2. `embed`: Nemo "dw_striding" subsampling x8: Conv2d(1, C, 3, s2, p1) + ReLU, then twice
   [depthwise Conv2d(C, C, 3, s2, p1, groups=C), Conv2d(C, C, 1), ReLU], over (time, mel);
   the channel and mel axes are flattened channel-major and projected by Linear(C * 10 -> D).
   Every stride-2 conv maps a length L to (L - 1) // 2 + 1, so T frames give ceil(T / 8).
3. Windows: a sequence longer than `max_window_frames` (500) encoder frames is zero-padded to a
   multiple of 500 and cut into 500-frame windows that go through the blocks independently,
   then glued back and trimmed (the reference's `unfold_tensor`). The subsampling in step 2
   still sees the whole sequence.
4. One T5-style relative position bias for all blocks: Embedding(2 * max_dist, heads) indexed
   by clamp(j - i, -max_dist, max_dist - 1) + max_dist, added to the attention scores.
5. `num_blocks` Conformer blocks (see `ConformerBlock`).

The padding quirk. The reference builds a boolean "keep" mask (valid frames, and the streaming
chunk mask when `chunk_size > 0`) and *adds* it to the float bias: allowed keys get +1, padded
keys +0, so padding is never masked out. Which frames count as valid depends on how it is
called: without a mask (the feature extractor passes none for a single clip) every key gets +1,
including the zero frames that pad the last window; with a mask (a batch of several clips) the
keys past ceil(length / 8) get +0, window padding included. `forward(..., lengths=None)` and
`forward(..., lengths=...)` reproduce these two cases exactly. `mask_padding=True` instead
gives the behaviour one would expect: padded and window-padding keys (and keys outside the
streaming chunk window) are removed from the softmax, and padded time steps are zeroed between
the subsampling convolutions, so the valid frames of a padded clip equal the clip encoded alone.

Choices where the reference gives none:
* Masked keys get the dtype's most negative finite value rather than -inf, so a window that is
  all padding (a short clip batched with a long one) yields finite numbers instead of NaN; exp()
  of it underflows to exactly 0 wherever a row has any allowed key.
* No dropout (the checkpoint's dropout_rate is 0.0 and the encoder is frozen in this project).
* `chunk_size > 0` builds the reference's evaluation-time streaming mask; the reference's
  training-time random shift of the chunk boundaries is not reproduced.
* `bias_symmetric=True` clamps |j - i| to max_dist - 1 (the reference indexes one past its
  embedding table there).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import EncoderConfig


def _strided_length(lengths, num_stages: int):
    """Length after `num_stages` convolutions with kernel 3, stride 2, padding 1 (= ceil(L / 2**k))."""
    for _ in range(num_stages):
        lengths = (lengths - 1) // 2 + 1
    return lengths


def _time_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(N,) valid lengths -> (N, max_length) bool, True on valid positions."""
    positions = torch.arange(max_length, device=lengths.device)
    return positions[None, :] < lengths[:, None]


class GlobalMeanVarianceNorm(nn.Module):
    """(x - global_mean) * global_invstd per mel bin; the statistics are checkpoint buffers."""

    def __init__(self, input_size: int):
        super().__init__()
        self.register_buffer("global_mean", torch.zeros(input_size))
        self.register_buffer("global_invstd", torch.ones(input_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.global_mean) * self.global_invstd  # (N, T, F)


class ConvSubsampling(nn.Module):
    """Nemo dw_striding subsampling: (N, T, F) -> (N, ceil(T / 8), D) for time_reduction 8.

    `conv` holds [Conv2d(1, C, 3, s2, p1), ReLU] + (log2(r) - 1) x [depthwise Conv2d(C, C, 3,
    s2, p1), Conv2d(C, C, 1), ReLU]; the flattened (C, F') features are projected by `out`.
    """

    def __init__(self, input_size: int, channels: int, hidden_size: int, time_reduction: int):
        super().__init__()
        self.num_stages = int(math.log2(time_reduction))
        layers: list[nn.Module] = [nn.Conv2d(1, channels, kernel_size=3, stride=2, padding=1), nn.ReLU()]
        for _ in range(self.num_stages - 1):
            layers += [
                nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1, groups=channels),
                nn.Conv2d(channels, channels, kernel_size=1),
                nn.ReLU(),
            ]
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(channels * _strided_length(input_size, self.num_stages), hidden_size)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None,
                chunk_frames: int = 4096) -> torch.Tensor:
        """`lengths` given: zero the time steps past each clip's length after every stage, so the
        valid frames do not see the padding through the convolutions (the reference does not).

        Long inputs go through in time chunks of about `chunk_frames` input frames, so the
        first convolution's (N, C, T/2, F/2) output never exists for a whole long recording
        (14.7 GB in float32 for 30 minutes at C = 1024). The result is the same: output frame m
        depends on input frames 8m - 7 .. 8m + 7 only, so each chunk starts one output frame
        early on a multiple of 8 and ends one late, and those edge frames are dropped.
        """
        stride = 2**self.num_stages
        num_out = _strided_length(features.shape[1], self.num_stages)
        step = max(1, chunk_frames // stride)  # output frames per chunk
        outputs = []
        for first in range(0, num_out, step):
            last = min(first + step, num_out)
            start = max(0, (first - 1) * stride)  # a multiple of `stride`: chunk and global frames align
            end = min(features.shape[1], (last + 1) * stride)
            x = self._subsample(features[:, start:end], lengths, start)  # (N, T'_chunk, C * F')
            skip = first - start // stride
            outputs.append(self.out(x[:, skip : skip + last - first]))  # (N, last - first, D)
        return torch.cat(outputs, dim=1)  # (N, T', D)

    def _subsample(self, features: torch.Tensor, lengths: torch.Tensor | None, start: int) -> torch.Tensor:
        """The conv stack on input frames [start, start + T) -> (N, T', C * F'), channel-major."""
        x = features.unsqueeze(1)  # (N, 1, T, F)
        offset = start
        for layer in self.conv:
            x = layer(x)
            if lengths is not None and isinstance(layer, nn.ReLU):
                lengths, offset = _strided_length(lengths, 1), offset // 2
                valid = _time_mask(lengths - offset, x.shape[2])  # (N, T') in this chunk's frames
                x = x * valid[:, None, :, None].to(x.dtype)  # (N, C, T', F')
        batch, channels, frames, freqs = x.shape
        return x.transpose(1, 2).reshape(batch, frames, channels * freqs)


class RelativeAttentionBias(nn.Module):
    """T5-style learned bias per head and clamped relative distance j - i (key minus query)."""

    def __init__(self, num_heads: int, max_distance: int, symmetric: bool = False):
        super().__init__()
        self.max_distance = max_distance
        self.symmetric = symmetric
        rows = max_distance if symmetric else 2 * max_distance
        weight = torch.empty(rows, num_heads)
        if not weight.is_meta:  # nn.Embedding's N(0, 1), skipped on the meta device (it imports torch._dynamo there)
            nn.init.normal_(weight)
        self.bias_values = nn.Embedding(rows, num_heads, _weight=weight)

    def forward(self, length: int) -> torch.Tensor:
        positions = torch.arange(length, device=self.bias_values.weight.device)
        distance = positions[None, :] - positions[:, None]  # (T, T): key j minus query i
        distance = distance.clamp(-self.max_distance, self.max_distance - 1)
        if self.symmetric:
            index = distance.abs().clamp(max=self.max_distance - 1)
        else:
            index = distance + self.max_distance
        return self.bias_values(index).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)


class FeedForward(nn.Module):
    """Pre-LN SwiGLU feed-forward; the fused projection splits value first: (up, gate)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(hidden_size)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size)
        self.down_proj = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up_proj(self.layer_norm(x)).chunk(2, dim=-1)  # (B, T, F) each
        return self.down_proj(up * F.silu(gate))  # (B, T, D)


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive float mask (relative bias + padding term)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))  # (B, T, D)


class GluPointwiseConv(nn.Module):
    """Pointwise Conv1d(D -> 2E) and GLU with its own biases: (a + b1) * swish(b + b2)."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.ext_pw_conv_1d = nn.Conv1d(hidden_size, 2 * out_channels, kernel_size=1)
        self.b1 = nn.Parameter(torch.zeros(1, out_channels, 1))
        self.b2 = nn.Parameter(torch.zeros(1, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.ext_pw_conv_1d(x.transpose(1, 2)).split(self.out_channels, dim=1)  # (B, E, T) each
        return ((value + self.b1) * F.silu(gate + self.b2)).transpose(1, 2)  # (B, T, E)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise Conv1d(k, padding k-1 on both sides) then pointwise Conv1d; channels-first."""

    def __init__(self, hidden_size: int, kernel_size: int, multiplier: int, out_channels: int):
        super().__init__()
        self.dw_conv = nn.Conv1d(
            hidden_size, hidden_size * multiplier, kernel_size, padding=kernel_size - 1, groups=hidden_size
        )
        self.pw_conv = nn.Conv1d(hidden_size * multiplier, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw_conv(self.dw_conv(x))  # (B, S, T + k - 1)


class ConvModule(nn.Module):
    """LN -> GLU pointwise -> causal depthwise-separable conv -> swish -> pointwise.

    The depthwise conv pads k-1 frames on both sides and the last k-1 outputs are dropped, so
    frame t only sees frames t-k+1..t (causal); padding at the end never leaks backwards.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.kernel_size = config.kernel_size
        self.layer_norm = nn.LayerNorm(config.hidden_size)
        self.glu = GluPointwiseConv(config.hidden_size, config.ext_pw_out_channel)
        self.dw_sep_conv_1d = DepthwiseSeparableConv(
            config.hidden_size, config.kernel_size, config.depthwise_multiplier, config.depthwise_separable_out_channel
        )
        self.ext_pw_conv_1d = nn.Conv1d(config.hidden_size, config.ext_pw_out_channel, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.glu(self.layer_norm(x)).transpose(1, 2)  # (B, D, T)
        x = self.dw_sep_conv_1d(x)  # (B, D, T + k - 1)
        x = x[:, :, : x.shape[2] - (self.kernel_size - 1)]  # (B, D, T), causal trim
        x = self.ext_pw_conv_1d(F.silu(x))  # (B, D, T)
        return x.transpose(1, 2)  # (B, T, D)


class ConformerBlock(nn.Module):
    """Macaron Conformer block of the reference:

    x = x + 0.5 FF_in(x); x = x + MHSA(LN_att(x)); x = x + Conv(x); x = x + 0.5 FF_out(x); LN(x).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.feed_forward_in = FeedForward(config.hidden_size, config.intermediate_size)
        self.self_attn = SelfAttention(config.hidden_size, config.num_heads)
        self.conv = ConvModule(config)
        self.feed_forward_out = FeedForward(config.hidden_size, config.intermediate_size)
        self.layer_norm_att = nn.LayerNorm(config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.feed_forward_in(x)  # (B, T, D)
        x = x + self.self_attn(self.layer_norm_att(x), attn_bias)
        x = x + self.conv(x)
        x = x + 0.5 * self.feed_forward_out(x)
        return self.layer_norm(x)


class ConformerEncoder(nn.Module):
    """Phi-4MM speech encoder: log-mel (N, T, 80) -> (N, ceil(T / 8), D).

    Parameter and buffer names equal those of transformers' `Phi4MultimodalAudioModel`, so its
    state dict loads with strict=True.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.encoder_embedding = GlobalMeanVarianceNorm(config.input_size)
        self.embed = ConvSubsampling(
            config.input_size, config.nemo_conv_channels, config.hidden_size, config.time_reduction
        )
        self.relative_attention_bias_layer = RelativeAttentionBias(
            config.num_heads, config.bias_max_distance, config.bias_symmetric
        )
        self.encoders = nn.ModuleList(ConformerBlock(config) for _ in range(config.num_blocks))
        self.gradient_checkpointing = False

    def num_output_frames(self, num_feature_frames):
        """Encoder frames for `num_feature_frames` log-mel frames (int or tensor): ceil(T / 8)."""
        return _strided_length(num_feature_frames, self.embed.num_stages)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor | None = None, *, mask_padding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode log-mel `features` (N, T, input_size) with valid frame counts `lengths` (N,).

        Returns hidden states (N, ceil(T / 8), D) and their valid lengths (N,). Frames past a
        clip's length hold values computed from padding; slice them off.

        Default (`mask_padding=False`): the reference's arithmetic, including its padding quirk
        (module docstring). `lengths=None` matches the reference called without a mask (what
        transformers' feature extractor does for one clip); `lengths` given matches it called
        with `audio_attention_mask = arange(T) < lengths` (a batch of several clips). For long
        inputs these two differ slightly even when all frames are valid.
        `mask_padding=True`: padding never influences valid frames.
        """
        batch, num_frames = self._check_inputs(features, lengths)
        x = self.encoder_embedding(features.to(self.encoder_embedding.global_mean.dtype))  # (N, T, F)
        if mask_padding and lengths is not None:
            x = x * _time_mask(lengths, num_frames)[:, :, None].to(x.dtype)
        x = self.embed(x, lengths if mask_padding else None)  # (N, T', D)

        length = x.shape[1]
        out_lengths = (
            torch.full((batch,), length, dtype=torch.long, device=x.device)
            if lengths is None
            else self.num_output_frames(lengths.to(x.device))
        )
        window = self.config.max_window_frames if length > self.config.max_window_frames else length
        num_windows = -(-length // window)
        x = F.pad(x, (0, 0, 0, num_windows * window - length))  # (N, W * window, D)
        x = x.reshape(batch * num_windows, window, -1)  # (N * W, window, D)

        attn_bias = self._attention_bias(out_lengths, length, num_windows, window, lengths, mask_padding)
        for block in self.encoders:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_bias, use_reentrant=False)
            else:
                x = block(x, attn_bias)

        x = x.reshape(batch, num_windows * window, -1)[:, :length]  # (N, T', D)
        return x, out_lengths

    def _attention_bias(self, out_lengths, length, num_windows, window, lengths, mask_padding) -> torch.Tensor:
        """Additive attention mask (B or 1, H, window, window) for the windows: relative bias plus
        the reference's boolean keep-mask as +1/+0, or -max for masked keys with `mask_padding`."""
        bias = self.relative_attention_bias_layer(window)  # (1, H, window, window)
        device = bias.device
        if lengths is None and not mask_padding:
            keep = torch.ones(1, 1, 1, window, dtype=torch.bool, device=device)  # every key, window padding too
        else:
            valid = _time_mask(out_lengths, num_windows * window)  # (N, W * window)
            keep = valid.reshape(-1, 1, 1, window)  # (N * W, 1, 1, window)
        if self.config.chunk_size > 0:
            keep = keep & self._streaming_mask(window, device)[None, None]  # (B, 1, window, window)
        if mask_padding:
            return bias.masked_fill(~keep, torch.finfo(bias.dtype).min)
        return bias + keep.to(bias.dtype)

    def _streaming_mask(self, length: int, device) -> torch.Tensor:
        """Chunked streaming mask (length, length): query in chunk c sees chunks c - left_chunk..c."""
        chunk = torch.arange(length, device=device) // self.config.chunk_size
        query_chunk, key_chunk = chunk[:, None], chunk[None, :]
        return (key_chunk <= query_chunk) & (key_chunk >= query_chunk - self.config.left_chunk)

    def _check_inputs(self, features: torch.Tensor, lengths: torch.Tensor | None) -> tuple[int, int]:
        if features.dim() != 3 or features.shape[-1] != self.config.input_size:
            raise ValueError(
                f"ConformerEncoder expects features of shape (N, T, {self.config.input_size}), "
                f"got {tuple(features.shape)}"
            )
        batch, num_frames = features.shape[:2]
        if num_frames == 0:
            raise ValueError("ConformerEncoder got 0 feature frames; each clip needs at least one frame")
        if lengths is not None:
            if lengths.shape != (batch,):
                raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
            if lengths.dtype.is_floating_point or bool(((lengths < 1) | (lengths > num_frames)).any()):
                raise ValueError(
                    f"lengths must be integers in [1, {num_frames}] (the padded frame count), got {lengths.tolist()}"
                )
        return batch, num_frames


def _check_config(config: EncoderConfig) -> None:
    hidden = config.hidden_size
    if hidden % config.num_heads:
        raise ValueError(f"EncoderConfig.hidden_size ({hidden}) must be divisible by num_heads ({config.num_heads})")
    for name in ("ext_pw_out_channel", "depthwise_separable_out_channel"):
        if getattr(config, name) != hidden:
            raise ValueError(
                f"EncoderConfig.{name} ({getattr(config, name)}) must equal hidden_size ({hidden}): "
                "the conv module's output is added to the residual stream"
            )
    reduction = config.time_reduction
    if reduction < 2 or reduction & (reduction - 1):
        raise ValueError(f"EncoderConfig.time_reduction must be a power of two >= 2, got {reduction}")
    if config.max_window_frames < 1:
        raise ValueError(f"EncoderConfig.max_window_frames must be >= 1, got {config.max_window_frames}")
