"""JSON-lines manifests in the NeMo style, validated with every problem reported at once.

Kept in one module: the entry type, the file reader and every field's rule are one format.

One recording (or one segment of it) per line:

    {"audio_filepath": "meetings/ES2004a.wav", "duration": 1403.2, "offset": 0.0, "id": "ES2004a",
     "lang": "en", "transcript": "...", "instruction": "Summarize the meeting in 5 bullets.",
     "summary": "- ..."}

`audio_filepath` and `duration` are required (`null`: read from the audio header), NeMo's
names (`text`, `context`, `answer`) are read as aliases, and other keys are kept in `extra`
and written back. Which text fields a stage needs is the caller's `require=`. `read_manifest`
never stops at the first problem: it returns the good entries and an `Issue` naming file, line
and field for every problem, so a user fixes a manifest in one pass. Standard library only, so
`python -m data.check --no-audio` starts without torch.

Details (every field, ids, aliases, the maximum-duration policy): docs/manifests.md.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

REQUIRED_FIELDS = ("audio_filepath", "duration")
TEXT_FIELDS = ("lang", "transcript", "instruction", "summary")
ALIASES = {"text": "transcript", "context": "instruction", "answer": "summary"}  # NeMo's name -> ours
KNOWN_FIELDS = (*REQUIRED_FIELDS, "offset", "id", *TEXT_FIELDS, *ALIASES)
ON_TOO_LONG = ("error", "truncate")
_IMPLICIT_ID = "\0implicit-id"  # marks an id derived from the path until read_manifest makes it unique


@dataclass(frozen=True)
class Issue:
    """One problem of one manifest line; `str()` is the message users see."""

    file: str
    line: int | None  # 1-based; None for a problem of the whole file
    field: str | None  # the manifest field, None for a problem of the whole line
    message: str
    severity: str = "error"  # "error" or "warning"
    reason: str = "manifest"  # a short key for counters (data/dataset.py: why a sample was left out)

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"field '{self.field}': " if self.field else ""
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {prefix}{what}{self.message}"


class DataError(ValueError):
    """Bad input data; the message names file, line and field. The CLIs print it without a traceback."""

    def __init__(self, issues: Issue | Iterable[Issue]):
        if isinstance(issues, str):
            raise TypeError("DataError takes Issue objects (file, line, field, message), not a string")
        self.issues = [issues] if isinstance(issues, Issue) else list(issues)
        shown = [str(issue) for issue in self.issues[:20]]
        more = len(self.issues) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more" if more > 0 else ""))


@dataclass
class ManifestEntry:
    """One validated manifest line. `audio_path` is `audio_filepath` resolved against the manifest's folder."""

    id: str
    audio_filepath: str  # as written in the manifest
    audio_path: Path  # absolute
    duration: float  # seconds, from `offset`
    offset: float = 0.0
    lang: str | None = None
    transcript: str | None = None
    instruction: str | None = None
    summary: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    file: str = ""  # the manifest it came from
    line: int = 0  # 1-based line in that manifest

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def issue(self, field_name: str | None, message: str, severity: str = "error") -> Issue:
        return Issue(self.file, self.line, field_name, message, severity)

    def to_json(self, *, absolute_path: bool = False) -> dict[str, Any]:
        """The manifest row (known fields, then `extra`), as `read_manifest` would read it back."""
        row: dict[str, Any] = {
            "audio_filepath": str(self.audio_path) if absolute_path else self.audio_filepath,
            "duration": self.duration,
        }
        if self.offset:
            row["offset"] = self.offset
        row["id"] = self.id
        for name in TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                row[name] = value
        row.update(self.extra)
        return row


