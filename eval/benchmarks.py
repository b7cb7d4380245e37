"""Benchmark loaders: the three evaluation sets of the paper (section 3.4, Table 1) as items of
(id, audio, transcript, instruction, optional reference).

    benchmark = load_benchmark("ami:/data/ami?instructions=/data/ami_instructions.jsonl")
    for item in benchmark.items():
        waveform = item.load_waveform()            # (samples,) float32, mono, 16 kHz
        judge.score(item.judge_source, item.instruction, summary)

A spec is `KIND:PATH[?option=value&...]`; every kind takes `limit=N` (the first N items). This
module parses specs and reads `jsonl:PATH` (a manifest of data/manifest.py with an instruction
on every line, the Golden3-style in-house format); `ami:DIR` is eval/ami.py and `floras:PATH`
eval/floras.py, and the item types are eval/benchmark_item.py. Files are checked when a
benchmark is loaded, audio is read when an item is decoded. Every kind's fields and options:
docs/benchmarks.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from .ami import AMI_TEST_MEETINGS, ami_items, ami_reference, ami_speaker_words, ami_transcript
from .benchmark_item import Benchmark, BenchmarkError, BenchmarkItem
from .floras import DEFAULT_INSTRUCTION, PAPER_FLORAS_SECONDS, floras_factory

__all__ = ["AMI_TEST_MEETINGS", "DEFAULT_INSTRUCTION", "KINDS", "PAPER_FLORAS_SECONDS", "Benchmark", "BenchmarkError",
           "BenchmarkItem", "ami_reference", "ami_speaker_words", "ami_transcript", "load_benchmark", "parse_spec"]

KINDS = ("jsonl", "ami", "floras")
_OPTIONS = {
    "jsonl": ("limit",),
    "ami": ("limit", "meetings", "instructions", "annotations"),
    "floras": ("limit", "min_seconds", "max_seconds", "languages", "instruction"),
}


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`KIND:PATH?key=value&...` -> (kind, path, options), options checked against the kind."""
    kind, colon, rest = spec.partition(":")
    if not colon or kind not in KINDS:
        raise BenchmarkError(f"benchmark spec {spec!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)} "
                             "(e.g. jsonl:data/golden3.jsonl, ami:/data/ami, floras:/data/floras)")
    path, _, query = rest.partition("?")
    if not path:
        raise BenchmarkError(f"benchmark spec {spec!r}: the path is empty")
    options: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, equals, value = pair.partition("=")
        if not equals or key not in _OPTIONS[kind]:
            raise BenchmarkError(f"benchmark spec {spec!r}: unknown option {pair!r}; {kind} takes "
                                 f"{', '.join(k + '=...' for k in _OPTIONS[kind])}")
        options[key] = value
    return kind, path, options


def load_benchmark(spec: str, name: str | None = None) -> Benchmark:
    """A `Benchmark` from a spec (docs/benchmarks.md); files are checked now, audio read later."""
    kind, path, options = parse_spec(spec)
    limit = _positive_int(options.pop("limit", None), "limit", spec)
    if kind == "jsonl":
        items = _jsonl_items(Path(path))
        factory = lambda: iter(items)  # noqa: E731
        default_name = Path(path).stem
    elif kind == "ami":
        items = ami_items(Path(path), options)
        factory = lambda: iter(items)  # noqa: E731
        default_name = "ami"
    else:
        factory = floras_factory(Path(path), options, spec)
        default_name = "floras"
    return Benchmark(name=name or default_name, spec=spec, kind=kind, _items=factory, limit=limit)


def _positive_int(value: str | None, key: str, spec: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise BenchmarkError(f"benchmark spec {spec!r}: {key} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# jsonl: the in-house manifest format


def _jsonl_items(path: Path) -> list[BenchmarkItem]:
    from data.manifest import DataError, Issue, read_manifest

    report = read_manifest(path, require=("instruction",))
    issues = list(report.errors)
    items = []
    for entry in report.entries:
        extra = dict(entry.extra)
        source = extra.pop("judge_source", None)
        if source is not None and not isinstance(source, str):
            source = json.dumps(source, ensure_ascii=False, sort_keys=True)
        if entry.transcript is None and source is None:
            issues.append(Issue(entry.file, entry.line, "transcript",
                                "missing; the judge reads it (or give `judge_source`)"))
            continue
        if entry.lang is not None:
            extra.setdefault("lang", entry.lang)
        items.append(BenchmarkItem(
            id=entry.id, audio_path=entry.audio_path, offset=entry.offset, duration=entry.duration,
            transcript=entry.transcript or "", instruction=entry.instruction, reference=entry.summary,
            source=source, metadata=extra,
        ))
    if issues:
        raise DataError(issues)
    if not items:
        raise BenchmarkError(f"{path}: the benchmark manifest has no items")
    return items
