"""The toy corpus: meetings per split, their audio and the manifests, seeded and cached.

    python -m toy.corpus [--seed 0] [--preset demo|quick] [--root cache/toy] [--workers 2]
        # -> cache/toy/corpus-<key>/, and the link cache/toy/<preset> (<preset>-seed<N> for seed N != 0)
    corpus_dir = build_corpus(seed=0, sizes=PRESETS["demo"])   # -> cache/toy/corpus-<key>/
    texts = training_texts(corpus_dir)                          # the tokenizer's training text

The splits mirror the paper's data: ASR rows for the pre-training stage, text for the teacher,
SFT rows with references, KD and DPO pools without, a validation split on which every choice is
made, and three test splits (training voices, unseen voices, unseen voices and phrasings) read
by the final evaluation only. Every instruction row carries `judge_source`, the meeting record
and task the oracle judge (toy/oracle.py) scores against. Each meeting is seeded on its own, so
it does not depend on the sizes of the other splits; a build is cached under a key of (seed,
GENERATOR_VERSION, sizes) and resumes after an interruption.

Details (every split, the row fields, determinism, the cache): docs/toy-world.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model.safeio import atomic_write, atomic_write_text, replace_directory

from .dialogue import Turn, render_dialogue, transcript
from .tasks import Task, instruction, reference, sample_tasks, spec
from .world import Meeting, sample_meeting

GENERATOR_VERSION = 3
ASR_INSTRUCTION = "Transcribe the audio clip."
SPLITS = ("pretrain", "sft", "kd", "dpo", "validation", "validation_voices", "test_in", "test_voices",
          "test_shifted")
TEST_SPLITS = ("test_in", "test_voices", "test_shifted")
UNSEEN_VOICE_SPLITS = ("validation_voices", "test_voices", "test_shifted")
TEXT_SPLIT = "text"  # meetings that are never rendered to audio: text-only training (toy/pretrain.py)
MANIFESTS = ("pretrain", "teacher", "sft", "kd", "dpo", "validation", "validation_voices", "test_in", "test_voices",
             "test_shifted")
WITH_REFERENCE = {"teacher", "sft", "validation", "validation_voices", "test_in", "test_voices", "test_shifted"}


@dataclass(frozen=True)
class Sizes:
    """Meetings per split and instructions per meeting."""

    pretrain: int = 400  # ASR: 200 meetings with 8 voices left whole-meeting recognition far from usable
    sft: int = 480  # 960 SFT rows: the held-out summary loss after 2 epochs was 0.384, 0.406 with 320 rows
    kd: int = 160
    dpo: int = 160
    validation: int = 30
    validation_voices: int = 20
    test_in: int = 30
    test_voices: int = 30
    test_shifted: int = 30
    instructions: int = 2


PRESETS = {
    "demo": Sizes(),
    "quick": Sizes(pretrain=24, sft=16, kd=8, dpo=8, validation=4, validation_voices=2, test_in=6, test_voices=4,
                   test_shifted=6, instructions=2),
}


@dataclass(frozen=True)
class Item:
    """One instruction about one meeting, with its reference answer."""

    task: Task
    instruction: str
    reference: str


@dataclass(frozen=True)
class PlannedMeeting:
    """Everything about one meeting but its audio: pure function of (seed, split, index)."""

    split: str
    index: int
    style: str  # phrasing: "train" | "shifted"
    voice_set: str  # "train" | "unseen"
    meeting: Meeting
    turns: list[Turn]
    items: list[Item]

    @property
    def id(self) -> str:
        return self.meeting.id

    @property
    def transcript(self) -> str:
        return transcript(self.turns)


def _rng(seed: int, split: str, index: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}/{split}/{index}/{purpose}")


def plan_meeting(seed: int, split: str, index: int, instructions: int) -> PlannedMeeting:
    if split not in (*SPLITS, TEXT_SPLIT):
        raise ValueError(f"unknown split {split!r}; expected one of {(*SPLITS, TEXT_SPLIT)}")
    style = "shifted" if split == "test_shifted" else "train"
    voice_set = "unseen" if split in UNSEEN_VOICE_SPLITS else "train"
    meeting = sample_meeting(_rng(seed, split, index, "record"), f"{split}-{index:05d}")
    turns = render_dialogue(meeting, style, _rng(seed, split, index, "dialogue"))
    task_rng = _rng(seed, split, index, "tasks")
    items = [Item(task, instruction(meeting, task, style, task_rng), reference(meeting, task))
             for task in sample_tasks(meeting, task_rng, instructions)]
    return PlannedMeeting(split, index, style, voice_set, meeting, turns, items)


def plan_corpus(seed: int, sizes: Sizes) -> dict[str, list[PlannedMeeting]]:
    """Records, dialogue, instructions and references of every split (no audio)."""
    return {split: [plan_meeting(seed, split, i, sizes.instructions) for i in range(getattr(sizes, split))]
            for split in SPLITS}


def text_items(seed: int, meetings: int, instructions: int) -> list[tuple[str, str, str]]:
    """(transcript, instruction, reference) of `meetings` text-only meetings (split "text": ids,
    hence records, disjoint from every audio split): cheap training text for the text models."""
    items = []
    for index in range(meetings):
        planned = plan_meeting(seed, TEXT_SPLIT, index, instructions)
        items += [(planned.transcript, item.instruction, item.reference) for item in planned.items]
    return items


def text_stream(seed: int, start: int, meetings_per_batch: int, instructions: int):
    """`batch(step) -> [(transcript, instruction, reference)]`: the text-only meetings
    start + (step - 1) * meetings_per_batch onwards, `meetings_per_batch` of them, so no meeting
    is seen twice in a run (steps count from 1). The teacher's continuation on fresh meetings
    (toy/pretrain.py, Steps.teacher_stream_from): text costs no audio, and an unrepeated stream
    cannot be memorized."""
    def batch(step: int) -> list[tuple[str, str, str]]:
        first = start + (step - 1) * meetings_per_batch
        planned = [plan_meeting(seed, TEXT_SPLIT, index, instructions) for index in range(first, first + meetings_per_batch)]
        return [(p.transcript, item.instruction, item.reference) for p in planned for item in p.items]
    return batch


def judge_source(planned: PlannedMeeting, item: Item) -> str:
    return json.dumps({"meeting": planned.meeting.to_dict(), "task": item.task.to_dict()}, sort_keys=True)


def manifest_rows(planned: PlannedMeeting, duration: float,
                  segments: list[tuple[float, float]]) -> dict[str, list[dict]]:
    """The manifest rows of one meeting, by manifest name (docs/toy-world.md, "Rows")."""
    audio = f"audio/{planned.id}.wav"
    rows = []
    for j, item in enumerate(planned.items):
        task_spec = spec(item.task)
        row = {"audio_filepath": audio, "duration": round(duration, 4), "id": f"{planned.id}/q{j}", "lang": "en",
               "transcript": planned.transcript, "instruction": item.instruction, "summary": item.reference,
               "judge_source": judge_source(planned, item), "family": item.task.family,
               "format": task_spec.format, "requested_length": None if task_spec.max_words is None else
               {"unit": "words", "min": 0, "max": task_spec.max_words},
               "meeting_id": planned.id, "split": planned.split}
        rows.append(row)
    if planned.split == "pretrain":
        asr = [{"audio_filepath": audio, "offset": round(start, 4), "duration": round(end - start, 4),
                "id": f"{planned.id}/t{k:02d}", "lang": "en", "transcript": turn.text,
                "instruction": ASR_INSTRUCTION, "summary": turn.text, "meeting_id": planned.id, "split": "pretrain"}
               for k, (turn, (start, end)) in enumerate(zip(planned.turns, segments))]
        return {"pretrain": asr, "teacher": rows}
    if planned.split not in WITH_REFERENCE:
        rows = [{k: v for k, v in row.items() if k != "summary"} for row in rows]
    return {planned.split: rows}


def corpus_key(seed: int, sizes: Sizes) -> str:
    blob = json.dumps({"seed": seed, "version": GENERATOR_VERSION, "sizes": asdict(sizes)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _render_audio(planned: PlannedMeeting, folder: Path, seed: int) -> tuple[float, list[tuple[float, float]]]:
    """Render (or reuse) one meeting's WAV; returns (duration, turn segments)."""
    from .speech import assign_voices, render_speech, write_wav

    wav, sidecar = folder / f"{planned.id}.wav", folder / f"{planned.id}.json"
    if wav.exists() and sidecar.exists():
        info = json.loads(sidecar.read_text())
        return info["duration"], [tuple(s) for s in info["segments"]]
    voices = assign_voices(planned.meeting.participants, planned.voice_set,
                           _rng(seed, planned.split, planned.index, "voices"))
    speech = render_speech(planned.turns, voices, _rng(seed, planned.split, planned.index, "audio"))
    atomic_write(wav, lambda p: write_wav(p, speech.waveform))
    info = {"duration": speech.waveform.shape[0] / 16000, "segments": speech.segments,
            "voices": {name: asdict(v) for name, v in voices.items()}, "noise_snr_db": speech.noise_snr_db}
    atomic_write_text(sidecar, json.dumps(info))
    return info["duration"], info["segments"]


