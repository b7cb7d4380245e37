"""eval.preferences end to end: a tiny audio student samples two responses per recording, a
scripted judge on loopback compares them in both orders, ties / disagreements / unusable replies
are dropped, pairs are written with the judge's reasons and train the DPO dataset; a SIGKILL
mid-run and a resume that re-requests nothing already answered."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from api.retry import RetryPolicy
from eval import preferences
from data.dataset import ManifestDataset
from data.text import repetition
from eval.preferences import SamplingConfig, classify
from eval.judge import OpenAIJudge
from model import load_pretrained, save_pretrained
from tests.api.http_stub import Reply, StubServer
from tests.data.helpers import tiny_audio_model, tokenizer, tone, write_audio, write_manifest

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
TIE, BIASED, UNUSABLE = {"p2"}, {"p5"}, {"p6"}  # how the scripted judge treats these recordings
CONFIG = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=1, batch_size=2)


def chat(content):
    return {"id": "chatcmpl-judge", "object": "chat.completion", "created": 0, "model": "stub-judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}}


class ScriptedJudge:
    """Prefers the summary with less repetition, then the shorter one; always "tie" for TIE, always
    "A" (position bias) for BIASED, prose without a verdict for UNUSABLE."""

    def __init__(self, on_request=None):
        self.on_request, self.count = on_request, 0

    def __call__(self, request):
        self.count += 1
        if self.on_request is not None:
            self.on_request(self.count)
        prompt = request.body["messages"][1]["content"]
        recording = re.search(r"\[(p\d)\]", prompt).group(1)
        a = re.search(r"<summary_a>\n(.*?)\n</summary_a>", prompt, re.S).group(1)
        b = re.search(r"<summary_b>\n(.*?)\n</summary_b>", prompt, re.S).group(1)
        if recording in UNUSABLE:
            return Reply(body=chat("Both summaries have merits and flaws."))
        if recording in TIE:
            winner, why = "tie", "Neither is better."
        elif recording in BIASED:
            winner, why = "A", "The first one reads better."
        else:
            score = lambda text: (repetition(text), len(text.split()), text)  # noqa: E731
            winner = "A" if score(a) < score(b) else "B"
            why = f"Summary {winner} repeats itself less and is more concise."
        return Reply(body=chat(json.dumps({"explanation": why, "winner": winner})))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny student checkpoint (audio encoder included) and 8 recordings with transcripts."""
    folder = tmp_path_factory.mktemp("prefs")
    tok = tokenizer(folder / "tok")
    checkpoint = folder / "student"
    save_pretrained(tiny_audio_model(tok), checkpoint)
    (checkpoint / "tokenizer.model").write_bytes(tok.path.read_bytes())
    rows = []
    for i in range(8):
        write_audio(folder / "audio" / f"p{i}.wav", tone(0.5 + 0.1 * i, seed=i))
        rows.append({"audio_filepath": f"audio/p{i}.wav", "duration": 0.5 + 0.1 * i, "id": f"p{i}",
                     "instruction": "Summarize the meeting.", "transcript": f"[p{i}] the team agreed on the budget.",
                     "summary": "ignored by this stage"})
    rows.insert(2, {"audio_filepath": "audio/p0.wav", "duration": 0.5, "id": "no-instruction", "transcript": "[p0]"})
    return write_manifest(folder / "in.jsonl", rows), checkpoint, tok


def judge(stub, cache, concurrency=4):
    return OpenAIJudge(stub.base_url, "stub-judge", api_key_env=None, cache_dir=cache, retry=FAST,
                       max_concurrency=concurrency)


def canonical(request):
    return json.dumps(request.body, sort_keys=True)


def test_classify_and_repetition():
    assert [classify("a", "a"), classify("b", "b"), classify("a", "b"), classify("tie", "a"), classify(None, "a")] \
        == ["a", "b", "disagreement", "tie", "invalid"]
    # 15 words, 13 trigrams, 5 distinct (the 5-word cycle): 8 of 13 repeat an earlier one
    assert repetition("- How to Get Away - How to Get Away - How to Get Away") == pytest.approx(5 / 9)  # word 4-grams
    assert repetition("one two three four") == 0.0 and repetition("too short") == 0.0


