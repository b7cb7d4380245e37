"""The `ami:DIR` benchmark: whole AMI meetings from the audio and the NXT annotations as
distributed, with instructions keyed by meeting (the paper's are not public).

The transcript is rebuilt from the words files (every speaker's words in time order, one
"A: ..." line per turn) and the reference from the abstractive summaries when present; the
default selection is the 20-meeting scenario-only test split. Every missing or malformed file
is reported at once, by path, before any decoding. Layout, options and the exact word rules:
docs/benchmarks.md ("ami:DIR").
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .benchmark_item import BenchmarkError, BenchmarkItem

AMI_TEST_MEETINGS: tuple[str, ...] = tuple(
    f"{series}{session}" for series in ("ES2004", "ES2014", "IS1009", "TS3003", "TS3007") for session in "abcd"
)
NITE_NS = "http://nite.sourceforge.net/"
AMI_SUMMARY_SECTIONS = (("abstract", "Abstract"), ("actions", "Actions"), ("decisions", "Decisions"),
                        ("problems", "Problems"))


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
    """The words of one NXT words file: each `<w>` a word, `punc="true"` words glued to the word
    before them, non-word elements and the duplicate `*.wordsx*` ids left out, and a word without
    `starttime` given the time of the previous timed element (docs/benchmarks.md)."""
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


def ami_items(root: Path, options: dict[str, str]) -> list[BenchmarkItem]:
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
