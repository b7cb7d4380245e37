"""Manifest parsing: paths, defaults, ids, the duration policy, every problem of a line reported."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.manifest import DataError, Issue, load_manifest, read_manifest
from tests.data.helpers import write_manifest


def test_fields_paths_and_extra_keys_round_trip(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = write_manifest(tmp_path / "sub" / "m.jsonl", [
        {"audio_filepath": "a.wav", "duration": 12, "offset": 1.5, "id": 7, "lang": "en", "transcript": "hi",
         "instruction": "Summarize.", "summary": "Short.", "speaker_count": 3},
        {"audio_filepath": "/abs/b.flac", "duration": 2.25},
    ])
    first, second = load_manifest(manifest)
    assert first.id == "7" and first.duration == 12.0 and first.offset == 1.5 and first.lang == "en"
    assert first.audio_path == (tmp_path / "sub" / "a.wav").resolve() and first.extra == {"speaker_count": 3}
    assert first.where == f"{manifest}:1" and second.where == f"{manifest}:2"
    assert str(second.audio_path) == "/abs/b.flac" and second.id == "/abs/b.flac" and second.transcript is None
    again = write_manifest(tmp_path / "sub" / "again.jsonl", [first.to_json(), second.to_json()])
    assert [e.to_json() for e in load_manifest(again)] == [first.to_json(), second.to_json()]
    assert json.loads(json.dumps(first.to_json(absolute_path=True)))["audio_filepath"] == str(first.audio_path)


def test_implicit_ids_are_unique_per_segment_and_explicit_duplicates_are_errors(tmp_path):
    """Several instructions per recording (AMI: 3 per meeting) need no explicit ids."""
    one = write_manifest(tmp_path / "one.jsonl", [
        {"audio_filepath": "m.wav", "duration": 5, "instruction": "a"},
        {"audio_filepath": "m.wav", "duration": 5, "instruction": "b"},
        {"audio_filepath": "m.wav", "duration": 5, "offset": 60, "instruction": "c"},
        {"audio_filepath": "m.wav", "duration": 5, "instruction": "d"},
        {"audio_filepath": "x.wav", "duration": 5, "id": "shared"},
    ])
    two = write_manifest(tmp_path / "two.jsonl", [{"audio_filepath": "y.wav", "duration": 5, "id": "shared"}])
    report = read_manifest([one, two])
    assert [e.id for e in report.entries] == ["m.wav", "m.wav#2", "m.wav@60", "m.wav#3", "shared"]
    assert [str(i) for i in report.issues] == [
        f"{two}:1: field 'id': duplicate id 'shared' (first at {one}:5); ids must be unique across the manifests "
        "read together"]


def test_every_problem_of_a_line_is_reported(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"audio_filepath": 3, "duration": True, "offset": "1", "id": [], "summary": 5, "transcript": ""},
        {"audio_filepath": "a.wav", "duration": float("nan")},  # json.dumps writes NaN, json.loads reads it
        {"duration": -2, "instruction": None},
    ])
    report = read_manifest(manifest, require=["instruction"])
    assert report.entries == [] and report.lines == 3
    assert [str(issue).split(": ", 1)[1] for issue in report.issues] == [
        "field 'instruction': missing; this step needs it on every line",
        "field 'audio_filepath': expected a path string, got 3 (a number)",
        "field 'duration': expected a number of seconds, got true (a boolean)",
        "field 'offset': expected a number of seconds, got '1' (a string)",
        "field 'id': expected a string, got [] (a list)",
        "field 'transcript': is empty; write it, or leave the field out",
        "field 'summary': expected a string, got 5 (a number)",
        "field 'instruction': missing; this step needs it on every line",
        "field 'duration': expected a finite number of seconds, got nan",
        "field 'audio_filepath': missing; every line needs it",
        "field 'instruction': missing; this step needs it on every line",
        "field 'duration': must be > 0 seconds, got -2",
    ]
    with pytest.raises(DataError) as raised:
        load_manifest(manifest, require=["instruction"])
    first = str(raised.value).splitlines()[0]
    assert first == f"{manifest}:1: field 'instruction': missing; this step needs it on every line"


def test_duration_policy_error_or_truncate_warning(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio_filepath": "a.wav", "duration": 2000.0}])
    refused = read_manifest(manifest, max_duration=1800)
    assert refused.entries == [] and [str(i) for i in refused.errors] == [
        f"{manifest}:1: field 'duration': 2000 s is longer than the limit of 1800 s; split the recording "
        "(offset/duration) or raise the limit (max_duration)"]
    kept = read_manifest(manifest, max_duration=1800, on_too_long="truncate")
    assert len(kept.entries) == 1 and kept.errors == [] and [str(i) for i in kept.warnings] == [
        f"{manifest}:1: warning: field 'duration': 2000 s is longer than the limit of 1800 s; only the first "
        "1800 s will be used"]


def test_blank_lines_bom_and_missing_manifest(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'\xef\xbb\xbf{"audio_filepath": "a.wav", "duration": 1}\n\n   \n{"audio_filepath": "b.wav", '
                         b'"duration": 1}')
    report = read_manifest(manifest)
    assert [e.line for e in report.entries] == [1, 4] and report.issues == []
    missing = read_manifest(tmp_path / "nope.jsonl")
    assert [str(i) for i in missing.issues] == [f"{tmp_path / 'nope.jsonl'}: manifest not found; check the path"]
    assert str(Issue("f", 3, None, "x")) == "f:3: x"


HOSTILE = [  # (raw line, the message after "FILE:2: ")
    (b'{"audio_filepath": "a.wav", "duration": 1' + b"0" * 400 + b"}",
     "field 'duration': expected a number of seconds, got an integer of 401 digits"),
    (b'{"audio_filepath": "a.wav", "duration": ' + b"1" * 5000 + b"}",
     "not usable JSON: an integer of 5000 digits (at most 4300 are read)"),
    (b'{"audio_filepath": "a.wav", "duration": 1.0, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "not usable JSON: nested deeper than Python's recursion limit"),
    (b'{"audio_filepath": "a.wav", "duration": 1.0, "instruction": "Summarize \\ud800."}',
     "field 'instruction': holds a lone surrogate (\\ud800 at character 11), which is not a character"),
    (b'{"audio_filepath": "a.wav", "duration": 2, "duration": 1000}',
     "warning: field 'duration': the key appears more than once in this line; the last value (1000) is used"),
]


@pytest.mark.parametrize("raw, says", HOSTILE, ids=["400 zeros", "5000 digits", "deep nesting", "lone surrogate",
                                                     "duplicate key"])
def test_hostile_values_get_one_line_and_the_other_lines_are_still_checked(tmp_path, raw, says):
    """Each case used to end in a traceback (OverflowError, ValueError naming no line,
    RecursionError, sentencepiece's RuntimeError) or pass silently (a repeated key)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"audio_filepath": "a.wav", "duration": 1.0}\n' + raw
                         + b'\n{"audio_filepath": "b.wav", "duration": -1}\n')
    report = read_manifest(manifest)
    messages = [str(issue) for issue in report.issues]
    assert messages[0].startswith(f"{manifest}:2: {says}"), messages
    assert messages[-1] == f"{manifest}:3: field 'duration': must be > 0 seconds, got -1"  # the next line: checked
    assert len(messages) == 2 and report.entries[0].id == "a.wav"
    result = subprocess.run([sys.executable, "-m", "data.check", str(manifest), "--no-audio"], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr  # 1: errors found
    assert f"{manifest}:2: {says}" in result.stdout and f"{manifest}:3: field 'duration'" in result.stdout


def test_a_fifo_or_folder_given_as_the_manifest_is_refused_without_reading(tmp_path):
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    assert [str(i) for i in read_manifest([fifo, tmp_path]).issues] == [
        f"{fifo}: the manifest is not a regular file (a FIFO, socket or device); give a JSON-lines file",
        f"{tmp_path}: the manifest is a folder; give a JSON-lines file"]