def link(root: Path, alias: str, folder: Path) -> None:
    """Point `root/alias` (a relative symlink) at `folder`, atomically."""
    temporary = root / f".{alias}.tmp{os.getpid()}"
    temporary.unlink(missing_ok=True)
    os.symlink(folder.name, temporary)
    os.replace(temporary, root / alias)


def build_corpus(seed: int = 0, sizes: Sizes = PRESETS["demo"], root: str | Path = "cache/toy", *,
                 workers: int = 2, alias: str | None = None, log=print, leave_out: tuple[str, ...] = ()) -> Path:
    """Build (or reuse) the corpus for (seed, sizes) under `root`; returns its folder. `alias`:
    also point `root/alias` at it (the CLI uses the preset's name, so configs/toy/demo_*.toml
    can name cache/toy/demo/sft.jsonl). `leave_out`: splits not rendered this time (the demo
    leaves out "pretrain", whose audio only toy/pretrain.py reads); their manifests are not
    written and corpus.json lists them under "left_out". A later build without them renders
    them into the same folder (same key: the meetings do not depend on it) and writes
    corpus.json last, so an interrupted fill-in is redone, reusing the audio already written."""
    root = Path(root)
    final = root / f"corpus-{corpus_key(seed, sizes)}"
    unknown = set(leave_out) - set(SPLITS)
    if unknown:
        raise ValueError(f"leave_out names unknown splits {sorted(unknown)}; expected some of {SPLITS}")
    if (final / "corpus.json").exists():
        stats = json.loads((final / "corpus.json").read_text())
        missing = [split for split in stats.get("left_out", []) if split not in leave_out]
        if missing:
            _render_into(final, seed, sizes, missing, stats, workers, log)
        else:
            log(f"[toy corpus] reusing {final}")
        if alias:
            link(root, alias, final)
        return final
    partial = final.with_name(final.name + ".partial")
    stats = {"seed": seed, "generator_version": GENERATOR_VERSION, "sizes": asdict(sizes), "splits": {},
             "left_out": list(SPLITS)}
    _render_into(partial, seed, sizes, [split for split in SPLITS if split not in leave_out], stats, workers, log)
    replace_directory(partial, final)  # a finished corpus without corpus.json cannot exist; a stale folder can
    if alias:
        link(root, alias, final)
    log(f"[toy corpus] wrote {final} in {stats['generation_seconds']} s")
    return final


