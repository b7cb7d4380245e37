"""eval.run end to end: two tiny audio checkpoints, a 3-item benchmark, a scripted judge on
loopback. The table's means and intervals, the per-sample files, greedy decoding equal to a
direct `rollout.generate`, resuming (zero decodes and zero judge calls on a rerun; a torn line
re-decodes one sample), a judge change re-judging without re-decoding, the CLI. The bootstrap
against its exact distribution: tests/eval/test_report.py."""
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from eval import run_decode
from eval.judge import JudgeScore, OpenAIJudge
from eval.run import EvalError, evaluate, judge_identity, main, make_judge
from model import load_pretrained
from model.features import log_mel, num_audio_tokens
from model.tokenizer import load_tokenizer
from rollout.sampler import SamplingParams, generate
from tests.api.http_stub import Reply, StubServer
from tests.eval.fixtures import build_audio_checkpoint, write_jsonl_benchmark

KEY_ENV = "SPEECHSUM_TEST_EVAL_KEY"
BASE = {"alpha": (7, 0, 7), "bravo": (5, 1, 6), "charlie": (3, 0, 4)}  # word -> (overall, halluc., adherence)
ITEMS = [
    {"id": "m1", "transcript": "A: alpha budget.", "instruction": "Summarize in at most 5 words.", "seconds": 1.0},
    {"id": "m2", "transcript": "B: bravo design.", "instruction": "List the decisions as bullet points.",
     "seconds": 2.0},
    {"id": "m3", "transcript": "C: charlie price.", "instruction": "Return the decisions as JSON.", "seconds": 1.5},
]
MAX_NEW_TOKENS = 10


def scripted_scores(transcript: str, summary: str) -> tuple[int, int, int]:
    """The scripted judge: a score per transcript, one point off when the summary has an odd
    number of characters (so the two checkpoints' rows differ)."""
    overall, hallucination, adherence = next(v for k, v in BASE.items() if k in transcript)
    return overall - len(summary) % 2, hallucination, adherence


