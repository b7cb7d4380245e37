"""eval.run's log-mel features (eval/run_decode.py `ItemFeatures`): computed per item and padded,
they equal `log_mel_batch` bit for bit; `--feature-cache` reuses them across runs (same outputs,
no audio decoded), shares a segment within a batch, and recomputes a damaged entry."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import model.features as features_module
from data.audio import DurationPolicy
from data.dataset import FEATURE_CACHE_VERSION, feature_key
from eval.benchmark_item import BenchmarkItem
from eval.run import evaluate, main
from eval.run_decode import EvalError, ItemFeatures
from model.features import log_mel_batch, pad_features
from tests.eval.fixtures import build_audio_checkpoint, tone, write_wav

MAX_NEW_TOKENS = 6
# (id, file, offset, duration): two questions per recording, as the toy benchmarks ask, and two
# segments of one file (distinct features); 6 items, 4 distinct segments of 3 files
ROWS = [("a/q0", "a.wav", None, None), ("a/q1", "a.wav", None, None),
        ("b/q0", "b.wav", None, None), ("b/q1", "b.wav", None, None),
        ("c/head", "c.wav", 0.0, 1.0), ("c/tail", "c.wav", 0.75, 1.25)]
SECONDS = {"a.wav": 1.0, "b.wav": 1.5, "c.wav": 2.0}
INSTRUCTIONS = ("Summarize the meeting.", "List the decisions as bullet points.")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("features_world")
    checkpoint = build_audio_checkpoint(root / "ckpt", seed=1, stop_word="control")
    for i, (name, seconds) in enumerate(SECONDS.items()):
        write_wav(root / "bench" / "audio" / name, seconds, 250 + 90 * i)
    rows = []
    for i, (item_id, name, offset, duration) in enumerate(ROWS):
        row = {"id": item_id, "audio_filepath": f"audio/{name}", "transcript": f"A: item {item_id}.",
               "instruction": INSTRUCTIONS[i % 2], "duration": duration or SECONDS[name]}
        rows.append(row if offset is None else {**row, "offset": offset})
    bench = root / "bench" / "mini.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return checkpoint, bench


@pytest.fixture
def log_mel_calls(monkeypatch):
    """Counts per-clip log-mel computations (ItemFeatures imports log_mel at each call)."""
    calls = []
    real = features_module.log_mel

    def counting(waveform, *args, **kwargs):
        calls.append(len(waveform))
        return real(waveform, *args, **kwargs)

    monkeypatch.setattr(features_module, "log_mel", counting)
    return calls


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(checkpoint: Path, bench: Path, out: Path, *extra: str) -> dict:
    """eval.run --judge none on the mini benchmark in one batch; (outputs log, samples) read back."""
    assert main(["--checkpoint", f"ck={checkpoint}", "--benchmark", f"mini=jsonl:{bench}", "--judge", "none",
                 "--out", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "8", "--device", "cpu",
                 "--no-plot", *extra]) == 0
    return {"outputs": read_jsonl(out / "outputs" / "ck" / "mini.jsonl"),
            "samples": read_jsonl(out / "samples" / "ck" / "mini.jsonl")}


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("??/*.safetensors"))


def test_eval_run_with_a_feature_cache_gives_the_same_outputs_and_reads_it_back(world, tmp_path, log_mel_calls,
                                                                                 monkeypatch):
    checkpoint, bench = world
    cache = tmp_path / "features"
    plain = run_cli(checkpoint, bench, tmp_path / "plain")
    # one batch of 6 items, 4 distinct segments: a recording asked twice is computed once
    assert len(log_mel_calls) == 4 and not cache.exists()
    assert [s["id"] for s in plain["samples"]] == [row[0] for row in ROWS]
    assert all(s["output"] and s["num_tokens"] <= MAX_NEW_TOKENS for s in plain["samples"])

    cold = run_cli(checkpoint, bench, tmp_path / "cold", "--feature-cache", str(cache))
    assert cold == plain  # the same records: ids, keys, outputs, token counts, diagnostics
    assert len(log_mel_calls) == 8 and len(entries(cache)) == 4 and not list(cache.glob("??/.*"))  # no temp files

    def no_decoding(self):
        raise AssertionError(f"{self.id}: audio decoded although its features are cached")

    monkeypatch.setattr(BenchmarkItem, "load_waveform", no_decoding)
    warm = run_cli(checkpoint, bench, tmp_path / "warm", "--feature-cache", str(cache))
    assert warm == plain and len(log_mel_calls) == 8 and len(entries(cache)) == 4
    settings = json.loads((tmp_path / "warm" / "run.json").read_text())
    assert "feature_cache" not in json.dumps(settings)  # results do not depend on it: not a setting


def test_cached_features_equal_log_mel_batch_bit_for_bit(world, tmp_path, log_mel_calls):
    """Files, segments, a mix of two files (AMI's headsets) and samples in memory, padded as one
    batch: cold (computed) and warm (read back) both equal log_mel_batch of the loaded waveforms."""
    _, bench = world
    audio = bench.parent / "audio"
    memory = torch.from_numpy(np.ascontiguousarray(np.stack([tone(0.8, 440, 22050), tone(0.8, 660, 22050)], axis=1)))
    items = [BenchmarkItem("a", audio_path=audio / "a.wav", transcript="t", instruction="i"),
             BenchmarkItem("c", audio_path=audio / "c.wav", offset=0.75, duration=1.25, transcript="t",
                           instruction="i"),
             BenchmarkItem("mix", audio_path=(audio / "a.wav", audio / "b.wav"), transcript="t", instruction="i"),
             BenchmarkItem("mem", waveform=memory, sample_rate=22050, transcript="t", instruction="i"),
             BenchmarkItem("a-again", audio_path=audio / "a.wav", transcript="t", instruction="j")]
    expected, expected_lengths = log_mel_batch([item.load_waveform() for item in items])  # (5, frames, 80), (5,)
    assert expected_lengths.tolist() == [98, 123, 148, 78, 98]  # (samples - 400) // 160 + 1 at 16 kHz

    cold = ItemFeatures(tmp_path / "features")
    batch, lengths = pad_features(cold(items))
    assert torch.equal(batch, expected) and torch.equal(lengths, expected_lengths)
    assert (cold.read, cold.computed, cold.written) == (0, 4, 3)  # "a" once; "mem" is not cached
    assert len(log_mel_calls) == 4 and len(entries(tmp_path / "features")) == 3

    warm = ItemFeatures(tmp_path / "features")
    batch, lengths = pad_features(warm(items))
    assert torch.equal(batch, expected) and torch.equal(lengths, expected_lengths)
    assert (warm.read, warm.computed, warm.written) == (3, 1, 0) and len(log_mel_calls) == 5
    assert warm.summary() == "feature cache: 3 clips read, 1 computed (0 saved)"


def test_a_damaged_entry_is_a_miss_and_is_rewritten(world, tmp_path, caplog):
    _, bench = world
    audio = bench.parent / "audio"
    items = [BenchmarkItem(name, audio_path=audio / name, transcript="t", instruction="i") for name in SECONDS]
    cache = tmp_path / "features"
    writer = ItemFeatures(cache)
    first = writer(items)
    damaged = writer.cache.path(writer.key(items[1]))
    damaged.write_bytes(b"not a safetensors file")
    again = ItemFeatures(cache)
    with caplog.at_level(logging.WARNING):
        second = again(items)
    assert f"cache entry {damaged} is unreadable" in caplog.text
    assert (again.read, again.computed, again.written) == (2, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    third = ItemFeatures(cache)  # rewritten whole: every entry reads back
    assert all(torch.equal(a, b) for a, b in zip(first, third(items))) and third.read == 3


def test_keys_are_trainings_and_a_missing_file_skips_the_cache(world, tmp_path):
    """One file keys exactly as data.dataset.FeatureCache always has (training's entries stay
    valid); a mix, another segment and another policy are other keys; a missing file has none."""
    _, bench = world
    path = bench.parent / "audio" / "c.wav"
    stat = path.stat()
    payload = {"path": str(path.resolve()), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size, "offset": 0.75,
               "duration": 1.25, "max_seconds": None, "on_too_long": "error", "filterbank": "speechlib",
               "version": FEATURE_CACHE_VERSION}
    item = BenchmarkItem("c", audio_path=path, offset=0.75, duration=1.25, transcript="t", instruction="i")
    features = ItemFeatures(tmp_path / "features")
    assert features.key(item) == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    no_limit = DurationPolicy(max_seconds=None)
    others = {feature_key(path, offset=0.0, duration=1.25, policy=no_limit, filterbank="speechlib"),
              feature_key(path, offset=0.75, duration=1.25, policy=DurationPolicy(), filterbank="speechlib"),
              feature_key((path, path), offset=0.75, duration=1.25, policy=no_limit, filterbank="speechlib")}
    assert len(others) == 3 and features.key(item) not in others
    gone = BenchmarkItem("gone", audio_path=tmp_path / "gone.wav", transcript="t", instruction="i")
    assert features.key(gone) is None and ItemFeatures().key(item) is None  # no cache: no key
    with pytest.raises(EvalError, match="benchmark item 'gone': "):
        features([gone])


def test_evaluate_takes_a_feature_cache_for_text_mode_too(world, tmp_path):
    """A text-mode checkpoint reads no audio: the cache folder is not even created for it."""
    checkpoint, bench = world
    cache = tmp_path / "features"
    results = evaluate({"t": f"text:{checkpoint}"}, {"mini": f"jsonl:{bench}?limit=2"}, None, tmp_path / "out",
                       max_new_tokens=MAX_NEW_TOKENS, device="cpu", with_plot=False, feature_cache=cache)
    assert results.to_json()["t"]["mini"]["n_items"] == 2 and not cache.exists()
