"""Benchmark specs and the jsonl loader (eval/benchmarks.py) with the toy world's judge_source,
and the item type (eval/benchmark_item.py). AMI and FLORAS: tests/eval/test_ami.py and
tests/eval/test_floras.py."""
import json

import pytest
import torch

from data.manifest import DataError
from eval.benchmarks import BenchmarkError, BenchmarkItem, load_benchmark, parse_spec
from tests.eval.fixtures import write_jsonl_benchmark


def test_spec_options_are_checked():
    assert parse_spec("floras:/d?min_seconds=300&limit=2") == ("floras", "/d", {"min_seconds": "300", "limit": "2"})
    with pytest.raises(BenchmarkError, match="KIND one of jsonl, ami, floras"):
        parse_spec("golden3:/x")
    with pytest.raises(BenchmarkError, match=r"unknown option 'meeting=ES2004a'; ami takes limit=..., meetings="):
        parse_spec("ami:/x?meeting=ES2004a")


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