def chat_reply(content):
    return {"id": "c", "object": "chat.completion", "model": "judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def respond(request):
    text = request.body["messages"][-1]["content"]
    transcript = text.split("<transcript>\n")[1].split("\n</transcript>")[0]
    summary = text.split("<summary>\n")[1].split("\n</summary>")[0]
    overall, hallucination, adherence = scripted_scores(transcript, summary)
    return Reply(body=chat_reply(json.dumps({"explanation": f"scripted for {transcript.split()[1]}", "overall": overall,
                                             "hallucination": hallucination, "adherence": adherence})))


class CountingJudge:
    """A local judge (no config()): every summary gets 4, hallucination 0, adherence 5."""

    def __init__(self):
        self.calls = 0

    def score(self, source, instruction, summary):
        self.calls += 1
        return JudgeScore(overall=4, hallucination=0, adherence=5, explanation="local")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_world")
    checkpoints = {"ckpt_a": build_audio_checkpoint(root / "ckpt_a", seed=0),
                   "ckpt_b": build_audio_checkpoint(root / "ckpt_b", seed=1, stop_word="control")}
    bench = write_jsonl_benchmark(root / "bench" / "mini.jsonl", [dict(item) for item in ITEMS])
    return root, checkpoints, bench


@pytest.fixture
def counters(monkeypatch):
    """Counts model loads and decoded items inside eval.run."""
    counts = {"loads": 0, "decoded": 0}
    load, decode = run_decode.CheckpointDecoder._load, run_decode.CheckpointDecoder.decode

    def counting_load(self):
        counts["loads"] += 1
        return load(self)

    def counting_decode(self, items):
        counts["decoded"] += len(items)
        return decode(self, items)

    monkeypatch.setattr(run_decode.CheckpointDecoder, "_load", counting_load)
    monkeypatch.setattr(run_decode.CheckpointDecoder, "decode", counting_decode)
    return counts


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_cell(samples):
    """Mean and the documented bootstrap, recomputed here: seed 0, 2000 resamples, percentiles."""
    scores = np.array([scripted_scores(next(i["transcript"] for i in ITEMS if i["id"] == s["id"]), s["output"])[0]
                       for s in samples], dtype=float)
    means = scores[np.random.default_rng(0).integers(0, len(scores), (2000, len(scores)))].mean(1)
    return scores.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def test_evaluate_end_to_end_then_resume(world, tmp_path, counters, capsys):
    root, checkpoints, bench = world
    out = tmp_path / "eval"
    with StubServer(respond) as stub:
        judge = OpenAIJudge(stub.base_url, "judge", api_key_env=None)  # no response cache: resuming is eval.run's
        results = evaluate(checkpoints, {"mini": f"jsonl:{bench}"}, judge, out, max_new_tokens=MAX_NEW_TOKENS,
                           batch_size=2, device="cpu")
        assert stub.count("/chat/completions") == 6 and counters == {"loads": 2, "decoded": 6}

        cells = results.to_json()
        assert json.loads((out / "results.json").read_text()) == cells
        for name in checkpoints:
            samples = read_jsonl(out / "samples" / name / "mini.jsonl")
            assert [s["id"] for s in samples] == ["m1", "m2", "m3"]
            assert [s["instruction"] for s in samples] == [i["instruction"] for i in ITEMS]
            for s in samples:
                transcript = next(i["transcript"] for i in ITEMS if i["id"] == s["id"])
                assert (s["overall"], s["hallucination"], s["adherence"]) == scripted_scores(transcript, s["output"])
                assert s["explanation"] == f"scripted for {transcript.split()[1]}"
                assert s["num_tokens"] <= MAX_NEW_TOKENS and s["diagnostics"]["words"] >= 0
            assert [s["diagnostics"]["requested_format"] for s in samples] == [None, "bullets", "json"]
            assert samples[0]["diagnostics"]["requested_length"] == {"unit": "words", "min": 0, "max": 5}
            cell = cells[name]["mini"]
            mean, low, high = expected_cell(samples)
            assert (cell["n_items"], cell["n"], cell["judge_invalid"]) == (3, 3, 0)
            assert cell["mean"] == pytest.approx(mean) and (cell["ci_low"], cell["ci_high"]) == (low, high)
            assert cell["hallucination_rate"] == pytest.approx(1 / 3) and cell["adherence"] == pytest.approx(17 / 3)
            assert cell["hit_max_tokens"] == np.mean([s["hit_max_tokens"] for s in samples])
            assert cell["format_valid"] == np.mean([s["diagnostics"]["format_valid"] for s in samples[1:]])

        table = results.table()
        for name in checkpoints:
            cell = cells[name]["mini"]
            assert f"| {name} | {cell['mean']:.2f} [{cell['ci_low']:.2f}, {cell['ci_high']:.2f}] |" in table
        assert (out / "results.md").read_text() == table
        rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
        assert [r["checkpoint"] for r in rows] == ["ckpt_a", "ckpt_b"]
        assert float(rows[0]["mini"]) == pytest.approx(cells["ckpt_a"]["mini"]["mean"], abs=1e-5)
        assert float(rows[1]["mini_ci_high"]) == pytest.approx(cells["ckpt_b"]["mini"]["ci_high"], abs=1e-5)
        assert rows[0]["mini_n"] == "3"
        long = list(csv.DictReader(io.StringIO((out / "diagnostics.csv").read_text())))
        assert [(r["checkpoint"], r["benchmark"]) for r in long] == [("ckpt_a", "mini"), ("ckpt_b", "mini")]

        # a second run reuses everything: no model load, no decode, no judge call
        again = evaluate(checkpoints, {"mini": f"jsonl:{bench}"}, judge, out, max_new_tokens=MAX_NEW_TOKENS,
                         batch_size=2, device="cpu")
        assert stub.count("/chat/completions") == 6 and counters == {"loads": 2, "decoded": 6}
        assert again.to_json() == cells

        # a killed run leaves a torn last line: dropped, and only that sample is decoded again
        outputs = out / "outputs" / "ckpt_a" / "mini.jsonl"
        raw = outputs.read_bytes()
        outputs.write_bytes(raw[: raw.rfind(b"\n", 0, len(raw) - 1) + 20])
        torn = evaluate(checkpoints, {"mini": f"jsonl:{bench}"}, judge, out, max_new_tokens=MAX_NEW_TOKENS,
                        batch_size=2, device="cpu")
        assert counters == {"loads": 3, "decoded": 7}
        assert outputs.read_bytes().endswith(b"\n") and len(read_jsonl(outputs)) == 3
        assert torn.to_json()["ckpt_a"]["mini"]["n"] == 3

    # another judge re-judges the saved outputs without decoding
    local = CountingJudge()
    rejudged = evaluate(checkpoints, {"mini": f"jsonl:{bench}"}, local, out, max_new_tokens=MAX_NEW_TOKENS,
                        device="cpu")
    assert local.calls == 6 and counters["loads"] == 3
    assert rejudged.to_json()["ckpt_b"]["mini"]["mean"] == 4.0
    assert (rejudged.to_json()["ckpt_b"]["mini"]["ci_low"], rejudged.to_json()["ckpt_b"]["mini"]["ci_high"]) == (4, 4)
    # judge-free: diagnostics only, score cells "-"
    free = evaluate(checkpoints, {"mini": f"jsonl:{bench}"}, None, out, max_new_tokens=MAX_NEW_TOKENS, device="cpu")
    assert counters["loads"] == 3 and free.to_json()["ckpt_a"]["mini"]["mean"] is None
    assert "| ckpt_a | - |" in free.table()


def test_greedy_outputs_match_a_direct_generate(world, tmp_path):
    root, checkpoints, bench = world
    """Batched (left-padded, two clips) greedy outputs equal each item decoded alone; one of the
    two stops at <|end|> and is cut there, the other runs to max_new_tokens."""
    results = evaluate({"b": checkpoints["ckpt_b"]}, {"mini": f"jsonl:{bench}?limit=2"}, None, tmp_path,
                       max_new_tokens=MAX_NEW_TOKENS, batch_size=2, device="cpu", with_plot=False)
    assert results.to_json()["b"]["mini"]["n_items"] == 2
    samples = read_jsonl(tmp_path / "samples" / "b" / "mini.jsonl")
    assert [s["hit_max_tokens"] for s in samples] == [True, False]
    model = load_pretrained(checkpoints["ckpt_b"]).eval()
    tokenizer = load_tokenizer(checkpoints["ckpt_b"])
    for sample in samples:
        audio, _ = soundfile.read(str(bench.parent / "audio" / f"{sample['id']}.wav"), dtype="float32")
        features = log_mel(audio)
        prompt = tokenizer.build_chat_prompt(sample["instruction"], num_audio_tokens=[num_audio_tokens(len(audio))])
        rollout = generate(model, [torch.tensor(prompt.input_ids)],
                           SamplingParams(MAX_NEW_TOKENS, temperature=0, eos_token_ids=tokenizer.eos_token_ids),
                           audio_features=features[None], audio_lengths=torch.tensor([features.shape[0]]))
        ids = rollout.tokens[0, : int(rollout.lengths[0])].tolist()
        ended = next((i for i, t in enumerate(ids) if t in tokenizer.eos_token_ids), None)
        assert sample["output"] == tokenizer.decode(ids[:ended], skip_special=True).strip() != ""
        assert sample["hit_max_tokens"] == (ended is None)


def test_command_line(world, tmp_path, monkeypatch, capsys):
    root, checkpoints, bench = world
    monkeypatch.setenv(KEY_ENV, "sk-test-eval")
    with StubServer(respond) as stub:
        code = main(["--checkpoint", f"sft={checkpoints['ckpt_a']}", "--benchmark", f"golden=jsonl:{bench}",
                     f"jsonl:{bench}?limit=1", "--judge", "openai:judge", "--judge-base-url", stub.base_url,
                     "--judge-api-key-env", KEY_ENV, "--out", str(tmp_path), "--max-new-tokens", "6"])
        # 4 samples, but mini's only item is golden's first: the same request, served by the
        # judge's response cache under --out
        assert code == 0 and stub.count("/chat/completions") == 3
        assert stub.requests[0].headers["authorization"] == "Bearer sk-test-eval"
    printed = capsys.readouterr().out
    assert "| Checkpoint | golden | mini |" in printed and "| sft | " in printed
    settings = json.loads((tmp_path / "run.json").read_text())
    assert settings["judge"]["model"] == "judge" and "base_url" not in settings["judge"]
    assert (settings["judge_usage"]["requests"], settings["judge_usage"]["cache_hits"]) == (3, 1)
    assert settings["benchmarks"] == {"golden": f"jsonl:{bench}", "mini": f"jsonl:{bench}?limit=1"}
    assert any((tmp_path / "judge_cache").rglob("*.json"))  # the judge's own response cache is under --out

    assert main(["--checkpoint", str(tmp_path), "--benchmark", f"jsonl:{bench}", "--judge", "none",
                 "--out", str(tmp_path / "x")]) == 2
    assert "has no config.json; pass a checkpoint directory" in capsys.readouterr().err
    assert main(["--checkpoint", str(checkpoints["ckpt_a"]), str(checkpoints["ckpt_a"]), "--benchmark",
                 f"jsonl:{bench}", "--judge", "none", "--out", str(tmp_path / "x")]) == 2
    assert "two checkpoints are named 'ckpt_a'; name them as NAME=..." in capsys.readouterr().err


def test_judge_specs(monkeypatch, tmp_path):
    assert make_judge("none") is None
    judge = make_judge("openai:gpt-4.1", base_url="http://127.0.0.1:9/v1", api_key_env="", cache_dir=tmp_path)
    assert isinstance(judge, OpenAIJudge) and judge.model == "gpt-4.1"
    identity = judge_identity(judge)
    assert identity["model"] == "gpt-4.1" and identity["temperature"] == 0.0 and "cache_dir" not in identity
    assert judge_identity(CountingJudge())["source_sha"]  # a local judge: its code is its identity
    with pytest.raises(EvalError, match="expected openai:MODEL"):
        make_judge("gpt-4.1")
    monkeypatch.setitem(sys.modules, "toy.oracle", None)  # as if the toy world's oracle were absent
    with pytest.raises(EvalError, match="--judge oracle needs toy.oracle.OracleJudge"):
        make_judge("oracle")


def test_text_mode_checkpoint_reads_the_transcript(world, tmp_path):
    """`text:DIR`: the model gets the teacher's prompt (transcript + instruction), no audio;
    its outputs equal a direct greedy generate from that prompt, and the decode cache keys on
    the transcript, not the audio."""
    from rollout.teachers import teacher_prompt_ids

    root, checkpoints, bench = world
    results = evaluate({"text_b": f"text:{checkpoints['ckpt_b']}"}, {"mini": f"jsonl:{bench}?limit=2"}, None,
                       tmp_path, max_new_tokens=MAX_NEW_TOKENS, batch_size=2, device="cpu", with_plot=False)
    assert results.to_json()["text_b"]["mini"]["n_items"] == 2
    model = load_pretrained(checkpoints["ckpt_b"]).eval()
    tokenizer = load_tokenizer(checkpoints["ckpt_b"])
    items = {item["id"]: item for item in ITEMS}
    for sample in read_jsonl(tmp_path / "samples" / "text_b" / "mini.jsonl"):
        item = items[sample["id"]]
        prompt = teacher_prompt_ids(tokenizer, item["transcript"], item["instruction"])
        rollout = generate(model, [torch.tensor(prompt)],
                           SamplingParams(MAX_NEW_TOKENS, temperature=0, eos_token_ids=tokenizer.eos_token_ids))
        ids = rollout.tokens[0, : int(rollout.lengths[0])].tolist()
        ended = next((i for i, t in enumerate(ids) if t in tokenizer.eos_token_ids), None)
        assert sample["output"] == tokenizer.decode(ids[:ended], skip_special=True).strip()