def test_preferences_end_to_end_pairs_reasons_and_statistics(world, tmp_path, capsys):
    manifest, checkpoint, tok = world
    model = load_pretrained(checkpoint)
    out = tmp_path / "out" / "pairs.jsonl"
    with StubServer(ScriptedJudge()) as stub:
        stats = preferences.run([manifest], out, model, tok, judge(stub, tmp_path / "cache"), CONFIG)
        assert stub.count("/chat/completions") == 2 * 8 and stub.max_in_flight <= 4  # both orders, 8 recordings
    printed = capsys.readouterr().out
    assert f"{manifest}:3: field 'instruction': missing; this step needs it on every line" in printed

    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    dropped = {row["id"]: row for row in map(json.loads, (tmp_path / "out" / "pairs.jsonl.dropped.jsonl")
                                             .read_text().splitlines())}
    assert {row["id"] for row in pairs} == {"p0", "p1", "p3", "p4", "p7"}
    assert {k: v["reason"] for k, v in dropped.items()} == {"p2": "tie", "p5": "disagreement", "p6": "invalid"}
    assert dropped["p5"]["verdicts"] == ["a", "b"] and dropped["p2"]["explanations"] == ["Neither is better."] * 2
    for row in pairs:
        assert row["audio_filepath"] == f"../../{manifest.parent.name}/audio/{row['id']}.wav"
        assert "summary" not in row and row["transcript"].startswith(f"[{row['id']}]")
        assert repetition(row["chosen"]) <= repetition(row["rejected"])  # the scripted judge's rule
        assert row["chosen"] == tok.decode(row["chosen_token_ids"]).strip()
        assert row["chosen_finished"] == (row["chosen_token_ids"][-1] in tok.eos_token_ids)
        orders = row["judge"]["orders"]
        assert row["judge"]["model"] == "stub-judge" and {tuple(o["shown"]) for o in orders} == {
            ("chosen", "rejected"), ("rejected", "chosen")}
        for order in orders:  # the judge named the chosen response in both orders, with its reason
            assert order["shown"][{"A": 0, "B": 1}[order["verdict"]]] == "chosen"
            assert re.fullmatch(r"Summary [AB] repeats itself less and is more concise\.", order["explanation"])
        assert row["sampling"]["seed"] in (1, 3, 5, 7)  # --seed + the manifest position of the batch's first

    assert stats["pairs"] == 5 and stats["dropped"] == {"identical": 0, "tie": 1, "disagreement": 1, "invalid": 1}
    assert stats["judged"] == 8 and stats["tie_rate"] == pytest.approx(1 / 8)
    assert stats["disagreement_rate"] == pytest.approx(1 / 8) and stats["judge_invalid_replies"] == 2
    assert stats["chosen"]["repetition"] <= stats["rejected"]["repetition"]
    assert stats["chosen"]["tokens"] == pytest.approx(sum(len(r["chosen_token_ids"]) for r in pairs) / 5)
    assert stats["run"] == {"recordings": 8, "invalid_lines": 1, "resumed": 0, "processed": 8}
    assert "tie rate 12.5%, disagreement rate 12.5%" in printed

    # the pairs file trains DPO: two rows per pair (y+, y-), the sampled ids as responses
    data = ManifestDataset.from_manifests([out], tok, task="pairs", max_tokens=10_000)
    batch = data.load(data.epoch_plans(0)[0])
    assert len(batch.ids) == 2 * len(data.sample_ids(batch)) and batch.ids[0] == batch.ids[1]
    first = next(row for row in pairs if row["id"] == batch.ids[0])
    assert batch.input_ids[0][batch.loss_mask[0]].tolist() == first["chosen_token_ids"]
    assert batch.input_ids[1][batch.loss_mask[1]].tolist() == first["rejected_token_ids"]
    torch.testing.assert_close(batch.audio_features[0], batch.audio_features[1])


