"""Crash-safe writes: a file appears complete under its final name or not at all.

Each writer writes a sibling temporary file, flushes it to disk and renames it over the
target (rename is atomic on POSIX file systems), so an interrupted save never leaves a
truncated checkpoint behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def _replace(tmp: Path, target: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], target: str | Path, metadata: dict | None = None) -> None:
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _replace(tmp, target)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    _replace(tmp, target)


def atomic_write_text(target: str | Path, text: str) -> None:
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    _replace(tmp, target)
