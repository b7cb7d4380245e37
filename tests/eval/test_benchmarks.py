"""Benchmark loaders on generated fixtures: AMI in the real NXT layout (transcript order, speaker
labels, punctuation, untimed words, mixed headsets, summaries, the exact test split, errors that
name files), FLORAS exports (JSON lines; parquet when pyarrow is installed, else a clear error),
and the jsonl manifest with the toy world's judge_source."""
import base64
import io
import json

import numpy as np
import pytest
import soundfile
import torch

from data.manifest import DataError
from eval.benchmarks import (
    AMI_TEST_MEETINGS,
    DEFAULT_INSTRUCTION,
    BenchmarkError,
    BenchmarkItem,
    load_benchmark,
    parse_spec,
)
from tests.eval.fixtures import (
    ES2004A_REFERENCE,
    ES2004A_TRANSCRIPT,
    TS3003C_TRANSCRIPT,
    tone,
    write_ami,
    write_jsonl_benchmark,
    write_wav,
)

try:
    import pyarrow  # noqa: F401

    HAVE_PYARROW = True
except ImportError:
    HAVE_PYARROW = False


# ---------------------------------------------------------------------------------------------
# AMI


def test_ami_test_split_is_exactly_the_20_scenario_meetings():
    assert AMI_TEST_MEETINGS == (
        "ES2004a", "ES2004b", "ES2004c", "ES2004d", "ES2014a", "ES2014b", "ES2014c", "ES2014d",
        "IS1009a", "IS1009b", "IS1009c", "IS1009d", "TS3003a", "TS3003b", "TS3003c", "TS3003d",
        "TS3007a", "TS3007b", "TS3007c", "TS3007d",
    )


def test_ami_transcript_order_speakers_and_references(tmp_path):
    root = write_ami(tmp_path / "ami")
    items = list(load_benchmark(f"ami:{root}?meetings=ES2004a,TS3003c").items())
    assert [i.id for i in items] == ["ES2004a#1", "ES2004a#2", "TS3003c#1"]
    first, second, third = items
    # overlapping speakers interleave by start time; punctuation glued; vocalsounds, disfluency
    # markers and the corpus' wordsx duplicates left out; the untimed "Really" follows "expensive?"
    assert first.transcript == ES2004A_TRANSCRIPT
    assert third.transcript == TS3003C_TRANSCRIPT  # same start time: speaker A before B
    assert first.judge_source == first.transcript and first.source is None
    assert [i.instruction for i in items] == ["Summarize the meeting.", "List the decisions as bullets.",
                                             "Who greeted whom?"]
    assert first.reference == ES2004A_REFERENCE and third.reference is None
    assert first.metadata == {"meeting": "ES2004a"} and third.metadata == {"meeting": "TS3003c", "format": "text"}
    assert first.audio_path == root / "amicorpus" / "ES2004a" / "audio" / "ES2004a.Mix-Headset.wav"
    assert first.load_waveform().shape == (16000,)


def test_ami_mixes_headset_channels_when_there_is_no_mix(tmp_path):
    root = write_ami(tmp_path / "ami")
    item = list(load_benchmark(f"ami:{root}?meetings=TS3003c").items())[0]
    assert item.audio_path == tuple(root / f"TS3003c.Headset-{k}.wav" for k in range(4))
    expected = sum(soundfile.read(str(p), dtype="float32")[0] for p in item.audio_path)  # peak 1.2 -> scaled
    expected = expected / np.abs(expected).max() if np.abs(expected).max() > 1 else expected
    np.testing.assert_allclose(item.load_waveform().numpy(), expected, atol=1e-6)
    assert item.seconds() == pytest.approx(0.5)


def test_ami_default_split_names_every_missing_file(tmp_path):
    root = write_ami(tmp_path / "ami")
    with pytest.raises(BenchmarkError) as error:
        load_benchmark(f"ami:{root}")
    message = str(error.value)
    assert "53 problem(s)" in message  # all at once: 18 meetings x (words, audio, instructions), ES2014b has one
    assert str(root / "words" / "ES2014a.A.words.xml") in message and "TS3007d.Mix-Headset.wav" in message
    assert "no instruction for meeting IS1009d" in message
    assert "ES2004a" not in message and "TS3003c" not in message  # the two meetings present are fine


