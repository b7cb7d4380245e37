"""NeMo manifests as users have them: `text` (ASR) for transcript, `context` / `answer` (SpeechLLM)
for instruction / summary, a conflict warned about with FILE:LINE, and a null duration read from
the audio file's header (WAV files written here)."""
from data.manifest import read_manifest
from tests.data.helpers import tone, write_audio, write_manifest


def test_asr_and_speechllm_names_are_read_as_aliases(tmp_path):
    manifest = write_manifest(tmp_path / "nemo.jsonl", [
        {"audio_filepath": "a.wav", "duration": 2.0, "text": "hello there", "lang": "en"},
        {"audio_filepath": "b.wav", "duration": 3.5, "offset": 1.0, "context": "Summarize the call.",
         "answer": "They said hello.", "text": "hello again"},
    ])
    report = read_manifest(manifest, require=("transcript",))
    assert report.issues == []
    asr, llm = report.entries
    assert (asr.transcript, asr.instruction, asr.summary, asr.extra) == ("hello there", None, None, {})
    assert (llm.transcript, llm.instruction, llm.summary) == ("hello again", "Summarize the call.", "They said hello.")
    assert llm.to_json() == {"audio_filepath": "b.wav", "duration": 3.5, "offset": 1.0, "id": "b.wav@1",
                             "transcript": "hello again", "instruction": "Summarize the call.",
                             "summary": "They said hello."}  # written back under the project's names
    sft = read_manifest(manifest, require=("instruction", "summary"))  # the aliases satisfy require= too
    assert [e.id for e in sft.entries] == ["b.wav@1"] and [str(i) for i in sft.errors] == [
        f"{manifest}:1: field 'instruction': missing; this step needs it on every line",
        f"{manifest}:1: field 'summary': missing; this step needs it on every line"]


def test_alias_and_field_that_differ_warn_with_file_and_line(tmp_path):
    manifest = write_manifest(tmp_path / "both.jsonl", [
        {"audio_filepath": "a.wav", "duration": 2.0, "transcript": "same", "text": "same"},
        {"audio_filepath": "b.wav", "duration": 2.0, "instruction": "Summarize.", "context": "List the decisions."},
        {"audio_filepath": "c.wav", "duration": 2.0, "summary": None, "answer": "From the alias."},
        {"audio_filepath": "d.wav", "duration": 2.0, "text": 7},
    ])
    report = read_manifest(manifest)
    assert [str(i) for i in report.issues] == [
        f"{manifest}:2: warning: field 'context': NeMo's name for 'instruction', which this line also has with "
        "another value; 'instruction' is used and 'context' is ignored: remove one of them",
        f"{manifest}:4: field 'text': expected a string, got 7 (a number)"]
    first, second, third = report.entries
    assert first.transcript == "same" and "text" not in first.extra
    assert second.instruction == "Summarize." and second.extra == {}
    assert third.summary == "From the alias."


def test_null_duration_is_read_from_the_wav_header(tmp_path):
    write_audio(tmp_path / "audio" / "m.wav", tone(1.25))  # 20000 frames at 16 kHz
    write_audio(tmp_path / "audio" / "long.wav", tone(3.0))
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"audio_filepath": "audio/m.wav", "duration": None, "text": "whole file"},
        {"audio_filepath": "audio/m.wav", "duration": None, "offset": 0.25, "id": "tail"},
        {"audio_filepath": "audio/m.wav", "duration": None, "offset": 1.25},
        {"audio_filepath": "audio/missing.wav", "duration": None},
        {"audio_filepath": "audio/missing.wav", "duration": None, "lang": 5},  # other errors: not probed
        {"audio_filepath": "audio/long.wav", "duration": None, "id": "long"},
        {"audio_filepath": "audio/m.wav"},  # absent (not null) is still an error
    ])
    report = read_manifest(manifest, max_duration=2.0)
    whole, tail = report.entries
    assert (whole.duration, whole.transcript) == (1.25, "whole file")
    assert (tail.id, tail.offset, tail.duration) == ("tail", 0.25, 1.0)
    assert whole.to_json()["duration"] == 1.25  # the number is what pipelines write back
    missing = tmp_path / "audio" / "missing.wav"
    assert [str(i) for i in report.issues] == [
        f"{manifest}:3: field 'offset': 1.25 s is at or past the end of the file, which is 1.25 s long ('duration' "
        "is null, so the rest of the file was asked for); fix the offset",
        f"{manifest}:4: field 'audio_filepath': {missing} does not exist; check the path (relative paths are "
        "resolved against the manifest's folder) ('duration' is null, so it is read from this file's header)",
        f"{manifest}:5: field 'lang': expected a string, got 5 (a number)",
        f"{manifest}:6: field 'duration': null, and the file holds 3 s after the offset, longer than the limit of "
        "2 s; split the recording (offset/duration) or raise the limit (max_duration)",
        f"{manifest}:7: field 'duration': missing; every line needs it"]

    truncating = read_manifest(manifest, max_duration=2.0, on_too_long="truncate")
    long = next(e for e in truncating.entries if e.id == "long")
    assert long.duration == 3.0 and [str(i) for i in truncating.warnings] == [
        f"{manifest}:6: warning: field 'duration': null, and the file holds 3 s after the offset, longer than the "
        "limit of 2 s; only the first 2 s will be used"]
