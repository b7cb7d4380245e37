"""The `floras:PATH` benchmark: FLORAS (espnet/floras) exported as parquet or JSON lines, read
lazily, so an export of long recordings with embedded audio is never held in memory at once.

Rows can be kept by length (the paper keeps 5 minutes to 1 hour, `PAPER_FLORAS_SECONDS`) and by
language; rows without an instruction get `DEFAULT_INSTRUCTION` (the paper does not give its
FLORAS instructions). Fields, audio forms and options: docs/benchmarks.md ("floras:PATH").
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .benchmark_item import BenchmarkError, BenchmarkItem

logger = logging.getLogger(__name__)

PAPER_FLORAS_SECONDS = (300.0, 3600.0)
DEFAULT_INSTRUCTION = "Summarize the recording."


def floras_factory(path: Path, options: dict[str, str], spec: str) -> Callable[[], Iterator[BenchmarkItem]]:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json") and p.is_file())
    else:
        raise BenchmarkError(f"FLORAS export not found: {path}; pass a .parquet / .jsonl file or a folder of them")
    if not files:
        raise BenchmarkError(f"{path}: no .parquet, .jsonl or .json files; export FLORAS with "
                             "datasets' to_parquet or to_json (JSON lines)")
    parquet = [p for p in files if p.suffix == ".parquet"]
    if parquet:
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise BenchmarkError(f"reading {parquet[0]} needs pyarrow, which is not installed; "
                                 "`pip install pyarrow`, or export FLORAS as JSON lines "
                                 "(datasets: ds.to_json(PATH), audio as {'array', 'sampling_rate'} or file paths)"
                                 ) from None
    low = _seconds(options.get("min_seconds"), "min_seconds", spec)
    high = _seconds(options.get("max_seconds"), "max_seconds", spec)
    languages = {x.strip() for x in options["languages"].split(",")} if options.get("languages") else None
    instruction = options.get("instruction") or DEFAULT_INSTRUCTION

    def items() -> Iterator[BenchmarkItem]:
        seen: dict[str, str] = {}
        dropped = 0
        for file in files:
            for where, row in _floras_rows(file):
                item = _floras_item(row, where, file.parent, instruction)
                if languages is not None and item.metadata.get("language") not in languages:
                    continue
                if low is not None or high is not None:
                    seconds = item.seconds()
                    if (low is not None and seconds < low) or (high is not None and seconds > high):
                        dropped += 1
                        continue
                if item.id in seen:
                    raise BenchmarkError(f"{where}: duplicate id {item.id!r} (first at {seen[item.id]})")
                seen[item.id] = where
                yield item
        if dropped:
            logger.info("%s: %d recordings outside [%s, %s] s left out", path, dropped, low, high)

    return items


def _floras_rows(file: Path) -> Iterator[tuple[str, dict]]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(file)
        except Exception as error:  # pyarrow raises ArrowInvalid and friends
            raise BenchmarkError(f"{file}: not a readable parquet file ({error})") from None
        row = 0
        for batch in handle.iter_batches(batch_size=8):
            for record in batch.to_pylist():
                yield f"{file} row {row}", record
                row += 1
        return
    with open(file, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkError(f"{file}:{number}: not valid JSON ({error.msg}, column {error.colno}); "
                                     "FLORAS exports must be JSON lines, one recording per line") from None
            if not isinstance(record, dict):
                raise BenchmarkError(f"{file}:{number}: expected a JSON object per line")
            yield f"{file}:{number}", record


def _floras_item(row: dict, where: str, folder: Path, default_instruction: str) -> BenchmarkItem:
    def text(name: str, required: bool) -> str | None:
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise BenchmarkError(f"{where}: field '{name}' is missing or empty; FLORAS rows need id, audio, text")
            return None
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise BenchmarkError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        return str(value)

    audio = row.get("audio")
    kwargs: dict[str, Any] = {}
    if isinstance(audio, str):
        kwargs["audio_path"] = Path(audio) if Path(audio).is_absolute() else folder / audio
    elif isinstance(audio, dict) and audio.get("array") is not None:
        kwargs["waveform"] = np.asarray(audio["array"], dtype=np.float32)
        kwargs["sample_rate"] = int(audio.get("sampling_rate") or 16000)
    elif isinstance(audio, dict) and audio.get("bytes") is not None:
        data = audio["bytes"]
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise BenchmarkError(f"{where}: audio.bytes is a string but not base64") from None
        kwargs["audio_bytes"] = bytes(data)
    elif isinstance(audio, dict) and isinstance(audio.get("path"), str):
        kwargs["audio_path"] = Path(audio["path"]) if Path(audio["path"]).is_absolute() else folder / audio["path"]
    else:
        raise BenchmarkError(f"{where}: field 'audio' must be a path, {{'bytes', 'path'}} or "
                             f"{{'array', 'sampling_rate'}}, got {type(audio).__name__}")
    if "audio_path" in kwargs and not kwargs["audio_path"].is_file():
        raise BenchmarkError(f"{where}: audio file {kwargs['audio_path']} not found")
    metadata = {k: v for k, v in row.items() if k in ("language", "score")}
    return BenchmarkItem(
        id=text("id", True), transcript=text("text", True), reference=text("summary", False),
        instruction=text("instruction", False) or default_instruction, metadata=metadata, **kwargs,
    )


def _seconds(value: str | None, key: str, spec: str) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise BenchmarkError(f"benchmark spec {spec!r}: {key} must be a number of seconds >= 0, got {value!r}")
    return seconds
