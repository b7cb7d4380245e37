"""The bad-input corpus: every case gives one clear "FILE:LINE: field 'x': ..." message, no traceback,
through `python -m data.check` and through the training dataset (skipped with a counted reason,
or raised in strict mode). 8-bit, 24-bit, stereo and 44.1 kHz files are handled, not refused."""
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from data import check
from data.audio import DurationPolicy, load_audio
from data.dataset import ManifestDataset
from data.manifest import DataError
from model.features import log_mel
from tests.data.helpers import RATE, tokenizer, tone, write_audio, write_manifest

ROOT = Path(__file__).resolve().parents[2]
MAX_SECONDS = 5.0
MAX_CONTEXT = 200
GOOD = {"instruction": "Summarize the meeting.", "summary": "The team agreed on the budget."}

# name, manifest row (dict or raw bytes) built from the audio folder, expected field (None: the whole
# line), a fragment of the expected message, the dataset's skip reason
BAD = [
    ("missing file", {"audio_filepath": "nowhere.wav", "duration": 1.0}, "audio_filepath", "does not exist",
     "audio_file"),
    ("zero-length WAV", {"audio_filepath": "empty.wav", "duration": 1.0}, "audio_filepath", "is empty (0 bytes)",
     "audio_file"),
    ("WAV header, no samples", {"audio_filepath": "no_frames.wav", "duration": 1.0}, "audio_filepath",
     "holds no audio samples (0 frames)", "audio_file"),
    ("truncated WAV header", {"audio_filepath": "cut_header.wav", "duration": 1.0}, "audio_filepath",
     "has a truncated or damaged WAV header (30 bytes", "audio_file"),
    ("text file named .wav", {"audio_filepath": "notes.wav", "duration": 1.0}, "audio_filepath",
     "is a text file, not audio (it starts with 'speaker A: hello everyone and welcome')", "audio_file"),
    ("NaN samples", {"audio_filepath": "nan.wav", "duration": 1.0}, "audio_filepath",
     "has 3 NaN or infinite samples (first at 0.250 s)", "audio_file"),
    ("finite but huge float samples", {"audio_filepath": "huge.wav", "duration": 1.0}, "audio_filepath",
     "has samples up to 3e+30, far outside [-1, 1]: its log-mel features would not be finite", "audio_file"),
    ("malformed JSON line", b'{"audio_filepath": "good.wav", "duration": 1.0', None,
     "not valid JSON: Expecting ',' delimiter", "manifest"),
    ("not a JSON object", b'["good.wav", 1.0]', None, "expected a JSON object, got a list", "manifest"),
    ("missing field", {"audio_filepath": "good.wav"}, "duration", "missing; every line needs it", "manifest"),
    ("missing summary (SFT)", {"audio_filepath": "good.wav", "duration": 1.0, "summary": None}, "summary",
     "missing; this step needs it on every line", "manifest"),
    ("wrong type", {"audio_filepath": "good.wav", "duration": "abc"}, "duration",
     "expected a number of seconds, got 'abc' (a string)", "manifest"),
    ("non-UTF-8 line", b'{"audio_filepath": "good.wav", "duration": 1.0, "lang": "fr\xe9"}', None,
     "not valid UTF-8 (byte 0xe9 at column 60)", "manifest"),
    ("duration beyond the limit", {"audio_filepath": "long.wav", "duration": 6.0}, "duration",
     "6 s is longer than the limit of 5 s", "manifest"),
    ("offset past the end", {"audio_filepath": "good.wav", "duration": 1.0, "offset": 3.0}, "offset",
     "offset 3 s is past the end of good.wav (2.00 s long)", "segment"),
    ("duration past the end", {"audio_filepath": "good.wav", "duration": 2.5}, "duration",
     "offset 0 s + duration 2.5 s runs past the end of good.wav (2.00 s long)", "segment"),
    ("negative offset", {"audio_filepath": "good.wav", "duration": 1.0, "offset": -1}, "offset",
     "must be >= 0 seconds, got -1", "manifest"),
    ("empty instruction", {"audio_filepath": "good.wav", "duration": 1.0, "instruction": "   "}, "instruction",
     "is empty; write it, or leave the field out", "manifest"),
    ("duplicate id", {"audio_filepath": "good.wav", "duration": 1.0, "id": "good"}, "id",
     "duplicate id 'good' (first at", "manifest"),
    ("prompt longer than the context", {"audio_filepath": "good.wav", "duration": 1.0,
                                        "instruction": "Summarize the meeting budget " * 40},
     "instruction", "over the model's context of 200", "over_context"),
]
# handled, not refused: file, how it was written
HANDLED = [("u8.wav", "PCM_U8"), ("pcm24.wav", "PCM_24"), ("stereo.wav", "stereo"), ("cd.wav", "44.1 kHz")]


