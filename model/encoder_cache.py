"""Frozen-encoder outputs cached per clip: encode a recording once for every epoch and stage.

    model.encoder_cache = EncoderOutputCache("cache/encoder", model.encoder)
    model(input_ids, attention_mask, audio_features, audio_lengths)   # encoder runs on misses only

The paper keeps the speech encoder frozen in SFT, KD and DPO, so a clip's encoder output never
changes between epochs and stages; for 30-minute recordings the encoder is a large share of a
step. `SpeechLM.embed` asks this cache instead of the encoder when `model.encoder_cache` is set.

Key: SHA-256 of (the encoder's weights and buffers, hashed once when the cache is attached;
the clip's valid log-mel frames, bytes and shape; `mask_padding`; the encoder's dtype).
Another checkpoint, another clip or another setting is another key, so one folder can serve
several models. Entries are `model.safeio.TensorStore` files (atomic, an unreadable one is
recomputed), each the clip's (frames', D) encoder output.

Each missing clip is encoded alone (lengths = its own length, no padding). With
`mask_padding=True` that is what a batch gives to float rounding; with the reference's padding
quirk (`mask_padding=False`, encoder.py) a padded batch differs slightly from the clip alone, and
the cache gives the clip-alone value (what the reference gives a single clip).

A trainable encoder is refused (`EncoderTrainableError`, at every call): its outputs change with
every step, so cached ones would be stale. The weights are hashed once: loading other weights
into the same encoder object needs a new cache object.

What it saved: `summary()` says it in words; `record_usage()` (called by the training recipes
and eval.run when they finish) appends the counts as one JSON line to `{directory}/usage.jsonl`
(one write with O_APPEND, so processes that share the folder do not interleave), and
`read_usage(directory)` adds them up: make demo's report states the encoding seconds the cache
saved over the whole run.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .safeio import TensorStore

CACHE_VERSION = 1
USAGE_FILE = "usage.jsonl"
USAGE_FIELDS = ("hits", "misses", "hit_frames", "miss_frames", "encode_seconds")


class EncoderTrainableError(RuntimeError):
    """The encoder-output cache was asked to serve an encoder whose parameters train."""


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for name, tensor in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class EncoderOutputCache:
    """Per-clip encoder outputs on disk (module docstring). `hits` / `misses` count clips,
    `encode_seconds` is the time spent encoding the misses, `hit_frames` / `miss_frames` the
    log-mel frames of each, so `saved_seconds()` estimates what the hits saved."""

    def __init__(self, directory, encoder: nn.Module):
        self._refuse_trainable(encoder)
        self.store = TensorStore(directory, "encoded")
        self.weights = weights_digest(encoder)
        self.hits = self.misses = self.hit_frames = self.miss_frames = 0
        self.encode_seconds = 0.0

    def saved_seconds(self) -> float:
        """The hits' frames at the misses' measured encoding speed (0 before any miss)."""
        return self.encode_seconds * self.hit_frames / self.miss_frames if self.miss_frames else 0.0

    def summary(self) -> str:
        return (f"encoder cache: {self.hits} clips read, {self.misses} encoded in {self.encode_seconds:.1f} s; "
                f"the reads saved about {self.saved_seconds():.1f} s of encoding")

    def record_usage(self, who: str) -> None:
        """Append this object's counts, under the name `who`, to `{directory}/usage.jsonl`."""
        line = json.dumps({"who": who, "hits": self.hits, "misses": self.misses, "hit_frames": self.hit_frames,
                           "miss_frames": self.miss_frames, "encode_seconds": round(self.encode_seconds, 3)}) + "\n"
        fd = os.open(self.store.directory / USAGE_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    @staticmethod
    def _refuse_trainable(encoder: nn.Module) -> None:
        trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise EncoderTrainableError(
                f"the encoder-output cache needs a frozen encoder, but {len(trainable)} encoder parameters train "
                f"(e.g. {trainable[0]}); freeze the encoder (requires_grad_(False)) or turn the cache off")

    def key(self, clip: torch.Tensor, mask_padding: bool, dtype: torch.dtype, with_lengths: bool = True) -> str:
        """clip: (frames, 80), valid frames only; `with_lengths`: the encoder is given the length
        (else called without, as the reference is for one clip)."""
        data = clip.detach().cpu().contiguous()
        digest = hashlib.sha256(
            f"{self.weights}|{tuple(data.shape)}|{data.dtype}|{mask_padding}|{dtype}|{with_lengths}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def encode(self, encoder: nn.Module, features: torch.Tensor, lengths: torch.Tensor | None, *,
               mask_padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`encoder(features, lengths, mask_padding=...)`'s result from the cache: (N, T', D) with
        zeros past each clip's frames, and (N,) frame counts."""
        self._refuse_trainable(encoder)
        num_frames = features.shape[1]
        frame_counts = [num_frames] * features.shape[0] if lengths is None else lengths.tolist()
        dtype = next(encoder.parameters()).dtype
        outputs = []
        for clip, count in zip(features, frame_counts):
            clip = clip[:count]
            key = self.key(clip, mask_padding, dtype, lengths is not None)
            encoded = self.store.get(key)
            if encoded is None:
                started = time.perf_counter()
                clip_lengths = None if lengths is None else torch.tensor([count], device=clip.device)
                encoded, _ = encoder(clip[None].to(dtype), clip_lengths, mask_padding=mask_padding)
                encoded = encoded[0]  # (T', D)
                self.encode_seconds += time.perf_counter() - started
                self.misses, self.miss_frames = self.misses + 1, self.miss_frames + count
                self.store.put(key, encoded)
            else:
                self.hits, self.hit_frames = self.hits + 1, self.hit_frames + count
            outputs.append(encoded.to(features.device))
        counts = torch.tensor([o.shape[0] for o in outputs], device=features.device)
        batch = outputs[0].new_zeros(len(outputs), int(counts.max()), outputs[0].shape[-1])  # (N, T', D)
        for i, encoded in enumerate(outputs):
            batch[i, :encoded.shape[0]] = encoded
        return batch, counts


def read_usage(directory: str | Path) -> dict[str, float] | None:
    """The sums of every `record_usage` line in `directory` (USAGE_FIELDS, plus `processes`) and
    `saved_seconds`: every read frame at the encoding speed measured over all misses (a process
    that only read has no speed of its own). None when nothing was recorded. Unreadable lines
    (a torn write) are skipped."""
    path = Path(directory) / USAGE_FILE
    if not path.is_file():
        return None
    totals = dict.fromkeys(USAGE_FIELDS, 0.0) | {"processes": 0}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            values = {name: float(record[name]) for name in USAGE_FIELDS}
        except (ValueError, KeyError, TypeError):
            continue
        for name, value in values.items():
            totals[name] += value
        totals["processes"] += 1
    if not totals["processes"]:
        return None
    speed = totals["encode_seconds"] / totals["miss_frames"] if totals["miss_frames"] else 0.0  # s per frame
    return {**totals, "saved_seconds": totals["hit_frames"] * speed}
