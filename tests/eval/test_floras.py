"""The FLORAS loader (eval/floras.py) on generated exports: JSON lines; parquet when pyarrow is
installed, else a clear error; rows that name their file and line."""
import base64
import io
import json

import pytest
import soundfile

from eval.benchmark_item import BenchmarkError
from eval.benchmarks import load_benchmark
from eval.floras import DEFAULT_INSTRUCTION
from tests.eval.fixtures import tone, write_wav

try:
    import pyarrow  # noqa: F401

    HAVE_PYARROW = True
except ImportError:
    HAVE_PYARROW = False


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
