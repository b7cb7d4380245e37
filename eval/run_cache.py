"""eval.run's resumable caches and the keys they are read back by.

Outputs and judgements are kept in append-only JSON-lines files (`JsonlLog`), one line per
finished sample, so a killed run loses at most the batch in flight. A record is reused only
when its key matches: an output's key hashes the checkpoint's fingerprint
(`checkpoint_fingerprint`), a judgement's key the judge's identity (`judge_identity`), so
retraining in place re-decodes and another judge re-judges without re-decoding. Details:
docs/evaluation.md ("Resuming").
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)

_FINGERPRINT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "*.model")
_IDENTITY_DROPPED = ("cache_dir", "max_concurrency", "timeout_s", "retry", "api_key_env", "base_url")


class JsonlLog:
    """An append-only JSON-lines file of finished records, tolerant of a torn last line."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        if not path.is_file():
            return
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            keep = raw.rfind(b"\n") + 1
            logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", path, len(raw) - keep)
            with open(path, "r+b") as handle:
                handle.truncate(keep)
            raw = raw[:keep]
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                logger.warning("%s:%d: unreadable line skipped", path, number)
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str) and isinstance(record.get("key"), str):
                self.records.append(record)

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for record in records:
                os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                self.records.append(record)
            os.fsync(fd)
        finally:
            os.close(fd)

    def index(self) -> dict[tuple[str, str], dict]:
        """(id, key) -> the last record with them."""
        return {(r["id"], r["key"]): r for r in self.records}


def digest(value: Any) -> str:
    """A cache key: the first 20 hex digits of the SHA-256 of `value` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def checkpoint_fingerprint(directory: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the files that define a checkpoint's outputs."""
    files = {p for pattern in _FINGERPRINT_PATTERNS for p in directory.glob(pattern) if p.is_file()}
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(files)]


def judge_identity(judge) -> dict[str, Any] | None:
    """What decides a judge's replies; None for no judge. A judge with `config()` (OpenAIJudge):
    its class and config without the endpoint, cache and transport settings, plus a hash of its
    prompt template; any other judge (the toy world's oracle): its class and a hash of the file
    that defines it, so editing the oracle's formula re-judges."""
    if judge is None:
        return None
    identity: dict[str, Any] = {"type": f"{type(judge).__module__}.{type(judge).__qualname__}"}
    config = getattr(judge, "config", None)
    if callable(config):
        identity.update({k: v for k, v in config().items() if k not in _IDENTITY_DROPPED})
        template = getattr(judge, "score_template", None)
        if isinstance(template, str):
            identity["score_template"] = hashlib.sha256(template.encode()).hexdigest()[:16]
        return identity
    try:  # a local judge (the toy world's oracle): its code is its identity
        identity["source_sha"] = hashlib.sha256(Path(inspect.getfile(type(judge))).read_bytes()).hexdigest()[:16]
    except (TypeError, OSError):  # defined in a REPL or notebook: no file to hash; the class name identifies it
        return identity
    return identity