def build_corpus(folder: Path) -> Path:
    write_audio(folder / "good.wav", tone(2.0))
    write_audio(folder / "long.wav", tone(6.0))
    (folder / "empty.wav").write_bytes(b"")
    write_audio(folder / "no_frames.wav", np.zeros(0, np.float32))
    (folder / "cut_header.wav").write_bytes((folder / "good.wav").read_bytes()[:30])
    (folder / "notes.wav").write_text("speaker A: hello everyone and welcome\n")
    nan = tone(1.0)
    nan[[4000, 4001, 9000]] = np.nan
    write_audio(folder / "nan.wav", nan, subtype="FLOAT")
    write_audio(folder / "huge.wav", tone(1.0, noise=0.0) / np.abs(tone(1.0, noise=0.0)).max() * np.float32(3e30),
                subtype="FLOAT")
    write_audio(folder / "u8.wav", tone(1.0), subtype="PCM_U8")
    write_audio(folder / "pcm24.wav", tone(1.0), subtype="PCM_24")
    write_audio(folder / "stereo.wav", np.stack([tone(1.0), tone(1.0, frequency=220.0)], axis=1))
    write_audio(folder / "cd.wav", tone(1.0, rate=44100, noise=0.0), rate=44100)
    rows = [{"audio_filepath": "good.wav", "duration": 2.0, "id": "good", **GOOD}]
    for _, row, _, _, _ in BAD:
        if isinstance(row, dict):
            row = {k: v for k, v in {**GOOD, **row}.items() if v is not None}
        rows.append(row)
    rows += [{"audio_filepath": name, "duration": 1.0, **GOOD} for name, _ in HANDLED]
    return write_manifest(folder / "corpus.jsonl", rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return build_corpus(folder), tokenizer(tmp_path_factory.mktemp("tokenizer"))


def run_check(manifest: Path, tokenizer_path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = check.main([str(manifest), "--task", "sft", "--decode", "--max-duration", str(MAX_SECONDS),
                           "--tokenizer", str(tokenizer_path), "--max-context", str(MAX_CONTEXT)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def check_output(corpus):
    manifest, tok = corpus
    return run_check(manifest, tok.path)


def test_corpus_size():
    assert len(BAD) >= 15 and len(HANDLED) == 4


@pytest.mark.parametrize("case", range(len(BAD)), ids=[case[0] for case in BAD])
def test_check_reports_the_case_with_file_line_and_field(corpus, check_output, case):
    manifest, _ = corpus
    _, field, fragment, _ = BAD[case][1:]
    code, out, err = check_output
    line = case + 2  # line 1 is the good recording
    messages = [m for m in out.splitlines() if m.startswith(f"{manifest}:{line}: ")]
    assert len(messages) == 1, out  # one problem, stated once
    where = f"{manifest}:{line}: " + (f"field '{field}': " if field else "")
    assert messages[0].startswith(where) and fragment in messages[0], messages[0]


def test_check_exit_status_summary_and_handled_formats(corpus, check_output):
    manifest, _ = corpus
    code, out, err = check_output
    assert code == 1 and err == "" and "Traceback" not in out
    problems = [m for m in out.splitlines() if m.startswith(f"{manifest}:")]
    assert len(problems) == len(BAD)  # nothing about the good line or the four handled files
    assert "checked 1 manifest(s), 25 lines: 5 usable, 20 with errors (20 problems), 0 warnings" in out
    assert "formats: WAV PCM_16, 16000 Hz, 1 ch: 1; WAV PCM_U8, 16000 Hz, 1 ch: 1; WAV PCM_24, 16000 Hz, 1 ch: 1; " \
           "WAV PCM_16, 16000 Hz, 2 ch: 1; WAV PCM_16, 44100 Hz, 1 ch: 1" in out
    assert re.search(r"^ +< 10 s +5 #{40}$", out, re.M)


def test_check_as_a_command_prints_no_traceback(corpus):
    manifest, tok = corpus
    result = subprocess.run(
        [sys.executable, "-m", "data.check", str(manifest), "--task", "sft", "--decode", "--max-duration", "5",
         "--tokenizer", str(tok.path), "--max-context", "200"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert sum(line.startswith(f"{manifest}:") for line in result.stdout.splitlines()) == len(BAD)
    usage = subprocess.run([sys.executable, "-m", "data.check", str(manifest), "--tokenizer", "/nonexistent.model",
                            "--max-context", "9"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert usage.stderr.startswith("data.check: SentencePiece model not found: /nonexistent.model")


def test_dataset_skips_each_bad_sample_with_a_counted_reason(corpus, caplog):
    manifest, tok = corpus
    dataset = ManifestDataset.from_manifests([manifest], tok, task="sft", policy=DurationPolicy(MAX_SECONDS),
                                             max_context=MAX_CONTEXT, max_tokens=4096, shuffle=False)
    loaded = []
    for plan in dataset.epoch_plans(0):
        loaded += dataset.load(plan).ids
    expected = {"manifest": 0, "audio_file": 0, "segment": 0, "over_context": 0}
    for *_, reason in BAD:
        expected[reason] += 1
    counts = dataset.rejected + dataset.skipped
    assert dict(counts) == expected
    assert sorted(loaded) == sorted(["good", *[f"{name}" for name, _ in HANDLED]])
    for issue in dataset.issues:  # logged once each, with file, line and field
        assert any(str(issue) in record.getMessage() for record in caplog.records)
    assert len(dataset.issues) == len(BAD)
    # a later epoch skips the known-bad samples again, counts them, and reads no file for them
    before = dict(dataset.skipped)
    for plan in dataset.epoch_plans(1):
        dataset.load(plan)
    assert all(dataset.skipped[k] == 2 * v for k, v in before.items())


def test_strict_mode_stops_at_the_first_bad_sample_with_the_same_message(corpus):
    manifest, tok = corpus
    with pytest.raises(DataError) as manifest_errors:
        ManifestDataset.from_manifests([manifest], tok, task="sft", policy=DurationPolicy(MAX_SECONDS), strict=True)
    assert len(manifest_errors.value.issues) == sum(reason == "manifest" for *_, reason in BAD)
    missing = [row for row in manifest.read_bytes().splitlines() if b"nowhere.wav" in row]
    strict_manifest = write_manifest(manifest.with_name("strict.jsonl"), missing)
    dataset = ManifestDataset.from_manifests([strict_manifest], tok, task="sft", strict=True)
    with pytest.raises(DataError, match=r"strict.jsonl:1: field 'audio_filepath': .*nowhere.wav does not exist"):
        dataset.load(dataset.epoch_plans(0)[0])


@pytest.mark.parametrize("name,how", HANDLED)
def test_handled_formats_load_as_16khz_mono(corpus, name, how):
    manifest, _ = corpus
    audio = load_audio(manifest.parent / name, duration=1.0)
    assert audio.waveform.dtype == torch.float32 and audio.waveform.shape == (RATE,)
    reference = torch.from_numpy(tone(1.0))
    if how == "stereo":
        reference = (reference + torch.from_numpy(tone(1.0, frequency=220.0))) / 2  # mean of the channels
    if how == "44.1 kHz":
        assert audio.info.sample_rate == 44100
        reference = torch.from_numpy(tone(1.0, noise=0.0))  # the same tone, synthesised at 16 kHz
        # windowed-sinc resampling: equal away from the edges (the sinc kernel's reach)
        torch.testing.assert_close(audio.waveform[200:-200], reference[200:-200], atol=2e-3, rtol=0)
        return
    tolerance = {"PCM_U8": 1 / 128, "PCM_24": 2**-23, "stereo": 2**-15}[how]
    torch.testing.assert_close(audio.waveform, reference, atol=tolerance, rtol=0)
    features = log_mel(audio.waveform)
    assert features.shape == (98, 80) and torch.isfinite(features).all()
    assert soundfile.info(str(manifest.parent / name)).channels == (2 if how == "stereo" else 1)


def test_float_peak_above_one_is_a_warning_and_huge_samples_never_reach_the_features(tmp_path, corpus):
    """A float file at 3x full scale is used, with one warning naming the line (data.check and
    the dataset alike); 1e30 x a tone (finite, so no NaN check fires) is refused by log_mel too,
    for callers that hand it arrays."""
    _, tok = corpus
    write_audio(tmp_path / "loud.wav", tone(1.0, noise=0.0) * np.float32(3.0), subtype="FLOAT")
    manifest = write_manifest(tmp_path / "loud.jsonl", [{"audio_filepath": "loud.wav", "duration": 1.0, **GOOD}])
    code, out, err = run_check(manifest, tok.path)
    warnings = [m for m in out.splitlines() if m.startswith(f"{manifest}:1: ")]
    assert code == 0 and len(warnings) == 1, out
    assert "field 'audio_filepath': peak amplitude" in warnings[0] and "is outside [-1, 1]" in warnings[0]
    dataset = ManifestDataset.from_manifests([manifest], tok, task="sft", max_context=MAX_CONTEXT, shuffle=False)
    for epoch in (0, 1):
        for plan in dataset.epoch_plans(epoch):
            dataset.load(plan)
    assert [issue.severity for issue in dataset.issues] == ["warning"]  # once, not once per epoch
    with pytest.raises(ValueError, match=r"audio samples reach 1e\+30, far outside \[-1, 1\]"):
        log_mel(np.full(4000, 1e30, dtype=np.float32))
