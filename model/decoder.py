"""The Phi-4-mini text decoder, written to be read top to bottom.

Architecture (Phi-3 family, as in transformers' `Phi4MultimodalModel`):
  tokens -> embed -> N x [ x + Attn(RMSNorm(x)) ; x + MLP(RMSNorm(x)) ] -> RMSNorm -> lm_head
* attention: one fused `qkv_proj` (no bias) split [q | k | v], grouped-query attention
  (num_heads query heads share num_kv_heads key/value heads), rotary embedding on the first
  `rotary_dim = head_dim * partial_rotary_factor` channels of each head (0.75 in the real model);
* LongRoPE: inverse frequencies divided by per-channel `short_factor` or `long_factor`, and
  cos/sin multiplied by `attention_factor` = sqrt(1 + ln(L_max / L_orig) / ln(L_orig));
* MLP: fused `gate_up_proj` split gate-first, `down_proj(up * silu(gate))`;
* RMSNorm computed in float32, then scaled by its weight in the input dtype;
* tied embeddings: `lm_head.weight` is `embed_tokens.weight` when the config says so.

Which LongRoPE factors a forward uses (the reference's rule, made static): transformers picks
`long_factor` for every position when max(position_ids) + 1 > original_max_position_embeddings,
else `short_factor`. Without a KV cache we apply exactly that rule. With a KV cache, a sequence
must keep one set of factors for all its cached keys, so the rule is applied to the cache's
capacity (`kv_cache.max_length`, the longest the sequence can grow); transformers instead
recomputes the whole cache when generation crosses the boundary. Both agree whenever the final
length and the capacity fall on the same side of the boundary.

KV cache protocol (rollout/kv_cache.py has the static implementation): an object with
`offset` (slots already filled, shared by all rows), `max_length`, `update(layer_idx, key,
value) -> (keys, values)` writing the new (B, H_kv, T, D) entries at [offset, offset + T) and
returning the filled prefix, and `advance(T)` called once after all layers ran. Prefill and
decode therefore go through this same forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), the normalisation done in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.eps)  # x / sqrt(mean(x^2) + eps)
        return self.weight * normed.to(hidden.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for (partial) RoPE and LongRoPE; no learned parameters."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the inverse frequencies; called again after loading on the meta device.
        Computed on the CPU and moved to `device` (default: the current default device): on the
        meta device torch's arithmetic goes through torch._refs, whose first use imports
        torch._dynamo, seconds of a process's start."""
        cfg = self.config
        device = torch.empty(0).device if device is None else device
        dim = cfg.rotary_dim
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # (dim/2,)
        base_power = cfg.rope_theta**exponent  # theta^(2i/d)
        if cfg.rope_type == "longrope":
            short = torch.tensor(cfg.short_factor, dtype=torch.float32, device="cpu")
            long = torch.tensor(cfg.long_factor, dtype=torch.float32, device="cpu")
            short_inv_freq, long_inv_freq = 1.0 / (short * base_power), 1.0 / (long * base_power)
        else:
            short_inv_freq = long_inv_freq = 1.0 / base_power
        self.register_buffer("short_inv_freq", short_inv_freq.to(device), persistent=False)
        self.register_buffer("long_inv_freq", long_inv_freq.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the frequencies; `.to(torch.bfloat16)` must not round them (at
        position 20k a bf16 frequency is off by tens of radians): recompute in float32."""
        super()._apply(fn, recurse)
        self.reset_buffers(self.short_inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, sequence_length: int, dtype: torch.dtype):
        """positions (B, T) -> cos, sin (B, T, rotary_dim) in `dtype`.

        `sequence_length` decides short vs long LongRoPE factors (see the module docstring).
        """
        use_long = sequence_length > self.config.original_max_position_embeddings
        inv_freq = self.long_inv_freq if use_long else self.short_inv_freq
        freqs = positions[..., None].float() * inv_freq  # (B, T, rotary_dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim)
        scale = self.config.attention_factor
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x (B, H, T, D) by (cos, sin) (B, T, rotary_dim)."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rotary_dim)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = x_rot.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)


def attend(query, key, value, attn_mask, *, expand_kv: bool = False) -> torch.Tensor:
    """Grouped-query attention: query (B, H, T, D), key/value (B, H_kv, S, D) -> (B, H, T, D).

    attn_mask None means no padding: causal when T == S (a chunk from slot 0), else one query
    over every key (decode). With a mask on CUDA, `expand_kv` repeats the key/value heads,
    because no fused kernel takes both a mask and GQA there; the math fallback would hold the
    whole (B, H, T, S) attention in float32.
    """
    groups = query.shape[1] // key.shape[1]
    if expand_kv and groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask,
        is_causal=attn_mask is None and key.shape[2] == query.shape[2],
        enable_gqa=key.shape[1] != query.shape[1],
    )


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        qkv_dim = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden, cos, sin, attn_mask, kv_cache=None):
        batch, length, _ = hidden.shape
        qkv = self.qkv_proj(hidden)  # (B, T, (H + 2 H_kv) D)
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        query, key, value = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        query = query.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        key = key.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        value = value.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if kv_cache is not None:
            key, value = kv_cache.update(self.layer_idx, key, value)  # (B, H_kv, S, D)
        out = attend(query, key, value, attn_mask, expand_kv=attn_mask is not None and query.is_cuda)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, q_dim))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)  # gate first, (B, T, F) each
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, attn_mask, kv_cache=None):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, attn_mask, kv_cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Phi4MiniDecoder(nn.Module):
    """Token embeddings, decoder layers, final norm and the LM head.

    `forward` returns the final normed hidden states (B, T, hidden); `logits(hidden)` applies
    the LM head. Keeping them apart lets fused losses take hidden states and `lm_head.weight`
    without ever building full-vocabulary logits.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        embedding = torch.empty(config.vocab_size, config.hidden_size)
        if not embedding.is_meta:  # nn.Embedding's N(0, 1), skipped on the meta device (load_pretrained),
            nn.init.normal_(embedding)  # where it goes through torch._refs and imports torch._dynamo (seconds)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh weights as transformers initialises Phi-3/Phi-4: N(0, 0.02) projections and
        embeddings, unit norms. Checkpoint loading overwrites all of them, so a model built on the
        meta device (load_pretrained) is left as it is."""
        if self.embed_tokens.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache=None,
    ) -> torch.Tensor:
        """inputs_embeds (B, T, hidden) -> final hidden states (B, T, hidden).

        attention_mask: (B, S) with 1 for real tokens and 0 for padding, over every key slot
            up to the end of this chunk (S = cache offset + T; a longer mask is cut, a shorter
            one is an error). None means no padding.
        positions: (B, T) rotary positions; by default the count of real tokens before each
            slot (so left padding needs no special care), or offset + arange(T) with no mask.
        """
        batch, length, _ = inputs_embeds.shape
        offset = 0 if kv_cache is None else kv_cache.offset
        if positions is None:
            positions = default_positions(attention_mask, offset, length, batch, inputs_embeds.device)
        attn_mask = build_attention_mask(attention_mask, offset, length, inputs_embeds.device)
        if kv_cache is not None:
            sequence_length = kv_cache.max_length
        elif self.config.rope_type == "longrope":
            sequence_length = int(positions.max()) + 1
        else:
            sequence_length = 0
        cos, sin = self.rotary(positions, sequence_length, inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and kv_cache is None:
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, cos, sin, attn_mask, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(length)
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) -> (B, T, vocab)."""
        return self.lm_head(hidden)


def default_positions(attention_mask, offset: int, length: int, batch: int, device) -> torch.Tensor:
    """Rotary positions (B, T) of the tokens in slots [offset, offset + length)."""
    if attention_mask is None:
        return torch.arange(offset, offset + length, device=device).expand(batch, length)
    counts = attention_mask[:, : offset + length].long().cumsum(-1) - 1  # real tokens before each slot
    return counts[:, offset:].clamp(min=0)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of (B, T) is its real tokens followed by its padding (one host sync).

    A training batch is collated that way: under plain causal attention each real token then
    sees exactly the keys the full mask would give it, and only padded queries (whose outputs
    every loss drops) see more. The causal kernel skips the masked half of the (T, T) scores:
    about 1.5x faster attention on CPU at T = 958 than the same kernel with an explicit mask.
    """
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def build_attention_mask(attention_mask, offset: int, length: int, device):
    """Boolean (B, 1, T, S) mask: causal over slots, padded keys hidden.

    None when no mask is needed: without padding, a chunk that starts at slot 0 is plain
    causal attention and a single new token sees every key (Attention tells the two apart
    by T == S), both fast paths of scaled_dot_product_attention; so is a right-padded chunk from
    slot 0 (`is_right_padded`), which plain causal attention serves. A padded query still sees
    itself, so its row is never empty (no NaN leaks into a loss that zeroes padded positions).
    """
    if attention_mask is None and (offset == 0 or length == 1):
        return None
    if offset == 0 and is_right_padded(attention_mask[:, :length]):
        return None  # causal attention already hides trailing padding from every real token
    total = offset + length
    query_slots = torch.arange(offset, total, device=device)[:, None]  # (T, 1)
    key_slots = torch.arange(total, device=device)[None, :]  # (1, S)
    allowed = key_slots <= query_slots  # (T, S)
    if attention_mask is None:
        return allowed[None, None]
    if attention_mask.shape[-1] < total:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} slots but the sequence has {total} "
            f"(cache offset {offset} + {length} new tokens); pass the mask over all slots so far"
        )
    key_valid = attention_mask[:, None, None, :total].bool()  # (B, 1, 1, S)
    return (allowed & key_valid) | (key_slots == query_slots)  # (B, 1, T, S)
