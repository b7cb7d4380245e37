"""espeak-ng audio of the toy world: deterministic bytes, 16 kHz, turn segments, the cached build.

Needs espeak-ng on PATH (CI installs it); without it these tests skip, except the one that
checks the error message a user sees.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from data.audio import load_audio
from data.manifest import read_manifest
from toy import speech
from toy.corpus import MANIFESTS, Sizes, build_corpus, plan_meeting, training_texts

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")
TINY = Sizes(pretrain=1, sft=1, kd=0, dpo=0, validation=1, validation_voices=0, test_in=0, test_voices=0, test_shifted=1, instructions=2)


def render(split: str, index: int) -> speech.Speech:
    planned = plan_meeting(0, split, index, 1)
    voices = speech.assign_voices(planned.meeting.participants, planned.voice_set, random.Random("voices"))
    return speech.render_speech(planned.turns, voices, random.Random("audio"), noise_probability=1.0)


def test_missing_espeak_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(speech.EspeakMissing, match="apt-get install espeak-ng"):
        speech.espeak("hello", "en-us", 175, 50)
    with pytest.raises(speech.EspeakMissing):
        build_corpus(0, TINY, tmp_path / "toy", log=lambda message: None)
    assert not (tmp_path / "toy").exists()  # checked before anything is written


@needs_espeak
def test_same_meeting_same_samples_and_segments_inside():
    first, second = render("sft", 0), render("sft", 0)
    assert np.array_equal(first.waveform, second.waveform) and first.segments == second.segments
    seconds = first.waveform.shape[0] / 16000
    assert 10 < seconds < 90 and first.noise_snr_db is not None
    starts, ends = zip(*first.segments)
    assert all(0 < s < e <= seconds for s, e in first.segments) and list(starts) == sorted(starts)
    assert all(e <= s for e, s in zip(ends, starts[1:]))  # turns do not overlap


@needs_espeak
def test_build_is_deterministic_cached_and_readable(tmp_path):
    messages = []
    first = build_corpus(0, TINY, tmp_path / "a", workers=1, log=messages.append)
    second = build_corpus(0, TINY, tmp_path / "b", workers=2, log=messages.append)
    digest = lambda folder: {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "corpus.json"}
    assert digest(first) == digest(second) and len(digest(first)) == 4 * 2 + len(MANIFESTS)  # 4 meetings: wav + json
    assert build_corpus(0, TINY, tmp_path / "a", alias="tiny", log=messages.append) == first
    assert (tmp_path / "a" / "tiny").resolve() == first.resolve()
    assert messages[-1] == f"[toy corpus] reusing {first}"
    report = read_manifest([first / f"{name}.jsonl" for name in MANIFESTS])
    assert not report.issues and len(report.entries) > 10
    info = soundfile.info(str(first / "audio" / "sft-00000.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    turn = next(e for e in report.entries if e.id == "pretrain-00000/t00")
    clip = load_audio(turn.audio_path, offset=turn.offset, duration=turn.duration)
    assert abs(clip.num_samples - round(turn.duration * 16000)) <= 1
    texts = training_texts(first)
    assert turn.transcript in texts and len(texts) == len(set(texts))
    shifted = {e.transcript for e in report.entries if e.extra.get("split") == "test_shifted"}
    assert shifted and not shifted & set(texts)


@needs_espeak
def test_corpus_built_without_pretraining_audio_is_filled_in_later(tmp_path):
    """The demo's build leaves the pre-training split out (no audio, no pretrain/teacher
    manifests, corpus.json says so, toy.pretrain refuses it with the command that renders it);
    a later full build renders it into the same folder, which then equals a full build."""
    from toy.corpus import CorpusIncomplete, require_rendered
    from toy.pretrain import main as pretrain_main

    partial = build_corpus(0, TINY, tmp_path / "a", workers=1, leave_out=("pretrain",), log=lambda message: None)
    assert not (partial / "pretrain.jsonl").exists() and not (partial / "teacher.jsonl").exists()
    assert not list((partial / "audio").glob("pretrain-*")) and (partial / "audio" / "sft-00000.wav").is_file()
    assert json.loads((partial / "corpus.json").read_text())["left_out"] == ["pretrain"]
    with pytest.raises(CorpusIncomplete, match="pretrain"):
        require_rendered(partial, ("pretrain",))
    require_rendered(partial, ("sft", "validation"))
    assert pretrain_main(["--corpus", str(partial), "--out", str(tmp_path / "models")]) == 2
    overlapping = ["--corpus", str(partial), "--only", "teacher", "--teacher-stream-from", "10", "--tokenizer",
                   str(Path(__file__).resolve().parents[2] / "toy" / "checkpoints" / "tokenizer.model")]
    assert pretrain_main(overlapping) == 2  # the stream would repeat text_meetings' meetings 10..5999
    messages = []
    assert build_corpus(0, TINY, tmp_path / "a", workers=1, leave_out=("pretrain",), log=messages.append) == partial
    assert messages == [f"[toy corpus] reusing {partial}"]
    assert build_corpus(0, TINY, tmp_path / "a", workers=1, log=messages.append) == partial  # filled in
    full = build_corpus(0, TINY, tmp_path / "b", workers=1, log=lambda message: None)
    digest = lambda folder: {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "corpus.json"}
    assert digest(partial) == digest(full)
    stats = lambda folder: {k: v for k, v in json.loads((folder / "corpus.json").read_text()).items()  # noqa: E731
                            if k != "generation_seconds"}
    assert stats(partial) == stats(full) and stats(full)["left_out"] == []
    require_rendered(partial, ("pretrain",))
    with pytest.raises(CorpusIncomplete, match="no corpus.json"):
        require_rendered(tmp_path, ("pretrain",))


def test_text_stream_never_repeats_a_meeting():
    from toy.corpus import TEXT_SPLIT, text_stream

    batch = text_stream(0, 500, 3, 2)
    first, second = batch(1), batch(2)
    assert len(first) == 6 and first == batch(1)  # 3 meetings, 2 instructions each, deterministic
    assert first[0][0] == plan_meeting(0, TEXT_SPLIT, 500, 2).transcript
    assert second[0][0] == plan_meeting(0, TEXT_SPLIT, 503, 2).transcript
    assert not {transcript for transcript, _, _ in first} & {transcript for transcript, _, _ in second}


@needs_espeak
def test_teacher_continues_on_a_stream_of_fresh_text_meetings(tmp_path):
    """Steps.teacher_stream_from: the teacher reads text_stream batches (no manifest, so a corpus
    without the pre-training split will do) and the record says where the stream started."""
    from model import load_pretrained

    from toy.pretrain import Steps, build

    corpus = build_corpus(0, TINY, tmp_path / "toy", workers=1, leave_out=("pretrain",), log=lambda message: None)
    shipped = Path(__file__).resolve().parents[2] / "toy" / "checkpoints" / "tokenizer.model"
    steps = Steps(teacher=1, batch_size=2, teacher_stream_from=500)  # one step, one meeting: the path only
    paths = build(corpus, tmp_path / "models", steps, log=lambda message: None, which=("teacher",),
                  work=tmp_path / "work", tokenizer_file=shipped)
    provenance = json.loads((tmp_path / "models" / "pretrain.json").read_text())
    assert provenance["steps"]["teacher_stream_from"] == 500
    assert provenance["teacher"]["validation"]["rows"] == 2 and provenance["teacher"]["loss"] > 0
    assert load_pretrained(paths["teacher"]).config.decoder.hidden_size == 256


@needs_espeak
def test_pretrain_writes_loadable_student_and_teacher(tmp_path):
    """Two steps of each pre-training loop on a tiny corpus: the checkpoints load with the
    recipes' loaders, carry the tokenizer, the teacher is wider than the student, the student's
    encoder is the CTC-trained one, and pretrain.json records the checks."""
    from model import load_pretrained
    from rollout.teachers import LocalTeacher

    from toy.pretrain import Steps, build

    corpus = build_corpus(0, TINY, tmp_path / "toy", workers=1, log=lambda message: None)
    steps = Steps(text_meetings=2, encoder=2, asr_frames=600, student=2, teacher=2, batch_size=2)
    paths = build(corpus, tmp_path / "models", steps, log=lambda message: None, work=tmp_path / "work")
    student, teacher = load_pretrained(paths["student"]), LocalTeacher.from_pretrained(paths["teacher"])
    assert (paths["student"] / "tokenizer.model").is_file()
    assert teacher.model.config.decoder.hidden_size > student.config.decoder.hidden_size
    assert student.config.decoder.vocab_size == teacher.model.config.decoder.vocab_size == 512
    assert student.config.standardize_audio_embeddings and student.config.encoder.mask_padding
    assert 10 < student.encoder.encoder_embedding.global_mean.mean() < 20  # toy log-mel statistics, not 0 / 1
    ctc = torch.load(tmp_path / "work" / "encoder_ctc" / "state.pt", weights_only=True)
    encoder = {k.removeprefix("encoder."): v for k, v in ctc["model"].items() if k.startswith("encoder.")}
    for name, value in student.encoder.state_dict().items():
        assert torch.equal(value, encoder[name]), name  # frozen while the student trained
    provenance = json.loads((tmp_path / "models" / "pretrain.json").read_text())
    assert provenance["corpus_key"] == corpus.name and ctc["step"] == 2
    assert provenance["student"]["meeting_word_error_train_voices"] >= 0.0
    assert "meeting_word_error_unseen_voices" not in provenance["student"]  # no such split in this corpus
    assert provenance["encoder_ctc"]["validation"]["meetings"] == 1
    assert 1.0 <= provenance["teacher"]["validation"]["score"] <= 7.0