def _render_into(folder: Path, seed: int, sizes: Sizes, splits: list[str], stats: dict, workers: int, log) -> None:
    """Render `splits` into `folder`, write their manifests, then corpus.json (`stats`, updated:
    these splits leave "left_out"). Audio already in the folder is reused."""
    from .speech import INSTALL_HINT, EspeakMissing, espeak_available

    if not espeak_available():
        raise EspeakMissing(INSTALL_HINT)
    audio = folder / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifests: dict[str, list[dict]] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for split in splits:
            planned = [plan_meeting(seed, split, i, sizes.instructions) for i in range(getattr(sizes, split))]
            results, total = [], len(planned)
            for done, result in enumerate(pool.map(lambda p: _render_audio(p, audio, seed), planned), start=1):
                results.append(result)
                if done == total or done % max(1, total // 4) == 0:
                    log(f"[toy corpus] {split}: {done}/{total} meetings ({time.perf_counter() - started:.0f} s)")
            for name in manifest_names(split):
                manifests.setdefault(name, [])
            for plan, (duration, segments) in zip(planned, results):
                for name, rows in manifest_rows(plan, duration, segments).items():
                    manifests[name].extend(rows)
            stats["splits"][split] = {"meetings": total, "audio_minutes": round(sum(d for d, _ in results) / 60, 2)}
    for name, rows in manifests.items():
        stats["splits"].setdefault(name, {})["rows"] = len(rows)
        if name != "pretrain":
            stats["splits"][name]["families"] = dict(sorted(Counter(r["family"] for r in rows).items()))
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        atomic_write_text(folder / f"{name}.jsonl", text)
    stats["left_out"] = [split for split in stats["left_out"] if split not in splits]
    stats["generation_seconds"] = round(stats.get("generation_seconds", 0.0) + time.perf_counter() - started, 1)
    atomic_write_text(folder / "corpus.json", json.dumps(stats, indent=2) + "\n")


def manifest_names(split: str) -> tuple[str, ...]:
    """The manifests made from one split's meetings (the pre-training split's: ASR rows and the teacher's)."""
    return ("pretrain", "teacher") if split == "pretrain" else (split,)


def require_rendered(corpus_dir: str | Path, splits: tuple[str, ...]) -> None:
    """Raise CorpusIncomplete when a build left any of `splits` out (build_corpus `leave_out`)."""
    corpus_dir = Path(corpus_dir)
    if not (corpus_dir / "corpus.json").is_file():
        raise CorpusIncomplete(f"{corpus_dir} has no corpus.json: not a folder written by `python -m toy.corpus`")
    stats = json.loads((corpus_dir / "corpus.json").read_text())
    missing = [split for split in splits if split in stats.get("left_out", [])]
    if missing:
        preset = next((name for name, sizes in PRESETS.items() if asdict(sizes) == stats["sizes"]), None)
        command = (f"python -m toy.corpus --preset {preset} --seed {stats['seed']} "
                   f"--root {shlex.quote(str(corpus_dir.resolve().parent))}") if preset else "toy.corpus.build_corpus"
        raise CorpusIncomplete(f"{corpus_dir} was built without the audio of {missing} (the demo needs none of it); "
                               f"render it with `{command}`, then rerun")


class CorpusIncomplete(ValueError):
    """A corpus folder built without a split that is needed now; the message says how to render it."""


TRAINING_MANIFESTS = ("pretrain", "teacher", "sft", "kd", "dpo")


def training_texts(corpus_dir: str | Path) -> list[str]:
    """Every distinct transcript, instruction and reference of the training manifests, in file
    order: the tokenizer's training text (the test splits are left out, so the shifted
    phrasings stay unseen)."""
    texts: dict[str, None] = {}
    for name in TRAINING_MANIFESTS:
        for line in (Path(corpus_dir) / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for field_name in ("transcript", "instruction", "summary"):
                if row.get(field_name):
                    texts.setdefault(row[field_name])
    return list(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the toy spoken-meetings corpus (cached).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--root", default="cache/toy")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    from .speech import EspeakMissing

    try:
        folder = build_corpus(args.seed, PRESETS[args.preset], args.root, workers=args.workers,
                              alias=args.preset if args.seed == 0 else f"{args.preset}-seed{args.seed}",
                              log=lambda message: print(message, file=sys.stderr, flush=True))
    except EspeakMissing as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
