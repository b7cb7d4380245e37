"""Crash-safe writes: a file appears complete under its final name or not at all.

Each writer writes a sibling temporary file, flushes it to disk and renames it over the
target (rename is atomic on POSIX file systems), so an interrupted save never leaves a
truncated checkpoint behind.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


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


class TensorStore:
    """One tensor per key on disk, content-addressed and crash-safe: the feature cache
    (data.dataset.FeatureCache) and the encoder-output cache (model.encoder_cache) both keep
    their entries here.

    Entry: `{key[:2]}/{key}.safetensors` holding the tensor under `name`, written to a unique
    temporary file in the same folder, fsync'ed and renamed (atomic on POSIX), so a killed
    process leaves the whole entry or none, and two processes writing one key both leave a
    whole one. An unreadable entry is a miss (with a warning) and is rewritten.
    """

    def __init__(self, directory: str | Path, name: str):
        self.directory, self.name = Path(directory), name
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))[self.name]
        except Exception as error:  # safetensors raises several types for a damaged file
            logger.warning("cache entry %s is unreadable (%s); recomputing it", path, error)
            return None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            save_file({self.name: tensor.detach().contiguous()}, tmp)
            _replace(Path(tmp), path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
