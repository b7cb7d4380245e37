"""The client's on-disk response cache: content-addressed, one JSON file per entry, crash-safe.

A rerun of an interrupted job (a judge pass, synthetic data, KD teacher scores) asks the server
only what it has not answered yet, and a process killed mid-write leaves each entry whole or
absent (atomic rename, model/safeio.py). What the key covers and why: docs/api-client.md, "Cache".
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from model.safeio import atomic_write_text

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def canonical_json(value: Any) -> str:
    """One text per value (sorted keys, no whitespace): what the cache key hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class ResponseCache:
    """Content-addressed, crash-safe, one JSON file per entry (docs/api-client.md, "Cache")."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._warned: set[str] = set()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> tuple[bool, Any]:
        """(True, value) for a complete entry; (False, None) for a missing or unreadable one."""
        path = self.path(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return False, None
        try:
            entry = json.loads(text)
            if entry.get("format") != CACHE_FORMAT or entry.get("key") != key or "value" not in entry:
                raise ValueError("not a speechsum cache entry for this key")
        except (ValueError, AttributeError) as error:
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("cache entry %s is unreadable (%s); treating it as a miss", path, error)
            return False, None
        return True, entry["value"]

    def put(self, key: str, value: Any) -> None:
        text = json.dumps({"format": CACHE_FORMAT, "key": key, "value": value}, separators=(",", ":"))
        atomic_write_text(self.path(key), text)

    def keys(self) -> list[str]:
        """Keys of the complete-looking entries (temporary files of interrupted writes excluded)."""
        return sorted(p.stem for p in self.directory.glob("??/*.json") if not p.name.startswith("."))

    def __len__(self) -> int:
        return len(self.keys())
