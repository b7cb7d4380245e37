"""What data.synth sends, recorded on the loopback stub: `max_completion_tokens` and never
`max_tokens`, each stage's temperature or none at all (reasoning models), set from the command
line; a classic Azure deployment's path; a changed temperature is asked again, not served from
the cache."""
import json

import pytest

from api.client import ApiClient
from data import synth
from data.synth import SynthConfig, Synthesizer
from data.synth_prompts import PROPOSE_SYSTEM
from tests.api.http_stub import Reply, StubServer
from tests.data.helpers import write_manifest

KEY_ENV = "SPEECHSUM_TEST_SYNTH_KEY"
SECRET = "synth-test-KEY-4411"
VERSION = "2024-10-21"
QUERIES = {"queries": [{"query": "Summarize the meeting in two sentences.", "style": "short", "importance": 9}]}


def chat(content):
    return {"id": "chatcmpl-synth", "object": "chat.completion", "created": 0, "model": "llm",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}}


def llm(request):
    if request.body["messages"][0]["content"] == PROPOSE_SYSTEM:
        return Reply(body=chat(json.dumps(QUERIES)))
    return Reply(body=chat("The team agreed on a 25 euro remote."))


def sampling_fields(body):
    return {k: v for k, v in body.items() if k not in ("model", "messages")}


def stage(body):
    return "propose" if body["messages"][0]["content"] == PROPOSE_SYSTEM else "summary"


@pytest.fixture
def manifest(tmp_path):
    return write_manifest(tmp_path / "in.jsonl", [
        {"audio_filepath": "a.wav", "duration": 3.0, "id": "r0", "transcript": "A: 25 euros. B: Agreed."}])


def test_command_line_temperatures_and_token_limit_reach_the_requests(tmp_path, manifest, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with StubServer(llm) as stub:
        url = f"{stub.base_url.removesuffix('/v1')}/openai/deployments/gpt5?api-version={VERSION}"
        code = synth.main(["--manifest", str(manifest), "--out", str(tmp_path / "out.jsonl"), "--llm", "gpt-5",
                           "--base-url", url, "--api-key-env", KEY_ENV, "--propose-temperature", "none",
                           "--summary-temperature", "0.5", "--max-tokens", "1500"])
        requests = list(stub.requests)
    assert code == 0, capsys.readouterr().err
    assert [(stage(r.body), sampling_fields(r.body)) for r in requests] == [
        ("propose", {"max_completion_tokens": 1500}),
        ("summary", {"temperature": 0.5, "max_completion_tokens": 1500})]
    assert {r.path for r in requests} == {f"/openai/deployments/gpt5/chat/completions?api-version={VERSION}"}
    assert {r.headers["api-key"] for r in requests} == {SECRET}
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["summary"] == "The team agreed on a 25 euro remote."


def test_defaults_and_a_changed_temperature_is_not_served_from_the_cache(tmp_path, manifest):
    from data.manifest import load_manifest

    entry = load_manifest(manifest)[0]
    cache = tmp_path / "cache"
    with StubServer(llm) as stub:
        client = ApiClient(stub.base_url, api_key_env=None, cache_dir=cache)
        Synthesizer(client, SynthConfig("llm")).process(entry)
        Synthesizer(client, SynthConfig("llm")).process(entry)  # the same requests: both from the cache
        Synthesizer(client, SynthConfig("llm", summary_temperature=None)).process(entry)
        requests = list(stub.requests)
    assert [(stage(r.body), sampling_fields(r.body)) for r in requests] == [
        ("propose", {"temperature": 1.0, "max_completion_tokens": 4096}),
        ("summary", {"temperature": 0.3, "max_completion_tokens": 4096}),
        ("summary", {"max_completion_tokens": 4096})]  # the proposal was cached; the summary asked again
    assert client.usage.cache_hits == 3


@pytest.mark.parametrize("flags, message", [
    (["--summary-temperature", "warm"], "argument --summary-temperature: expected a number in [0, 2], or none"),
    (["--max-tokens", "0"], "argument --max-tokens: expected an integer >= 1, or none"),
])
def test_bad_flags_give_one_line(tmp_path, manifest, flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        synth.main(["--manifest", str(manifest), "--out", str(tmp_path / "o.jsonl"), "--llm", "m", *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match=r"the summary's temperature must be a number in \[0, 2\] or None"):
        SynthConfig("m", summary_temperature=-1.0)
    with pytest.raises(ValueError, match=r"the proposal's temperature must be a number in \[0, 2\] or None"):
        SynthConfig("m", propose_temperature=float("nan"))
    with pytest.raises(ValueError, match=r"max tokens must be an integer >= 1 or None \(not sent\), got 0"):
        SynthConfig("m", max_tokens=0)
