"""`python -m data.check MANIFEST...`: every problem of the manifests and their audio, then a summary.

    python -m data.check train.jsonl dev.jsonl --task sft --max-duration 1800 \
        --checkpoint Phi-4-multimodal-instruct/ [--decode]

Checks, each problem printed as "FILE:LINE: field 'name': what is wrong; what to do":
  1. every line (data/manifest.py): UTF-8, JSON object, required fields, types, blank texts,
     duplicate ids, the maximum duration (`--max-duration`, `--on-too-long error|truncate`);
  2. every audio file's header (data/audio.py): missing, empty, damaged, not audio, no samples,
     an offset past the end, a duration that runs past the end (`--no-audio` skips 2-3);
  3. with `--decode`, every sample: decoding errors and NaN / infinite samples (slow: reads all
     the audio);
  4. with a tokenizer (`--checkpoint DIR`, or `--tokenizer PATH --max-context N`), whether each
     example fits the model's context (`--reserve N` tokens kept free for generation).
Which fields are required follows `--task`: sft (instruction, summary), prompt (instruction;
the KD and DPO pools), synth (transcript), any (none, the default); `--require` adds more.

Then a summary: lines, usable entries, hours, field and language counts, audio formats
(8-bit, 24-bit, stereo and non-16 kHz files are fine: they are converted when loaded) and a
duration histogram. Exit status: 0 when no line has an error (warnings allowed), 1 when any
has, 2 when the check itself cannot run (e.g. a missing tokenizer). No tracebacks for bad data.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from model.errors import report_error

from .manifest import TEXT_FIELDS, DataError, Issue, IssueSplit, ManifestEntry, read_manifest

TASK_FIELDS = {"any": (), "sft": ("instruction", "summary"), "prompt": ("instruction",), "synth": ("transcript",)}
HISTOGRAM_BINS = ((10, "< 10 s"), (60, "10 s - 1 min"), (300, "1 - 5 min"), (600, "5 - 10 min"),
                  (1800, "10 - 30 min"), (3600, "30 - 60 min"), (math.inf, ">= 60 min"))


@dataclass
class CheckResult(IssueSplit):
    paths: list[str]
    lines: int
    issues: list[Issue]  # errors and warnings, in file and line order
    entries: list[ManifestEntry]  # lines without any error
    formats: Counter = field(default_factory=Counter)  # "WAV PCM_16, 16000 Hz, 1 ch" -> entries

    def summary(self) -> dict[str, Any]:
        durations = [entry.duration for entry in self.entries]
        histogram = {label: 0 for _, label in HISTOGRAM_BINS}
        for seconds in durations:
            histogram[next(label for limit, label in HISTOGRAM_BINS if seconds < limit)] += 1
        bad_lines = {(issue.file, issue.line) for issue in self.errors}
        return {
            "manifests": len(self.paths),
            "lines": self.lines,
            "usable": len(self.entries),
            "lines_with_errors": len(bad_lines),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "hours": sum(durations) / 3600,
            "mean_seconds": sum(durations) / len(durations) if durations else 0.0,
            "min_seconds": min(durations, default=0.0),
            "max_seconds": max(durations, default=0.0),
            "fields": {name: sum(getattr(e, name) is not None for e in self.entries) for name in TEXT_FIELDS},
            "langs": dict(Counter(e.lang for e in self.entries if e.lang).most_common()),
            "formats": dict(self.formats.most_common()),
            "histogram": histogram,
        }


def check_manifests(
    paths: Sequence[str | Path],
    *,
    task: str = "any",
    require: Sequence[str] = (),
    max_duration: float | None = 1800.0,
    on_too_long: str = "error",
    audio: bool = True,
    decode: bool = False,
    tokenizer=None,
    max_context: int | None = None,
    reserve_tokens: int = 0,
) -> CheckResult:
    """Run the checks of the module docstring; nothing is printed or raised for bad data."""
    if task not in TASK_FIELDS:
        raise ValueError(f"task must be one of {tuple(TASK_FIELDS)}, got {task!r}")
    required = tuple(dict.fromkeys(TASK_FIELDS[task] + tuple(require)))
    report = read_manifest(paths, require=required, max_duration=max_duration, on_too_long=on_too_long)
    issues = list(report.issues)
    entries = report.entries
    formats: Counter = Counter()
    if audio or tokenizer is not None:
        from .audio import (FLOAT_PEAK_TOLERANCE, AudioError, DurationPolicy, load_audio, peak_warning, probe,
                            segment_frames)
        from .dataset import ManifestDataset

        policy = DurationPolicy(max_duration, on_too_long)
        dataset = None
        if tokenizer is not None:
            sized = [e for e in entries if e.instruction is not None and (task != "sft" or e.summary is not None)]
            dataset = ManifestDataset(sized, tokenizer, task="sft" if task == "sft" else "prompt",
                                      max_context=max_context, reserve_tokens=reserve_tokens, policy=policy,
                                      shuffle=False)
            issues += dataset.issues
            seen = len(dataset.issues)  # decoding below adds its warnings (float peaks) there
        failed = {(issue.file, issue.line) for issue in issues if issue.severity == "error"}
        index_of = {} if dataset is None else {id(entry): i for i, entry in enumerate(dataset.entries)}
        for entry in entries if audio else ():
            if (entry.file, entry.line) in failed:
                continue
            try:
                info = probe(entry.audio_path)
                segment_frames(info, entry.offset, entry.duration, DurationPolicy(max_seconds=None))
                if decode and id(entry) in index_of:
                    dataset.example(index_of[id(entry)])  # audio, features and the real context check
                elif decode:
                    loaded = load_audio(entry.audio_path, offset=entry.offset, duration=entry.duration, policy=policy)
                    if loaded.peak > 1.0 + FLOAT_PEAK_TOLERANCE:
                        issues.append(entry.issue("audio_filepath", peak_warning(loaded.peak), severity="warning"))
                formats[f"{info.format} {info.subtype}, {info.sample_rate} Hz, {info.channels} ch"] += 1
            except AudioError as error:
                issues.append(entry.issue(error.field, str(error)))
            except DataError as error:
                issues += error.issues
        if dataset is not None:
            issues += dataset.issues[seen:]
    order = {str(path): i for i, path in enumerate(paths)}
    issues.sort(key=lambda issue: (order.get(issue.file, len(order)), issue.line or 0))
    failed = {(issue.file, issue.line) for issue in issues if issue.severity == "error"}
    usable = [entry for entry in entries if (entry.file, entry.line) not in failed]
    return CheckResult([str(p) for p in paths], report.lines, issues, usable, formats)


def format_summary(result: CheckResult) -> str:
    stats = result.summary()
    lines = [
        f"checked {stats['manifests']} manifest(s), {stats['lines']} lines: {stats['usable']} usable, "
        f"{stats['lines_with_errors']} with errors ({stats['errors']} problems), {stats['warnings']} warnings",
        f"audio: {stats['hours']:.2f} h in {stats['usable']} entries (mean {_clock(stats['mean_seconds'])}, "
        f"shortest {_clock(stats['min_seconds'])}, longest {_clock(stats['max_seconds'])})",
        "fields: " + ", ".join(f"{name} {count}" for name, count in stats["fields"].items()),
    ]
    if stats["langs"]:
        lines.append("languages: " + ", ".join(f"{lang} {count}" for lang, count in stats["langs"].items()))
    if stats["formats"]:
        lines.append("formats: " + "; ".join(f"{fmt}: {count}" for fmt, count in stats["formats"].items()))
    lines.append("duration histogram:")
    top = max(stats["histogram"].values(), default=0) or 1
    for label, count in stats["histogram"].items():
        lines.append(f"  {label:>13} {count:6d} {'#' * math.ceil(40 * count / top)}")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.check", description=__doc__.split("\n")[0])
    parser.add_argument("manifests", nargs="+", help="JSON-lines manifests")
    parser.add_argument("--task", choices=tuple(TASK_FIELDS), default="any", help="which fields are required")
    parser.add_argument("--require", default="", help="more required fields, comma-separated")
    parser.add_argument("--max-duration", type=float, default=1800.0, help="seconds; 0 = no limit (default 1800)")
    parser.add_argument("--on-too-long", choices=("error", "truncate"), default="error")
    parser.add_argument("--no-audio", action="store_true", help="do not open the audio files")
    parser.add_argument("--decode", action="store_true", help="read every sample (NaN, decoding errors)")
    parser.add_argument("--checkpoint", help="model directory: its tokenizer and context length")
    parser.add_argument("--tokenizer", help="tokenizer file or directory (overrides --checkpoint's)")
    parser.add_argument("--max-context", type=int, help="the model's context in tokens (overrides --checkpoint's)")
    parser.add_argument("--reserve", type=int, default=0, help="tokens kept free for generation")
    args = parser.parse_args(argv)
    data_logger = logging.getLogger("data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # the problems are printed below, once each
    try:
        tokenizer, max_context = _model_limits(args)
        result = check_manifests(
            args.manifests, task=args.task, require=[f for f in args.require.split(",") if f.strip()],
            max_duration=args.max_duration or None, on_too_long=args.on_too_long, audio=not args.no_audio,
            decode=args.decode, tokenizer=tokenizer, max_context=max_context, reserve_tokens=args.reserve,
        )
    except (ValueError, OSError, ImportError) as error:  # the check cannot run (bad option, tokenizer)
        return report_error("data.check", error)
    finally:
        data_logger.setLevel(level)
    for issue in result.issues:
        print(issue)
    if result.issues:
        print()
    print(format_summary(result))
    return 1 if result.errors else 0


def _model_limits(args) -> tuple[Any, int | None]:
    tokenizer, max_context = None, args.max_context
    if args.checkpoint or args.tokenizer:
        from model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    if args.checkpoint and max_context is None:
        from model.checkpoint import read_config

        max_context = read_config(Path(args.checkpoint)).decoder.max_position_embeddings
    if tokenizer is not None and max_context is None:
        raise ValueError("--tokenizer needs --max-context (or pass --checkpoint, whose config gives it)")
    return tokenizer, max_context


if __name__ == "__main__":
    sys.exit(main())
