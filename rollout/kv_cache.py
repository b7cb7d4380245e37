"""A static key/value cache: buffers preallocated once, filled in place (gpt-fast style).

One (B, H_kv, max_length, D) key buffer and one value buffer per decoder layer. All rows of
the batch share one write offset: prompts of different lengths sit left-padded (prefilled
right-padded, then moved by `shift_rows`) and the padding is hidden through the attention mask
(model/decoder.py), so a decode step writes every row at the same slot and never reallocates.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.offset = 0  # slots filled so far, the same for every row

    @classmethod
    def for_model(cls, config, batch_size: int, max_length: int, *, dtype=torch.float32, device=None):
        """A cache sized for a DecoderConfig."""
        return cls(
            config.num_layers, batch_size, config.num_kv_heads, config.head_dim, max_length, dtype=dtype, device=device
        )

    def repeat_rows(self, repeats: int) -> "StaticKVCache":
        """A cache whose row r * repeats + j is a copy of row r (N samples sharing one prefill)."""
        copy = object.__new__(StaticKVCache)
        copy.keys = [k.repeat_interleave(repeats, dim=0) for k in self.keys]
        copy.values = [v.repeat_interleave(repeats, dim=0) for v in self.values]
        copy.max_length, copy.offset = self.max_length, self.offset
        return copy

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """Write key/value (B, H_kv, T, D) at [offset, offset + T); return the filled prefix."""
        end = self.offset + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} slots needed, {self.max_length} allocated")
        self.keys[layer_idx][:, :, self.offset : end] = key
        self.values[layer_idx][:, :, self.offset : end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def shift_rows(self, shifts: torch.Tensor) -> None:
        """Move row r's filled slots right by shifts[r] (B,): a right-padded prefill from slot 0
        becomes the left-padded layout decoding writes after (rollout.sampler.prefill). Every
        filled slot moves, so call it right after that prefill. Slots [0, shifts[r]) keep copies
        of slot 0; they are padding, which the attention mask hides."""
        filled = self.offset
        slots = torch.arange(filled, device=shifts.device)
        source = (slots[None, :] - shifts[:, None]).clamp(min=0)  # (B, S): the slot each one reads
        for buffer in (*self.keys, *self.values):
            batch, heads, _, dim = buffer.shape
            index = source[:, None, :, None].expand(batch, heads, filled, dim)
            buffer[:, :, :filled] = buffer[:, :, :filled].gather(2, index)

    def advance(self, length: int) -> None:
        """Called by the decoder once all layers have written `length` new slots."""
        self.offset += length

    def reset(self) -> None:
        self.offset = 0