class IssueSplit:
    """`issues` split by severity (for classes that hold an `issues` list)."""

    issues: list[Issue]

    @property
    def errors(self) -> list[Issue]:
        return [issue for issue in self.issues if issue.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [issue for issue in self.issues if issue.severity == "warning"]


@dataclass
class ManifestReport(IssueSplit):
    """What `read_manifest` found: the usable entries, and every error and warning."""

    entries: list[ManifestEntry]
    issues: list[Issue]
    lines: int = 0  # non-blank lines read


def read_manifest(
    paths: str | Path | Iterable[str | Path],
    *,
    require: Iterable[str] = (),
    max_duration: float | None = None,
    on_too_long: str = "error",
) -> ManifestReport:
    """Parse and validate one or more manifests; ids must be unique across all of them.

    `require`: text fields every line must have (besides audio_filepath and duration).
    `max_duration`, `on_too_long`: the maximum-duration policy of data/audio.py, applied at read
    time: under "error" a longer entry is an error, under "truncate" it is kept with a warning.
    An entry with any error is left out of `entries`; warnings keep it.
    """
    if on_too_long not in ON_TOO_LONG:
        raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, got {on_too_long!r}")
    required = tuple(require)
    unknown = [name for name in required if name not in TEXT_FIELDS]
    if unknown:
        raise ValueError(f"require: unknown field(s) {unknown}; choose from {TEXT_FIELDS}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    report = ManifestReport(entries=[], issues=[])
    first_seen: dict[str, str] = {}
    for path in paths:
        _read_one(Path(path), required, max_duration, on_too_long, report, first_seen)
    return report


def load_manifest(paths, **options) -> list[ManifestEntry]:
    """`read_manifest`, raising DataError with every error when there is any."""
    report = read_manifest(paths, **options)
    if report.errors:
        raise DataError(report.errors)
    return report.entries


def _read_one(path: Path, required, max_duration, on_too_long, report: ManifestReport, first_seen) -> None:
    name = str(path)
    if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
        what = "a folder" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
        report.issues.append(Issue(name, None, None, f"the manifest is {what}; give a JSON-lines file"))
        return
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        report.issues.append(Issue(name, None, None, "manifest not found; check the path"))
        return
    except OSError as error:
        report.issues.append(Issue(name, None, None, f"cannot read the manifest: {error.strerror or error}"))
        return
    folder = path.resolve().parent
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if number == 1 and line_bytes.startswith(b"\xef\xbb\xbf"):
            line_bytes = line_bytes[3:]
        if not line_bytes.strip():
            continue
        report.lines += 1
        issues: list[Issue] = []
        entry = _parse_line(line_bytes, name, number, folder, required, max_duration, on_too_long, issues)
        if entry is not None and not any(issue.severity == "error" for issue in issues):
            if entry.extra.pop(_IMPLICIT_ID, False) and entry.id in first_seen:
                repeat = 2
                while f"{entry.id}#{repeat}" in first_seen:
                    repeat += 1
                entry.id = f"{entry.id}#{repeat}"
            if entry.id in first_seen:
                issues.append(Issue(name, number, "id", f"duplicate id {entry.id!r} (first at {first_seen[entry.id]}); "
                                    "ids must be unique across the manifests read together"))
            else:
                first_seen[entry.id] = f"{name}:{number}"
        report.issues.extend(issues)
        if entry is not None and not any(issue.severity == "error" for issue in issues):
            report.entries.append(entry)


def _parse_line(line_bytes: bytes, file: str, line: int, folder: Path, required, max_duration, on_too_long,
                issues: list[Issue]) -> ManifestEntry | None:
    def problem(field_name, message, severity="error"):
        issues.append(Issue(file, line, field_name, message, severity))

    try:
        text = line_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        problem(None, f"not valid UTF-8 (byte 0x{line_bytes[error.start]:02x} at column {error.start + 1}); "
                      "re-encode the manifest as UTF-8")
        return None
    repeated: list[tuple[str, Any]] = []
    try:
        row = json.loads(text, parse_int=_bounded_int, object_pairs_hook=_keeping_repeats(repeated))
    except json.JSONDecodeError as error:
        problem(None, f"not valid JSON: {error.msg} (column {error.colno}); each line must be one JSON object")
        return None
    except RecursionError:
        problem(None, "not usable JSON: nested deeper than Python's recursion limit; each line must be one flat "
                      "JSON object")
        return None
    except ValueError as error:  # _bounded_int
        problem(None, f"not usable JSON: {error}")
        return None
    if not isinstance(row, dict):
        problem(None, f"expected a JSON object, got {_json_type(row)}; each line must be one JSON object")
        return None
    for key, value in repeated:
        problem(key if isinstance(key, str) else None, f"the key appears more than once in this line; the last value "
                f"({json.dumps(value)[:40]}) is used: remove the others", "warning")
    for name in TEXT_FIELDS + tuple(ALIASES):
        position = _lone_surrogate(row.get(name))
        if position is not None:
            problem(name, f"holds a lone surrogate (\\u{ord(row[name][position]):04x} at character {position + 1}), "
                          "which is not a character: fix the text (it usually comes from a bad conversion)")
            return None

    source = {name: name for name in TEXT_FIELDS}  # the key each text field is read from
    for alias, name in ALIASES.items():
        if row.get(alias) is None:
            continue
        if row.get(name) is None:
            row[name], source[name] = row[alias], alias
        elif row[alias] != row[name]:
            problem(alias, f"NeMo's name for '{name}', which this line also has with another value; '{name}' is "
                           f"used and '{alias}' is ignored: remove one of them", "warning")

    duration_from_header = "duration" in row and row["duration"] is None
    for name in REQUIRED_FIELDS + tuple(required):
        if name == "duration" and duration_from_header:
            continue
        if name not in row or row[name] is None:
            problem(name, "missing; every line needs it" if name in REQUIRED_FIELDS
                    else "missing; this step needs it on every line")

    audio_filepath = row.get("audio_filepath")
    if audio_filepath is not None:
        if not isinstance(audio_filepath, str):
            problem("audio_filepath", f"expected a path string, got {_shown(audio_filepath)}")
            audio_filepath = None
        elif not audio_filepath.strip():
            problem("audio_filepath", "is empty; give the audio file's path")
            audio_filepath = None

    duration = _number(row, "duration", problem, positive=True)
    offset = _number(row, "offset", problem, positive=False)
    if duration is not None and max_duration is not None and duration > max_duration:
        if on_too_long == "error":
            problem("duration", f"{duration:g} s is longer than the limit of {max_duration:g} s; split the recording "
                                "(offset/duration) or raise the limit (max_duration)")
        else:
            problem("duration", f"{duration:g} s is longer than the limit of {max_duration:g} s; "
                                f"only the first {max_duration:g} s will be used", "warning")

    entry_id = row.get("id")
    if entry_id is not None:
        if isinstance(entry_id, bool) or not isinstance(entry_id, (str, int)):
            problem("id", f"expected a string, got {_shown(entry_id)}")
            entry_id = None
        elif not str(entry_id).strip():
            problem("id", "is empty; give a unique id or leave the field out")
            entry_id = None
        else:
            entry_id = str(entry_id)

    texts: dict[str, str | None] = {}
    for name in TEXT_FIELDS:
        value = row.get(name)
        texts[name] = None
        if value is None:
            continue
        if not isinstance(value, str):
            problem(source[name], f"expected a string, got {_shown(value)}")
        elif not value.strip():
            problem(source[name], "is empty; write it, or leave the field out")
        else:
            texts[name] = value

    if audio_filepath is None or (duration is None and not duration_from_header) or any(
            issue.severity == "error" for issue in issues):
        return None
    offset = offset or 0.0
    path = Path(audio_filepath)
    if duration_from_header:
        duration = _duration_from_header(path if path.is_absolute() else folder / path, offset, problem)
        if duration is None:
            return None
        if max_duration is not None and duration > max_duration:
            if on_too_long == "error":
                problem("duration", f"null, and the file holds {duration:g} s after the offset, longer than the limit "
                                    f"of {max_duration:g} s; split the recording (offset/duration) or raise the limit "
                                    "(max_duration)")
                return None
            problem("duration", f"null, and the file holds {duration:g} s after the offset, longer than the limit of "
                                f"{max_duration:g} s; only the first {max_duration:g} s will be used", "warning")
    extra = {k: v for k, v in row.items() if k not in KNOWN_FIELDS}
    if entry_id is None:
        entry_id = audio_filepath if offset == 0 else f"{audio_filepath}@{offset:g}"
        extra[_IMPLICIT_ID] = True
    return ManifestEntry(
        id=entry_id,
        audio_filepath=audio_filepath,
        audio_path=path if path.is_absolute() else folder / path,
        duration=duration,
        offset=offset,
        extra=extra,
        file=file,
        line=line,
        **texts,
    )


def _duration_from_header(path: Path, offset: float, problem) -> float | None:
    """The seconds of `path` after `offset`, from its header (a null `duration`); None after a problem."""
    try:
        from .audio import AudioError, probe
    except ImportError as error:
        problem("duration", f"null, and reading it from the audio header needs {error.name or 'data.audio'}, which "
                            f"cannot be imported ({error}); install it, or write the duration in seconds")
        return None
    try:
        info = probe(path)
    except AudioError as error:
        problem(error.field, f"{error} ('duration' is null, so it is read from this file's header)")
        return None
    seconds = info.duration - offset
    if seconds <= 0:
        problem("offset", f"{offset:g} s is at or past the end of the file, which is {info.duration:g} s long "
                          "('duration' is null, so the rest of the file was asked for); fix the offset")
        return None
    return seconds


MAX_INT_DIGITS = 4300  # Python's own limit for int(str); past it json.loads fails naming no line


def _bounded_int(digits: str) -> int:
    """json's parse_int: refuses the integers whose conversion alone is a hazard (Python refuses
    over 4300 digits with an error that names no line; 1 followed by 400 zeros overflows float)."""
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are read); "
                         "write the number as it is meant, e.g. 12.5")
    return int(digits)