def test_ami_malformed_xml_names_the_file_and_line(tmp_path):
    root = write_ami(tmp_path / "ami")
    bad = root / "words" / "TS3003c.B.words.xml"
    bad.write_text(bad.read_text(encoding="iso-8859-1").replace("</w>", "</x>", 1), encoding="iso-8859-1")
    with pytest.raises(BenchmarkError, match=rf"{bad}: malformed XML at line 3"):
        load_benchmark(f"ami:{root}?meetings=ES2004a,TS3003c")
    (root / "abstractive" / "ES2004a.abssumm.xml").write_text("<nite:root")
    with pytest.raises(BenchmarkError, match="ES2004a.abssumm.xml: malformed XML"):
        load_benchmark(f"ami:{root}?meetings=ES2004a")


def test_ami_instructions_file_problems(tmp_path):
    root = write_ami(tmp_path / "ami")
    with pytest.raises(BenchmarkError, match="AMI instructions file not found: .*nope.jsonl"):
        load_benchmark(f"ami:{root}?meetings=ES2004a&instructions={tmp_path / 'nope.jsonl'}")
    (tmp_path / "bad.jsonl").write_text('{"meeting": "ES2004a", "instruction": ""}\n')
    with pytest.raises(BenchmarkError, match=r"bad.jsonl:1: 'instruction' must be a non-empty string"):
        load_benchmark(f"ami:{root}?meetings=ES2004a&instructions={tmp_path / 'bad.jsonl'}")


def test_spec_options_are_checked():
    assert parse_spec("floras:/d?min_seconds=300&limit=2") == ("floras", "/d", {"min_seconds": "300", "limit": "2"})
    with pytest.raises(BenchmarkError, match="KIND one of jsonl, ami, floras"):
        parse_spec("golden3:/x")
    with pytest.raises(BenchmarkError, match=r"unknown option 'meeting=ES2004a'; ami takes limit=..., meetings="):
        parse_spec("ami:/x?meeting=ES2004a")


# ---------------------------------------------------------------------------------------------
# FLORAS


def _wav_bytes(seconds: float, freq: float, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(seconds, freq, rate), rate, format="WAV")
    return buffer.getvalue()


def floras_rows(folder):
    write_wav(folder / "clips" / "de1.wav", 2.0, 330)
    return [
        {"id": "es1", "language": "es", "score": 0.9, "text": "Hola a todos.", "summary": "Un saludo.",
         "translation": "Hello all.", "audio": {"bytes": _wav_bytes(1.0, 220), "path": "es1.wav"}},
        {"id": "it1", "language": "it", "text": "Ciao.", "summary": "Saluti.", "instruction": "Riassumi.",
         "audio": {"array": tone(3.0, 440, 8000).tolist(), "sampling_rate": 8000}},
        {"id": "de1", "language": "de", "text": "Hallo.", "audio": "clips/de1.wav"},
    ]


def test_floras_json_lines(tmp_path):
    rows = floras_rows(tmp_path)
    for row in rows:
        if isinstance(row["audio"], dict) and "bytes" in row["audio"]:
            row["audio"] = {**row["audio"], "bytes": base64.b64encode(row["audio"]["bytes"]).decode()}
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = list(load_benchmark(f"floras:{tmp_path}").items())
    assert [i.id for i in items] == ["es1", "it1", "de1"]
    es, it, de = items
    assert (es.transcript, es.reference, es.instruction) == ("Hola a todos.", "Un saludo.", DEFAULT_INSTRUCTION)
    assert es.metadata == {"language": "es", "score": 0.9}
    assert (it.instruction, de.reference) == ("Riassumi.", None)
    assert [round(i.seconds(), 3) for i in items] == [1.0, 3.0, 2.0]
    assert es.load_waveform().shape == (16000,) and it.load_waveform().shape == (48000,)  # 8 kHz resampled
    assert de.load_waveform().shape == (32000,)
    # duration filter (the paper keeps 5 min - 1 h; here seconds), languages, limit
    assert [i.id for i in load_benchmark(f"floras:{tmp_path}?min_seconds=1.5&max_seconds=2.5").items()] == ["de1"]
    assert [i.id for i in load_benchmark(f"floras:{tmp_path}?languages=it,de&limit=1").items()] == ["it1"]
    bench = load_benchmark(f"floras:{tmp_path / 'test.jsonl'}?instruction=Resume+it.")
    assert next(bench.items()).instruction == "Resume+it." and bench.name == "floras"


