"""The AMI loader (eval/ami.py) on generated fixtures in the real NXT layout: transcript order,
speaker labels, punctuation, untimed words, mixed headsets, summaries, the exact test split,
errors that name files."""
import numpy as np
import pytest
import soundfile

from eval.ami import AMI_TEST_MEETINGS
from eval.benchmark_item import BenchmarkError
from eval.benchmarks import load_benchmark
from tests.eval.fixtures import ES2004A_REFERENCE, ES2004A_TRANSCRIPT, TS3003C_TRANSCRIPT, write_ami


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
