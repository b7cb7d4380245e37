"""Append-only JSON-lines files that survive a crash: rows are appended in one fsync'ed write,
and reading repairs what an interrupted run can leave (a torn last line, a group of rows only
partly written). data.synth and eval.preferences resume from them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from model.safeio import atomic_write_text

logger = logging.getLogger(__name__)


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append JSON lines in one write, flushed and fsync'ed (a crash tears at most the last line)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def read_rows(path: Path, complete: Callable[[list[dict]], bool] | None = None, key: str = "id") -> list[dict]:
    """The rows of an append-only JSON-lines file, repairing what a crash can leave behind.

    A torn last line (no newline, or not JSON) is dropped; with `complete`, the rows are grouped
    by `key` and groups for which `complete(rows)` is False are dropped too. The file is
    rewritten (atomically) only when something was dropped.
    """
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    torn = lines[-1].strip() != b""  # an append cut short: the text after the last newline
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{path}:{number}: not valid JSON; the file was edited or written by something "
                             "else: fix or remove that line") from None
    kept = rows
    if complete is not None:
        groups: dict[Any, list[dict]] = {}
        for row in rows:
            groups.setdefault(_dig(row, key), []).append(row)
        kept = [row for row in rows if complete(groups[_dig(row, key)])]
    if torn or len(kept) != len(rows):
        logger.warning("%s: removed %d incomplete row(s) left by an interrupted run", path,
                       len(rows) - len(kept) + int(torn))
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    return kept


def _dig(row: dict, dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
