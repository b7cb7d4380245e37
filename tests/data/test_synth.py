"""data.synth end to end against a scripted OpenAI-compatible stub on loopback: query proposal,
threshold, seeded choice, summaries, statistics; a SIGKILL mid-run and a resume that re-requests
nothing already answered; repair of torn output; the output is SFT training data."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from api.client import ApiClient
from api.retry import RetryPolicy
from data import synth
from data.dataset import ManifestDataset
from data.manifest import load_manifest
from data.synth import SynthConfig
from data.synth_prompts import PROPOSE_SYSTEM, choose, parse_candidates
from tests.api.http_stub import Reply, StubServer
from tests.data.helpers import tokenizer, tone, write_audio, write_manifest

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


def q(query, style, importance):
    return {"query": query, "style": style, "importance": importance}


# What the scripted LLM proposes for each recording.
PROPOSALS = {
    "r0": [q("Summarize the meeting in two sentences.", "short", 9), q("List the decisions as bullets.", "bullets", 8),
           q("What colour was the wall?", "part_question", 3), q("Write an e-mail to the absent manager.", "email", 6)],
    "r1": [q("Give the action items as bullet points.", "bullets", 7),
           q("Write an e-mail summary for the team.", "email", 8),
           q("Summarize in at most 50 words.", "length_limit", 9), q("Who spoke first?", "part_question", 5)],
    "r2": [q("Say hello.", "other", 2), q("Count the words.", "other", 4), q("Summarize.", "short", 6)],
    "r3": [q("Summarize the meeting.", "short", 9), q("summarize   the MEETING.", "short", 9),
           q("What did the designer say about the battery?", "part_question", 8)],
    "r4": [q("Return the budget items as JSON with name and price.", "json", 10),
           q("What was decided about the buttons?", "part_question", 7), q("Translate to Klingon.", "other", 1),
           q("Rate the meeting.", "other", 12), {"style": "short", "importance": 9}],
    "r5": [q("Summarize in under 30 words.", "length-limit", 8), q("Summarize briefly.", "short", 7)],
    "r6": [q("Draft an e-mail with the next steps.", "email", 9)],
    "r7": [q("Key points as bullets.", "bullet points", 8), q("What was said about the price?", "Question", 7)],
}
PROPOSED, VALID, KEPT = 24, 22, 14  # from the lists above (r3: one repeat; r4: two invalid items)


def chat(content, prompt_tokens=100, completion_tokens=20):
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": "stub-llm",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def summary_for(recording, query):
    return f"{recording}: " + " ".join(["detail"] * (5 + len(query) // 4))


class ScriptedLLM:
    """Answers proposals from PROPOSALS and summaries deterministically; r5's first proposal reply is
    malformed (a proxy error page), which the client must retry. `on_request(n)` runs before reply n."""

    def __init__(self, on_request=None):
        self.on_request = on_request
        self.count = 0
        self.malformed_sent = False

    def __call__(self, request):
        self.count += 1
        if self.on_request is not None:
            self.on_request(self.count)
        system, user = (m["content"] for m in request.body["messages"])
        recording = re.search(r"\[(r\d)\]", user).group(1)
        if system == PROPOSE_SYSTEM:
            if recording == "r5" and not self.malformed_sent:
                self.malformed_sent = True
                return Reply(body=b"<html>502 Bad Gateway</html>")
            return Reply(body=chat("```json\n" + json.dumps({"queries": PROPOSALS[recording]}) + "\n```"))
        query = re.search(r"<request>\n(.*?)\n</request>", user, re.S).group(1)
        return Reply(body=chat(summary_for(recording, query)))


def corpus(folder: Path) -> Path:
    rows = []
    for i, recording in enumerate(PROPOSALS):
        write_audio(folder / "audio" / f"{recording}.wav", tone(0.5, seed=i))
        rows.append({"audio_filepath": f"audio/{recording}.wav", "duration": 0.5, "id": recording, "lang": "en",
                     "transcript": f"[{recording}] A: welcome to the meeting. B: the budget is 25 euros.",
                     "meeting_type": "design"})
    rows.insert(3, {"audio_filepath": "audio/r0.wav", "duration": 0.5, "id": "no-transcript"})
    return write_manifest(folder / "in.jsonl", rows)


def client(stub, cache, concurrency=4):
    return ApiClient(stub.base_url, api_key_env=None, cache_dir=cache, retry=FAST, max_concurrency=concurrency)


def canonical(request):
    return json.dumps(request.body, sort_keys=True)


def test_parse_candidates_and_seeded_choice():
    candidates, proposed = parse_candidates("Here you go:\n" + json.dumps({"queries": PROPOSALS["r4"]}))
    assert proposed == 5 and [c.style for c in candidates] == ["json", "part_question", "other"]
    chosen, kept = choose(candidates, threshold=7, count=1, seed=0, recording_id="r4")
    assert kept == 2 and chosen[0].importance >= 7
    assert all(choose(candidates, threshold=7, count=1, seed=0, recording_id="r4")[0] == chosen for _ in range(5))
    draws = {choose(candidates, threshold=7, count=1, seed=s, recording_id="r4")[0][0].query for s in range(40)}
    assert len(draws) == 2  # both survivors get picked across seeds, never the one below the threshold
    two, _ = choose(parse_candidates(json.dumps(PROPOSALS["r3"]))[0], threshold=7, count=2, seed=0, recording_id="r3")
    assert len({c.query.casefold() for c in two}) == 2  # no duplicate queries for one recording
    with pytest.raises(synth.MalformedResponseError):
        parse_candidates("I cannot help with that.")


def test_synth_end_to_end_statistics_and_sft_ready_output(tmp_path, capsys):
    manifest = corpus(tmp_path / "in")
    out = tmp_path / "out" / "sft.jsonl"
    with StubServer(ScriptedLLM()) as stub:
        stats = synth.run([manifest], out, client(stub, tmp_path / "cache"), SynthConfig("stub-llm"))
        requests = stub.count("/chat/completions")
        assert stub.max_in_flight <= 4
    printed = capsys.readouterr().out
    assert f"{manifest}:4: field 'transcript': missing; this step needs it on every line" in printed

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["r0", "r1", "r3", "r4", "r5", "r6", "r7"]
    for row in rows:
        survivors = [p["query"] for p in PROPOSALS[row["id"]] if "query" in p and 7 <= p["importance"] <= 10]
        assert row["instruction"] in survivors and row["summary"] == summary_for(row["id"], row["instruction"])
        assert row["audio_filepath"] == f"../in/audio/{row['id']}.wav" and row["meeting_type"] == "design"
        assert row["synth"]["queries_chosen"] == 1 and row["synth"]["importance"] >= 7
    assert json.loads((tmp_path / "out" / "sft.jsonl.rejected.jsonl").read_text()) == {
        "id": "r2", "reason": "no query at or above the threshold", "proposed": 3, "valid": 3, "kept": 0}
    # 8 proposals + 1 retried malformed reply + 7 summaries
    assert requests == 16 and stats["usage"]["retries"] == 1 and stats["usage"]["requests"] == 16

    assert stats["queries_proposed"] == PROPOSED and stats["queries_valid"] == VALID and stats["queries_kept"] == KEPT
    assert stats["acceptance_rate"] == pytest.approx(KEPT / PROPOSED)
    assert sum(stats["style_mix"].values()) == 7 and set(stats["style_mix"]) <= set(synth.QUERY_STYLES)
    words = [len(row["summary"].split()) for row in rows]
    assert stats["summary_words"]["mean"] == pytest.approx(sum(words) / 7)
    assert stats["summary_words"]["max"] == max(words)
    assert stats["run"] == {"recordings": 8, "invalid_lines": 1, "resumed": 0, "processed": 8}
    assert f"acceptance rate {KEPT / PROPOSED:.1%}" in printed

    # the output is SFT data: a valid manifest the dataset loads, audio included
    tok = tokenizer(tmp_path / "tok")
    data = ManifestDataset.from_manifests([out], tok, task="sft", max_tokens=10_000)
    batch = data.load([i for plan in data.epoch_plans(0) for i in plan])
    assert sorted(batch.ids) == sorted(row["id"] for row in rows) and data.skipped == {}

    # a second run has nothing to do: no request, not even a cache lookup
    with StubServer(ScriptedLLM()) as stub:
        again = synth.run([manifest], out, client(stub, tmp_path / "cache"), SynthConfig("stub-llm"))
        assert stub.count() == 0
    assert again["run"]["resumed"] == 8 and again["usage"]["cache_hits"] == 0 and again["rows"] == 7


def test_sigkill_mid_run_then_resume_re_requests_nothing_already_answered(tmp_path):
    manifest = corpus(tmp_path / "in")
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    child = {}

    def kill_at_seventh(number):
        if number == 7:  # r3's summary: r0 and r1 are written, r2 is rejected, r3's proposal is cached
            os.kill(child["process"].pid, signal.SIGKILL)
            child["process"].wait(timeout=30)

    with StubServer(ScriptedLLM(on_request=kill_at_seventh)) as stub:  # the server stays up, the client dies
        child["process"] = subprocess.Popen(
            [sys.executable, "-m", "data.synth", "--manifest", str(manifest), "--out", str(out), "--llm", "stub-llm",
             "--base-url", stub.base_url, "--api-key-env", "", "--cache-dir", str(cache), "--concurrency", "1"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        child["process"].communicate(timeout=120)
        first_run = list(stub.requests)
        assert child["process"].returncode == -signal.SIGKILL and len(first_run) == 7
        assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["r0", "r1"]

        stats = synth.run([manifest], out, client(stub, cache), SynthConfig("stub-llm"), log=lambda _: None)
        resumed_run = stub.requests[len(first_run):]
    answered = {canonical(r) for r in first_run[:6]}
    assert answered.isdisjoint(canonical(r) for r in resumed_run)  # nothing answered before is asked again
    assert canonical(first_run[6]) in {canonical(r) for r in resumed_run}  # the request cut by the kill is
    assert stats["run"]["resumed"] == 3 and stats["usage"]["cache_hits"] == 1  # r3's proposal

    with StubServer(ScriptedLLM()) as stub:  # the same corpus in one uninterrupted run
        reference = synth.run([manifest], tmp_path / "ref.jsonl", client(stub, tmp_path / "ref-cache"),
                              SynthConfig("stub-llm"), log=lambda _: None)
    key = lambda row: (row["id"], row["instruction"], row["summary"])  # noqa: E731
    resumed_rows = [json.loads(line) for line in out.read_text().splitlines()]
    reference_rows = [json.loads(line) for line in (tmp_path / "ref.jsonl").read_text().splitlines()]
    assert sorted(map(key, resumed_rows)) == sorted(map(key, reference_rows)) and len(resumed_rows) == 7
    drop = ("run", "usage")
    assert {k: v for k, v in stats.items() if k not in drop} == {k: v for k, v in reference.items() if k not in drop}


def test_torn_output_is_repaired_and_redone_from_the_cache(tmp_path):
    manifest = corpus(tmp_path / "in")
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    config = SynthConfig("stub-llm", queries_per_recording=2, seed=3)
    stub = StubServer(ScriptedLLM())
    synth.run([manifest], out, client(stub, cache), config, log=lambda _: None)
    complete = out.read_text()
    rows = [json.loads(line) for line in complete.splitlines()]
    assert [r["id"] for r in rows if r["synth"]["source_id"] == "r1"] == ["r1/q1", "r1/q2"]
    assert [r["id"] for r in rows if r["synth"]["source_id"] == "r6"] == ["r6"]  # one survivor only
    for source in {r["synth"]["source_id"] for r in rows}:
        queries = [r["instruction"].casefold() for r in rows if r["synth"]["source_id"] == source]
        assert len(queries) == len(set(queries))
    # a crash inside the last write: r7's second row is missing and a line is cut short
    lines = complete.splitlines(keepends=True)
    last_r7 = max(i for i, r in enumerate(rows) if r["synth"]["source_id"] == "r7")
    out.write_text("".join(lines[:last_r7] + lines[last_r7 + 1 :]) + lines[last_r7][:25])
    with stub:
        before = stub.count()
        stats = synth.run([manifest], out, client(stub, cache), config, log=lambda _: None)
        assert stub.count() == before  # r7 is redone entirely from the cache
    assert sorted(out.read_text().splitlines()) == sorted(complete.splitlines())
    assert stats["run"]["resumed"] == 7 and stats["run"]["processed"] == 1
    assert len(load_manifest(out, require=["instruction", "summary"])) == len(rows)