def _keeping_repeats(repeated: list):
    """json's object_pairs_hook: the dict json would build (the last value of a key wins), with
    each key given more than once appended to `repeated` as (key, last value)."""
    def hook(pairs):
        row = dict(pairs)
        if len(row) < len(pairs):
            counts = Counter(key for key, _ in pairs)
            repeated.extend((key, row[key]) for key in row if counts[key] > 1)
        return row
    return hook


def _lone_surrogate(value) -> int | None:
    """Index of the first lone surrogate in a string (JSON's \\ud800 decodes to one), else None."""
    if not isinstance(value, str):
        return None
    for index, char in enumerate(value):
        if "\ud800" <= char <= "\udfff":
            return index
    return None


def _number(row: dict, name: str, problem, *, positive: bool) -> float | None:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problem(name, f"expected a number of seconds, got {_shown(value)}")
        return None
    try:
        value = float(value)
    except OverflowError:
        problem(name, f"expected a number of seconds, got an integer of {len(str(abs(value)))} digits")
        return None
    if not math.isfinite(value):
        problem(name, f"expected a finite number of seconds, got {value}")
        return None
    if positive and value <= 0:
        problem(name, f"must be > 0 seconds, got {value:g}")
        return None
    if value < 0:
        problem(name, f"must be >= 0 seconds, got {value:g}")
        return None
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return f"'{value if len(value) <= 40 else value[:37] + '...'}' (a string)"
    text = json.dumps(value, ensure_ascii=False)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({_json_type(value)})"
