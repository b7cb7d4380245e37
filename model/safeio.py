"""Crash-safe writes: a file appears complete under its final name or not at all.

Each writer writes a sibling temporary file, flushes it to disk and renames it over the
target (rename is atomic on POSIX file systems), so an interrupted save never leaves a
truncated checkpoint behind. `atomic_write` takes any writer of a path (a WAV, a torch state
file); `replace_directory` swaps a whole directory built beside its target.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()  # what open() would create: mkstemp's 0600 is for its own secrecy


def atomic_write(target: str | Path, write) -> None:
    """`write(temporary path)` fills a unique sibling temporary file (`.NAME.*.tmp`, so two
    writers of one target never share one; the path is a string ending in `.tmp`, so a writer
    that infers a format from the suffix must be told it); it is fsync'ed and renamed over
    `target`, or removed when anything fails."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        os.chmod(tmp, FILE_MODE)
        write(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], target: str | Path, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def replace_directory(staged: str | Path, target: str | Path) -> None:
    """Put the finished directory `staged` (a sibling of `target`) in place of `target`, whole:
    `target`, when it exists, is renamed aside to `.old-NAME`, `staged` is renamed onto `target`,
    then the old one is deleted. A crash leaves the old directory or the new one, never a mix of
    the two (between the two renames, the old one under `.old-NAME`)."""
    staged, target = Path(staged), Path(target)
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


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
        atomic_save_safetensors({self.name: tensor}, self.path(key))
