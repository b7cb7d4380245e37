"""Benchmark loaders: the three evaluation sets of the paper (section 3.4, Table 1) as items of
(id, audio, transcript, instruction, optional reference).

    benchmark = load_benchmark("ami:/data/ami?instructions=/data/ami_instructions.jsonl")
    for item in benchmark.items():
        waveform = item.load_waveform()            # (samples,) float32, mono, 16 kHz
        judge.score(item.judge_source, item.instruction, summary)

A spec is `KIND:PATH[?option=value&...]`; every kind takes `limit=N` (the first N items).

`jsonl:PATH` - a manifest in the format of data/manifest.py with an instruction on every line
(the Golden3-style in-house format: one line per (recording, instruction), several lines per
recording). `transcript` is what the judge reads, `summary` (optional) the reference. The
optional field `judge_source` replaces the transcript as the judge's source (the toy world
writes its structured meeting record there, which its oracle judge parses): a string is used as
is, a JSON object or list is serialised with sorted keys. A line needs `transcript` unless it
has `judge_source`. Other fields go to `BenchmarkItem.metadata` (e.g. `requested_length`,
`format`: see eval/diagnostics.py).

`ami:DIR` - whole AMI meetings as distributed (annotations CC BY 4.0):
  - audio: `{M}.Mix-Headset.wav` in DIR, `DIR/{M}/audio/` or `DIR/amicorpus/{M}/audio/` (the
    download layout); failing that the close-talk channels `{M}.Headset-{0..4}.wav` there,
    mixed by summing (then scaled down if the sum's peak exceeds 1), as Mix-Headset is a sum;
  - words: `words/{M}.{A..E}.words.xml` (NXT, namespace http://nite.sourceforge.net/) under
    DIR or `annotations=PATH` (the unzipped ami_public_manual_1.6.2). Each `<w>` is a word;
    `punc="true"` words are glued to the word before them of the same speaker; `<vocalsound>`,
    `<disfmarker>`, `<gap>`, `<pause>` and the other non-word elements are left out; the three
    ids of the form `*.wordsx*` (duplicates in the corpus) are skipped; a word without
    `starttime` (a few exist) takes the time of the previous timed element of its file. All
    speakers' words are ordered by (start time, speaker letter, position in the file) and
    consecutive words of one speaker form a turn, written "A: ...", one turn per line;
  - meetings: `meetings=` a comma-separated list, `all` (every meeting with words files), or by
    default the 20-meeting scenario-only test split `AMI_TEST_MEETINGS` (ES2004, ES2014,
    IS1009, TS3003, TS3007, sessions a-d: the scenario-only test meetings of the AMI corpus);
  - instructions: JSON lines keyed by meeting, `{"meeting": "ES2004a", "instruction": "..."}`
    (one line per instruction) or `{"meeting": ..., "instructions": [...]}`, from
    `instructions=PATH` or `DIR/instructions.jsonl`; the paper asks 3 per meeting (60 items).
    Item ids are `{M}#{k}` (k = 1, 2, ... in file order) unless the line has an `id`; other
    fields go to metadata;
  - references: `abstractive/{M}.abssumm.xml` (optional): the <abstract>, <actions>,
    <decisions> and <problems> sentences, written as "Abstract: ..." then bulleted sections.
  Every missing file and every malformed XML file is reported at once, by path, when the
  benchmark is loaded (before any decoding).

`floras:PATH` - FLORAS (espnet/floras, CC-BY-3.0) exported as parquet (needs pyarrow) or JSON
lines (`*.jsonl`, `*.json`): PATH is one file or a folder searched recursively. Fields: `id`,
`language`, `audio`, `text` (the transcript), `summary` (the reference), optional `instruction`
(`language` and `score` go to metadata; other fields, e.g. `translation`, are ignored).
`audio` is the Hugging Face Audio struct `{"bytes", "path"}` (bytes: raw in parquet, base64 in
JSON), `{"array", "sampling_rate"}`, or a path string (relative to the file's folder).
Options: `min_seconds`, `max_seconds` (the paper keeps 5 minutes to 1 hour:
`min_seconds=300&max_seconds=3600`, `PAPER_FLORAS_SECONDS`), `languages=es,it,...`,
`instruction=TEXT` for rows without one (default `DEFAULT_INSTRUCTION`; the paper does not
give its FLORAS instructions). Rows are read lazily, so an export of long recordings with
embedded audio is never held in memory at once.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

AMI_TEST_MEETINGS: tuple[str, ...] = tuple(
    f"{series}{session}" for series in ("ES2004", "ES2014", "IS1009", "TS3003", "TS3007") for session in "abcd"
)
NITE_NS = "http://nite.sourceforge.net/"
AMI_SUMMARY_SECTIONS = (("abstract", "Abstract"), ("actions", "Actions"), ("decisions", "Decisions"),
                        ("problems", "Problems"))
PAPER_FLORAS_SECONDS = (300.0, 3600.0)
DEFAULT_INSTRUCTION = "Summarize the recording."
KINDS = ("jsonl", "ami", "floras")
_OPTIONS = {
    "jsonl": ("limit",),
    "ami": ("limit", "meetings", "instructions", "annotations"),
    "floras": ("limit", "min_seconds", "max_seconds", "languages", "instruction"),
}


class BenchmarkError(ValueError):
    """A benchmark that cannot be read; the message names the file (and line or row) and what to do."""


@dataclass
class BenchmarkItem:
    """One (recording, instruction) to summarise and judge.

    The audio is one of: `audio_path` (a file, read from `offset` for `duration` seconds; a tuple
    of files is mixed by summing, see the AMI loader), `waveform` (samples at `sample_rate`), or
    `audio_bytes` (an encoded file in memory). The judge reads `judge_source`: `source` when set
    (e.g. the toy world's structured record), else `transcript`.
    """

    id: str
    audio_path: Path | tuple[Path, ...] | None = None
    waveform: torch.Tensor | np.ndarray | None = None
    offset: float = 0.0
    duration: float | None = None  # seconds; None: to the end of the file
    transcript: str = ""
    instruction: str = ""
    reference: str | None = None
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    sample_rate: int = 16000  # of `waveform`
    audio_bytes: bytes | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("audio_path", "waveform", "audio_bytes") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"BenchmarkItem {self.id!r}: give exactly one of audio_path, waveform or audio_bytes, "
                             f"got {given or 'none'}")
        if not self.instruction.strip():
            raise ValueError(f"BenchmarkItem {self.id!r}: the instruction is empty")
        if not self.judge_source.strip():
            raise ValueError(f"BenchmarkItem {self.id!r}: no transcript and no source for the judge")

    @property
    def judge_source(self) -> str:
        return self.source if self.source is not None else self.transcript

    def seconds(self) -> float:
        """Length of the audio in seconds, without decoding it (headers only): for sorting batches."""
        if self.waveform is not None:
            return len(self.waveform) / self.sample_rate
        if self.duration is not None:
            return self.duration
        if self.audio_bytes is not None:
            import soundfile

            try:
                info = soundfile.info(io.BytesIO(self.audio_bytes))
            except (soundfile.LibsndfileError, RuntimeError) as error:
                raise BenchmarkError(f"item {self.id!r}: the embedded audio cannot be read ({error})") from None
            return info.frames / info.samplerate
        from data.audio import probe

        paths = self.audio_path if isinstance(self.audio_path, tuple) else (self.audio_path,)
        return max(probe(path).duration for path in paths) - self.offset

    def audio_key(self) -> dict[str, Any]:
        """What identifies the audio, for the runner's cache keys (no samples are hashed)."""
        if self.audio_path is not None:
            paths = self.audio_path if isinstance(self.audio_path, tuple) else (self.audio_path,)
            return {"paths": [str(p) for p in paths], "offset": self.offset, "duration": self.duration}
        if self.waveform is not None:
            return {"waveform_samples": len(self.waveform), "sample_rate": self.sample_rate}
        return {"audio_bytes": len(self.audio_bytes)}

    def load_waveform(self) -> torch.Tensor:
        """The audio as (samples,) float32, mono, 16 kHz (data/audio.py's conventions)."""
        from data.audio import DurationPolicy, load_audio
        from model.features import resample

        no_limit = DurationPolicy(max_seconds=None)  # benchmarks run whole recordings in one pass
        if self.waveform is not None:
            signal = torch.as_tensor(np.asarray(self.waveform, dtype=np.float32))
            if signal.dim() == 2:  # soundfile layout (samples, channels)
                signal = signal.mean(-1)
            return resample(signal, self.sample_rate, 16000) if self.sample_rate != 16000 else signal
        if self.audio_bytes is not None:
            import soundfile

            try:
                samples, rate = soundfile.read(io.BytesIO(self.audio_bytes), dtype="float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError) as error:
                raise BenchmarkError(f"item {self.id!r}: the embedded audio cannot be decoded ({error})") from None
            signal = torch.from_numpy(samples.mean(axis=1))
            return resample(signal, rate, 16000) if rate != 16000 else signal
        if isinstance(self.audio_path, tuple):
            channels = [load_audio(p, offset=self.offset, duration=self.duration, policy=no_limit).waveform
                        for p in self.audio_path]
            mix = torch.zeros(max(len(c) for c in channels))
            for channel in channels:
                mix[: len(channel)] += channel
            peak = float(mix.abs().max())
            return mix / peak if peak > 1.0 else mix
        return load_audio(self.audio_path, offset=self.offset, duration=self.duration, policy=no_limit).waveform


@dataclass
class Benchmark:
    """A named benchmark; `items()` gives a fresh iterator over its items each time it is called."""

    name: str
    spec: str
    kind: str
    _items: Callable[[], Iterator[BenchmarkItem]]
    limit: int | None = None

    def items(self) -> Iterator[BenchmarkItem]:
        for count, item in enumerate(self._items()):
            if self.limit is not None and count >= self.limit:
                return
            yield item


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
    """A `Benchmark` from a spec (see the module docstring); files are checked now, audio read later."""
    kind, path, options = parse_spec(spec)
    limit = _positive_int(options.pop("limit", None), "limit", spec)
    if kind == "jsonl":
        items = _jsonl_items(Path(path))
        factory = lambda: iter(items)  # noqa: E731
        default_name = Path(path).stem
    elif kind == "ami":
        items = _ami_items(Path(path), options)
        factory = lambda: iter(items)  # noqa: E731
        default_name = "ami"
    else:
        factory = _floras_factory(Path(path), options, spec)
        default_name = "floras"
    return Benchmark(name=name or default_name, spec=spec, kind=kind, _items=factory, limit=limit)


def _positive_int(value: str | None, key: str, spec: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise BenchmarkError(f"benchmark spec {spec!r}: {key} must be a positive integer, got {value!r}")
    return int(value)


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


# ---------------------------------------------------------------------------------------------
# ami: whole meetings from the NXT annotations


@dataclass(frozen=True)
class _Word:
    start: float
    speaker: str
    position: int
    text: str


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as error:
        line, column = error.position
        raise BenchmarkError(f"{path}: malformed XML at line {line}, column {column + 1} ({error.msg}); "
                             "re-extract the file from the AMI annotations (ami_public_manual_1.6.2.zip)") from None


def ami_speaker_words(path: Path, speaker: str) -> list[_Word]:
    """The words of one NXT words file, punctuation glued to the word before it (module docstring)."""
    root = _parse_xml(path)
    words: list[_Word] = []
    last_time: float | None = None
    untimed: list[int] = []  # words before the first timed element get the first time found
    for position, element in enumerate(root.iter()):
        tag = element.tag.rpartition("}")[2]
        start = element.get("starttime")
        if start is not None:
            try:
                last_time = float(start)
            except ValueError:
                raise BenchmarkError(f"{path}: element {element.get(f'{{{NITE_NS}}}id', tag)!r} has starttime "
                                     f"{start!r}, not a number of seconds") from None
            for index in untimed:
                words[index] = _Word(last_time, speaker, words[index].position, words[index].text)
            untimed.clear()
        if tag != "w" or ".wordsx" in (element.get(f"{{{NITE_NS}}}id") or ""):
            continue
        text = (element.text or "").strip()
        if not text:
            continue
        if element.get("punc") == "true" and words:
            previous = words[-1]
            words[-1] = _Word(previous.start, speaker, previous.position, previous.text + text)
            continue
        words.append(_Word(last_time if last_time is not None else 0.0, speaker, position, text))
        if last_time is None:
            untimed.append(len(words) - 1)
    return words


def ami_transcript(words_files: dict[str, Path]) -> str:
    """Speaker -> words file -> the time-ordered transcript, one "A: ..." line per turn."""
    words = [word for speaker, path in sorted(words_files.items()) for word in ami_speaker_words(path, speaker)]
    words.sort(key=lambda w: (w.start, w.speaker, w.position))
    turns: list[tuple[str, list[str]]] = []
    for word in words:
        if turns and turns[-1][0] == word.speaker:
            turns[-1][1].append(word.text)
        else:
            turns.append((word.speaker, [word.text]))
    return "\n".join(f"{speaker}: {' '.join(texts)}" for speaker, texts in turns)


def ami_reference(path: Path) -> str:
    """An abstractive summary file -> "Abstract: ..." then "Decisions:" etc. as bullets."""
    root = _parse_xml(path)
    parts = []
    for tag, title in AMI_SUMMARY_SECTIONS:
        sentences = [" ".join((s.text or "").split()) for section in root.iter(tag) for s in section.iter("sentence")]
        sentences = [s for s in sentences if s]
        if not sentences:
            continue
        if tag == "abstract":
            parts.append(f"{title}: {' '.join(sentences)}")
        else:
            parts.append(f"{title}:\n" + "\n".join(f"- {s}" for s in sentences))
    return "\n\n".join(parts)


def _ami_audio(root: Path, meeting: str) -> Path | tuple[Path, ...] | None:
    folders = (root, root / meeting / "audio", root / "amicorpus" / meeting / "audio")
    for folder in folders:
        mix = folder / f"{meeting}.Mix-Headset.wav"
        if mix.is_file():
            return mix
    for folder in folders:
        channels = tuple(p for p in (folder / f"{meeting}.Headset-{k}.wav" for k in range(5)) if p.is_file())
        if channels:
            return channels
    return None


def _ami_instructions(path: Path, meetings: Iterable[str]) -> dict[str, list[tuple[str, str, dict]]]:
    """meeting -> [(item id, instruction, metadata)], from the JSON-lines instructions file."""
    if not path.is_file():
        raise BenchmarkError(f"AMI instructions file not found: {path}; write one JSON line per instruction, "
                             '{"meeting": "ES2004a", "instruction": "..."}, and pass it as '
                             "ami:DIR?instructions=PATH (default DIR/instructions.jsonl)")
    wanted = set(meetings)
    found: dict[str, list[tuple[str, str, dict]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchmarkError(f"{where}: not valid JSON ({error.msg}, column {error.colno})") from None
        meeting = row.get("meeting") if isinstance(row, dict) else None
        if not isinstance(meeting, str):
            raise BenchmarkError(f"{where}: expected an object with a 'meeting' string, e.g. "
                                 '{"meeting": "ES2004a", "instruction": "..."}')
        texts = row.get("instructions", [row.get("instruction")])
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise BenchmarkError(f"{where}: 'instruction' must be a non-empty string "
                                 "(or 'instructions' a list of them)")
        if meeting not in wanted:
            continue
        metadata = {k: v for k, v in row.items() if k not in ("meeting", "instruction", "instructions", "id")}
        for text in texts:
            entries = found.setdefault(meeting, [])
            item_id = row.get("id") if len(texts) == 1 and isinstance(row.get("id"), str) else None
            entries.append((item_id or f"{meeting}#{len(entries) + 1}", text, metadata))
    return found


def _ami_items(root: Path, options: dict[str, str]) -> list[BenchmarkItem]:
    if not root.is_dir():
        raise BenchmarkError(f"AMI folder not found: {root}; pass the folder holding the audio and the annotations")
    annotations = Path(options.get("annotations", root))
    words_dir = annotations / "words"
    choice = options.get("meetings")
    if choice == "all":
        meetings = sorted({p.name.split(".")[0] for p in words_dir.glob("*.words.xml")})
    elif choice:
        meetings = [m.strip() for m in choice.split(",") if m.strip()]
    else:
        meetings = list(AMI_TEST_MEETINGS)
    if not meetings:
        raise BenchmarkError(f"no AMI meetings selected (no words files in {words_dir})")
    instructions = _ami_instructions(Path(options.get("instructions", root / "instructions.jsonl")), meetings)

    problems: list[str] = []
    items: list[BenchmarkItem] = []
    for meeting in meetings:
        words_files = {p.name.split(".")[1]: p for p in sorted(words_dir.glob(f"{meeting}.*.words.xml"))}
        audio = _ami_audio(root, meeting)
        missing = []
        if not words_files:
            missing.append(f"{words_dir / (meeting + '.A.words.xml')} (and the other speakers' words files) missing")
        if audio is None:
            missing.append(f"{root / (meeting + '.Mix-Headset.wav')} missing (also looked in {meeting}/audio/ and "
                           f"amicorpus/{meeting}/audio/, and for {meeting}.Headset-0..4.wav)")
        if meeting not in instructions:
            missing.append(f"no instruction for meeting {meeting} in the instructions file")
        if missing:
            problems += missing
            continue
        try:
            transcript = ami_transcript(words_files)
            summary_file = annotations / "abstractive" / f"{meeting}.abssumm.xml"
            reference = ami_reference(summary_file) if summary_file.is_file() else None
        except BenchmarkError as error:
            problems.append(str(error))
            continue
        if not transcript:
            problems.append(f"{words_dir}: the words files of {meeting} hold no words")
            continue
        for item_id, instruction, metadata in instructions[meeting]:
            items.append(BenchmarkItem(id=item_id, audio_path=audio, transcript=transcript, instruction=instruction,
                                       reference=reference, metadata={"meeting": meeting, **metadata}))
    if problems:
        raise BenchmarkError(f"AMI benchmark {root}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return items


# ---------------------------------------------------------------------------------------------
# floras: parquet or JSON-lines exports


def _floras_factory(path: Path, options: dict[str, str], spec: str) -> Callable[[], Iterator[BenchmarkItem]]:
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