def test_floras_bad_rows_name_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "x", "audio": "missing.wav", "text": "t"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"a.jsonl:1: audio file .*missing.wav not found"):
        list(load_benchmark(f"floras:{tmp_path / 'a.jsonl'}").items())
    write_wav(tmp_path / "ok.wav", 1.0, 300)
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "x", "audio": "ok.wav"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"b.jsonl:1: field 'text' is missing"):
        list(load_benchmark(f"floras:{tmp_path / 'b.jsonl'}").items())
    row = json.dumps({"id": "x", "audio": "ok.wav", "text": "t"})
    (tmp_path / "c.jsonl").write_text(f"{row}\n\n{row}\n")
    with pytest.raises(BenchmarkError, match=r"c.jsonl:3: duplicate id 'x' \(first at .*c.jsonl:1\)"):
        list(load_benchmark(f"floras:{tmp_path / 'c.jsonl'}").items())
    with pytest.raises(BenchmarkError, match="FLORAS export not found"):
        load_benchmark(f"floras:{tmp_path / 'nothing'}")


@pytest.mark.skipif(HAVE_PYARROW, reason="pyarrow is installed: the parquet path is tested instead")
def test_floras_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(BenchmarkError, match="needs pyarrow, which is not installed; `pip install pyarrow`, or "
                                             "export FLORAS as JSON lines"):
        load_benchmark(f"floras:{tmp_path}")


@pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow is not installed")
def test_floras_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = floras_rows(tmp_path)
    rows[2]["audio"] = {"bytes": None, "path": "clips/de1.wav"}
    for row in rows:
        row.setdefault("instruction", None)
        row.setdefault("summary", None)
        row.setdefault("score", None)
        row.pop("translation", None)
    rows[1]["audio"] = {"bytes": _wav_bytes(3.0, 440, 8000), "path": None}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    items = list(load_benchmark(f"floras:{tmp_path / 'test.parquet'}?min_seconds=1.5").items())
    assert [i.id for i in items] == ["it1", "de1"]
    assert items[0].load_waveform().shape == (48000,) and items[1].load_waveform().shape == (32000,)


# ---------------------------------------------------------------------------------------------
# jsonl


def test_jsonl_manifest_with_judge_source_and_metadata(tmp_path):
    record = {"decisions": [{"what": "price", "value": 25}], "speakers": ["A", "B"]}
    path = write_jsonl_benchmark(tmp_path / "golden3.jsonl", [
        {"id": "m1", "transcript": "A: hi.", "instruction": "Summarize.", "summary": "Greeting.", "lang": "en"},
        {"id": "m2", "instruction": "List decisions in JSON.", "judge_source": record, "requested_length": 3},
        {"id": "m3", "transcript": "B: ok.", "instruction": "Title?", "judge_source": "RECORD"},
    ])
    bench = load_benchmark(f"jsonl:{path}")
    assert bench.name == "golden3"
    m1, m2, m3 = bench.items()
    assert (m1.judge_source, m1.reference, m1.metadata) == ("A: hi.", "Greeting.", {"lang": "en"})
    assert m2.transcript == "" and json.loads(m2.judge_source) == record and m2.metadata == {"requested_length": 3}
    assert (m3.transcript, m3.judge_source) == ("B: ok.", "RECORD")
    assert m1.audio_path == tmp_path / "audio" / "m1.wav" and m1.seconds() == 1.0


def test_jsonl_lines_without_a_source_for_the_judge(tmp_path):
    path = write_jsonl_benchmark(tmp_path / "b.jsonl", [{"id": "m1", "instruction": "Summarize."},
                                                        {"id": "m2", "transcript": "x"}])
    with pytest.raises(DataError) as error:
        load_benchmark(f"jsonl:{path}")
    assert f"{path}:1: field 'transcript': missing; the judge reads it" in str(error.value)
    assert f"{path}:2: field 'instruction': missing" in str(error.value)


def test_item_needs_exactly_one_audio():
    with pytest.raises(ValueError, match="exactly one of audio_path, waveform or audio_bytes"):
        BenchmarkItem(id="x", transcript="t", instruction="i")
    item = BenchmarkItem(id="x", waveform=torch.zeros(8000), sample_rate=8000, transcript="t", instruction="i")
    assert item.seconds() == 1.0 and item.load_waveform().shape == (16000,)
