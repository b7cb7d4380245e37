"""Judge-free measures of one output: repetition, length against the requested length, format
validity, emptiness. They cost nothing, run on every output, and catch the failures a judge
score hides in an average: the "- How to Get Away - How to Get Away ..." loop the paper reports
after on-policy KD (section 3), an answer that ignores "in 3 bullet points", or an empty reply.

    d = diagnose("- How to Get Away - How to Get Away - How to Get Away", "Give a title.")
    d.repeated_ngram_fraction   # 0.56: 5 of the 9 word 4-grams repeat an earlier one
    d.longest_repeated_span     # 8: "how to get away how to get away" occurs twice (overlapping)

Tokens are lower-cased words (letters and digits, with inner ' or -), punctuation dropped; a
character of a script written without spaces (CJK, kana, hangul) is a token of its own
(data/text.py, which holds the project's one repetition measure).
- `repeated_ngram_fraction`: share of the output's n-grams (n = 4) equal to an earlier n-gram
  of the same output; 0 for outputs with fewer than two n-grams (data.text.repetition: the
  same number in the KD log, the preference-pair statistics, this table and the toy oracle).
- `longest_repeated_span`: the length in tokens of the longest token sequence that occurs at
  least twice (occurrences may overlap, so a loop of period p over L tokens scores L - p: the
  measure grows with the loop), and `repeated_span` that text.
- Requested length: `metadata["requested_length"]` = {"unit": "words"|"sentences"|"bullets"|
  "paragraphs", "min": a, "max": b} when the item has one (null: no length asked), else read
  from the instruction: "at most / no more than / under / up to / fewer than N" -> [0, N];
  "at least / more than / over N" -> [N, inf); "between A and B", "A-B", "A to B" -> [A, B];
  "about / around / roughly / approximately N" and a bare "N words" -> N +- 25% for words,
  N +- 1 for the countable units; a bare "3 bullet points" or "in two sentences" -> exactly N.
  Numbers may be written as words up to twenty.
  `length` is the output's count in that unit, `length_ok` whether it is in range and
  `length_ratio` = length / N (N the target; the middle of a range).
  Counting: words as above; sentences: runs ending in . ! ? (or a line end); bullets: lines
  starting with -, *, +, a bullet character or "1." / "1)"; paragraphs: blocks between blank lines.
- Requested format: `metadata["format"]` when the item has one ("json", "bullets" or
  "numbered" are checked; any other value, e.g. "prose", means no check); else read from the
  instruction: "json" anywhere -> the output, code fences stripped, must parse as a JSON object
  or array; else "numbered list" -> numbered lines; else "bullet" -> bullet lines. Valid when at
  least one line has the marker and marked lines are at least half of the non-empty lines (a
  heading or a closing line is allowed). None when no format was asked for.
- `empty`: no letter or digit at all.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from data.text import repeated_ngram_fraction, tokens

WORD_TOLERANCE = 0.25
UNITS = ("words", "sentences", "bullets", "paragraphs")
FORMATS = ("json", "bullets", "numbered")

_BULLET_LINE = re.compile(r"^\s*(?:[-*+•‣▪◦–—·])\s+\S")
_NUMBERED_LINE = re.compile(r"^\s*\d{1,3}[.)]\s+\S")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER = r"(\d+|" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")"
_UNIT = r"(words?|sentences?|bullet(?:\s+points?)?s?|(?:key\s+)?points|paragraphs?)"
_LENGTH_PATTERNS = (  # (regex, kind); tried in order, the first match wins
    (re.compile(rf"\bbetween\s+{_NUMBER}\s+and\s+{_NUMBER}\s+{_UNIT}", re.I), "range"),
    (re.compile(rf"\b{_NUMBER}\s*(?:-|–|to)\s*{_NUMBER}\s+{_UNIT}", re.I), "range"),
    (re.compile(rf"\b(?:at\s+most|no\s+more\s+than|not\s+more\s+than|up\s+to|under|fewer\s+than|less\s+than|"
                rf"maximum(?:\s+of)?|max\.?|within)\s+{_NUMBER}\s+{_UNIT}", re.I), "max"),
    (re.compile(rf"\b(?:at\s+least|more\s+than|over|minimum(?:\s+of)?)\s+{_NUMBER}\s+{_UNIT}", re.I), "min"),
    (re.compile(rf"\b(?:about|around|roughly|approximately|approx\.?|some)\s+{_NUMBER}\s+{_UNIT}", re.I), "about"),
    (re.compile(rf"\b{_NUMBER}\s+{_UNIT}", re.I), "bare"),
)


@dataclass(frozen=True)
class RequestedLength:
    unit: str  # one of UNITS
    low: float
    high: float  # math.inf: no upper bound
    target: float  # what length_ratio divides by


@dataclass(frozen=True)
class Diagnostics:
    words: int
    repeated_ngram_fraction: float
    longest_repeated_span: int
    repeated_span: str
    requested_length: RequestedLength | None
    length: int | None  # the output's count in requested_length.unit
    length_ok: bool | None
    length_ratio: float | None
    requested_format: str | None
    format_valid: bool | None
    empty: bool

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        if self.requested_length is not None:
            row["requested_length"] = {"unit": self.requested_length.unit, "min": self.requested_length.low,
                                       "max": None if math.isinf(self.requested_length.high)
                                       else self.requested_length.high}
        return row


def longest_repeated_span(words: Sequence[str]) -> tuple[int, int]:
    """(length, start) of the longest run of tokens that occurs twice (overlap allowed); (0, 0) if none.

    For every shift d the positions i with words[i] == words[i + d] are compared at once; the
    longest run of equal positions over all shifts is the answer. O(n^2) comparisons, vectorised.
    """
    if len(words) < 2:
        return 0, 0
    vocabulary: dict[str, int] = {}
    ids = np.array([vocabulary.setdefault(w, len(vocabulary)) for w in words], dtype=np.int64)
    best, best_start = 0, 0
    for shift in range(1, len(ids)):
        if len(ids) - shift <= best:
            break  # no longer run is possible at this or larger shifts
        equal = np.concatenate(([0], (ids[:-shift] == ids[shift:]).astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(equal))  # run starts and ends, alternating
        if edges.size == 0:
            continue
        starts, ends = edges[0::2], edges[1::2]
        longest = int(np.argmax(ends - starts))
        if ends[longest] - starts[longest] > best:
            best, best_start = int(ends[longest] - starts[longest]), int(starts[longest])
    return best, best_start


def _number(text: str) -> int:
    return int(text) if text.isdigit() else _NUMBER_WORDS[text.lower()]


def _unit(text: str) -> str:
    text = text.lower()
    if text.startswith("word"):
        return "words"
    if text.startswith("sentence"):
        return "sentences"
    if text.startswith("paragraph"):
        return "paragraphs"
    return "bullets"


def requested_length(instruction: str, metadata: Mapping[str, Any] | None = None) -> RequestedLength | None:
    """The length the instruction asks for, or None (see the module docstring)."""
    if metadata and "requested_length" in metadata and not isinstance(metadata["requested_length"], Mapping):
        return None
    given = (metadata or {}).get("requested_length")
    if isinstance(given, Mapping) and given.get("unit") in UNITS:
        low = float(given.get("min") or 0)
        high = float(given["max"]) if given.get("max") is not None else math.inf
        return RequestedLength(given["unit"], low, high, high if math.isfinite(high) else max(low, 1.0))
    for pattern, kind in _LENGTH_PATTERNS:
        match = pattern.search(instruction)
        if not match:
            continue
        groups = match.groups()
        unit = _unit(groups[-1])
        if kind == "range":
            low, high = sorted((_number(groups[0]), _number(groups[1])))
            return RequestedLength(unit, low, high, (low + high) / 2)
        value = _number(groups[0])
        if value < 1:
            return None
        if kind == "max":
            return RequestedLength(unit, 0, value, value)
        if kind == "min":
            return RequestedLength(unit, value, math.inf, value)
        if unit == "words":
            return RequestedLength(unit, value * (1 - WORD_TOLERANCE), value * (1 + WORD_TOLERANCE), value)
        slack = 1 if kind == "about" else 0
        return RequestedLength(unit, value - slack, value + slack, value)
    return None


def count(text: str, unit: str) -> int:
    """The length of `text` in `unit` (see the module docstring)."""
    if unit == "words":
        return len(tokens(text))
    if unit == "bullets":
        return sum(1 for line in text.splitlines() if _BULLET_LINE.match(line) or _NUMBERED_LINE.match(line))
    if unit == "paragraphs":
        return sum(1 for block in re.split(r"\n\s*\n", text) if tokens(block))
    pieces = re.split(r"[.!?。！？]+(?=\s|$)|\n+", text)
    return sum(1 for piece in pieces if tokens(piece))


def requested_format(instruction: str, metadata: Mapping[str, Any] | None = None) -> str | None:
    """"json" | "bullets" | "numbered" | None; `metadata["format"]`, when present, decides."""
    if metadata and "format" in metadata:
        return metadata["format"] if metadata["format"] in FORMATS else None
    if re.search(r"\bjson\b", instruction, re.I):
        return "json"
    if re.search(r"\bnumbered\s+list\b", instruction, re.I):
        return "numbered"
    if re.search(r"\bbullet", instruction, re.I):
        return "bullets"
    return None


def format_valid(output: str, fmt: str) -> bool:
    """Whether `output` has the format `fmt` (see the module docstring)."""
    if fmt == "json":
        text = output.strip()
        fenced = re.fullmatch(r"```[A-Za-z]*\s*\n?(.*?)\n?\s*```", text, re.S)
        if fenced:
            text = fenced.group(1)
        try:
            return isinstance(json.loads(text), (dict, list))
        except ValueError:
            return False
    marker = _NUMBERED_LINE if fmt == "numbered" else _BULLET_LINE
    lines = [line for line in output.splitlines() if line.strip()]
    marked = sum(1 for line in lines if marker.match(line))
    return marked >= 1 and 2 * marked >= len(lines)


def diagnose(output: str, instruction: str, metadata: Mapping[str, Any] | None = None) -> Diagnostics:
    """Every judge-free measure of one output (see the module docstring)."""
    words = tokens(output)
    span, start = longest_repeated_span(words)
    length_request = requested_length(instruction, metadata)
    length = ok = ratio = None
    if length_request is not None:
        length = count(output, length_request.unit)
        ok = length_request.low <= length <= length_request.high
        ratio = length / length_request.target if length_request.target else None
    fmt = requested_format(instruction, metadata)
    return Diagnostics(
        words=len(words),
        repeated_ngram_fraction=repeated_ngram_fraction(words),
        longest_repeated_span=span,
        repeated_span=" ".join(words[start : start + span]),
        requested_length=length_request,
        length=length,
        length_ok=ok,
        length_ratio=ratio,
        requested_format=fmt,
        format_valid=None if fmt is None else format_valid(output, fmt),
        empty=not re.search(r"[^\W_]", output),
    )