def test_greedy_samples_are_identical_and_never_judged(world, tmp_path):
    manifest, checkpoint, tok = world
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, batch_size=4)
    with StubServer(ScriptedJudge()) as stub:
        stats = preferences.run([manifest], tmp_path / "pairs.jsonl", load_pretrained(checkpoint), tok,
                                judge(stub, tmp_path / "cache"), greedy, log=lambda _: None)
        assert stub.count() == 0
    assert stats["pairs"] == 0 and stats["dropped"]["identical"] == 8 and stats["judged"] == 0


def test_sigkill_mid_run_then_resume_re_requests_nothing_already_answered(world, tmp_path):
    manifest, checkpoint, tok = world
    out, cache = tmp_path / "pairs.jsonl", tmp_path / "cache"
    child = {}

    def kill_at_sixth(number):
        if number == 6:  # batch 2's second judge request: batch 1 (p0, p1) is written
            os.kill(child["process"].pid, signal.SIGKILL)
            child["process"].wait(timeout=30)

    with StubServer(ScriptedJudge(on_request=kill_at_sixth)) as stub:  # the server stays up, the client dies
        child["process"] = subprocess.Popen(
            [sys.executable, "-m", "eval.preferences", "--checkpoint", str(checkpoint), "--manifest", str(manifest),
             "--judge", "stub-judge", "--out", str(out), "--base-url", stub.base_url, "--api-key-env", "",
             "--cache-dir", str(cache), "--concurrency", "1", "--batch-size", "2", "--max-new-tokens", "10",
             "--seed", "1", "--device", "cpu"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        child["process"].communicate(timeout=300)
        first_run = list(stub.requests)
        assert child["process"].returncode == -signal.SIGKILL and len(first_run) == 6
        assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["p0", "p1"]

        stats = preferences.run([manifest], out, load_pretrained(checkpoint), tok, judge(stub, cache), CONFIG,
                                log=lambda _: None)
        resumed_run = stub.requests[len(first_run):]
    answered = {canonical(r) for r in first_run[:5]}
    assert answered.isdisjoint(canonical(r) for r in resumed_run)  # nothing answered before is asked again
    assert canonical(first_run[5]) in {canonical(r) for r in resumed_run}  # the request cut by the kill is
    assert stats["run"]["resumed"] == 2 and stats["judge_usage"]["cache_hits"] == 1
    assert len(resumed_run) == 2 * 6 - 1

    with StubServer(ScriptedJudge()) as stub:  # the same corpus in one uninterrupted run
        preferences.run([manifest], tmp_path / "ref.jsonl", load_pretrained(checkpoint), tok,
                        judge(stub, tmp_path / "ref-cache"), CONFIG, log=lambda _: None)
    strip = lambda row: {k: v for k, v in row.items() if k != "audio_filepath"}  # noqa: E731
    resumed_rows = sorted((strip(json.loads(line)) for line in out.read_text().splitlines()), key=lambda r: r["id"])
    reference = sorted((strip(json.loads(line)) for line in (tmp_path / "ref.jsonl").read_text().splitlines()),
                       key=lambda r: r["id"])
    assert resumed_rows == reference


def test_the_judge_reads_judge_source_when_a_row_has_one(world, tmp_path):
    """Rows with `judge_source` (the toy world's record, for its oracle) are judged against it;
    rows without it against their transcript."""
    from eval.judge import Preference

    manifest, checkpoint, tok = world
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows = [dict(row, audio_filepath=str(manifest.parent / row["audio_filepath"])) for row in rows
            if "instruction" in row][:3]
    rows[0]["judge_source"] = '{"record": 0}'
    seen = []

    class RecordingJudge:
        def prefer_many(self, items):
            seen.extend(source for source, *_ in items)
            return [Preference("tie", "tie", "tie", ("", "")) for _ in items]

    sampled = write_manifest(tmp_path / "in.jsonl", rows)
    preferences.run([sampled], tmp_path / "pairs.jsonl", load_pretrained(checkpoint), tok, RecordingJudge(), CONFIG)
    assert seen == ['{"record": 0}', rows[1]["transcript"], rows[2]["transcript"]]  # sampled pairs all differ
