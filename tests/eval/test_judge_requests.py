"""What the judge sends, recorded on the loopback stub: `max_completion_tokens` and never
`max_tokens`, no temperature when it is None (reasoning models), JSON mode; a classic Azure
deployment's path, api-version and api-key header; the command-line flags of eval.run and
eval.preferences; a changed parameter never reuses a cached reply or a stored judgement."""
import argparse
import json

import pytest

from eval import preferences, run
from eval.judge import OpenAIJudge, add_judge_arguments, judge_request_options
from eval.run import judge_identity
from tests.api.http_stub import Reply, StubServer

SECRET = "azure-judge-KEY-77ab01"
KEY_ENV = "SPEECHSUM_TEST_JUDGE_REQUESTS_KEY"
VERSION = "2024-10-21"
SOURCE = "A: The remote costs 25 euros. B: Agreed."
INSTRUCTION = "Summarize the decisions."
REPLY = '{"explanation": "Accurate.", "overall": 6, "hallucination": 0, "adherence": 7}'


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def chat(content=REPLY):
    return {"id": "chatcmpl-judge", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 90, "completion_tokens": 20, "total_tokens": 110}}


def answering():
    return StubServer(lambda request: Reply(body=chat()))


def sampling_fields(body):
    return {k: v for k, v in body.items() if k not in ("model", "messages")}


def test_default_judge_sends_temperature_0_and_max_completion_tokens():
    with answering() as stub:
        OpenAIJudge(stub.base_url, "gpt-4.1", api_key_env=KEY_ENV).score(SOURCE, INSTRUCTION, "- 25 euros")
        body = stub.requests[0].body
    assert sampling_fields(body) == {"temperature": 0.0, "max_completion_tokens": 512}
    assert body["model"] == "gpt-4.1" and [m["role"] for m in body["messages"]] == ["system", "user"]


def test_reasoning_model_settings_send_no_temperature():
    with answering() as stub:
        judge = OpenAIJudge(stub.base_url, "o3", api_key_env=KEY_ENV, temperature=None, max_tokens=4000,
                            json_mode=True)
        assert judge.prefer(SOURCE, INSTRUCTION, "a", "b") == "tie"  # a score reply has no winner
        bodies = [r.body for r in stub.requests]
    assert [sampling_fields(b) for b in bodies] == [
        {"max_completion_tokens": 4000, "response_format": {"type": "json_object"}}] * 2
    with answering() as stub:
        OpenAIJudge(stub.base_url, "o3", api_key_env=KEY_ENV, temperature=None, max_tokens=None).score(
            SOURCE, INSTRUCTION, "x")
        assert sampling_fields(stub.requests[0].body) == {}


def test_classic_azure_deployment_request():
    with answering() as stub:
        url = f"{stub.base_url.removesuffix('/v1')}/openai/deployments/gpt41?api-version={VERSION}"
        judge = OpenAIJudge(url, "gpt-4.1", api_key_env=KEY_ENV, temperature=None, max_tokens=800)
        assert judge.score(SOURCE, INSTRUCTION, "- 25 euros").overall == 6
        sent = stub.requests[0]
    assert sent.path == f"/openai/deployments/gpt41/chat/completions?api-version={VERSION}"
    assert sent.headers["api-key"] == SECRET and "authorization" not in sent.headers
    assert "max_tokens" not in sent.body and "temperature" not in sent.body
    assert sent.body["max_completion_tokens"] == 800
    assert judge.config()["azure_deployment"] == "gpt41" and SECRET not in json.dumps(judge.config())


@pytest.mark.parametrize("temperature, max_tokens", [(0.2, 512), (None, 512), (0.0, 1024)])
def test_a_changed_parameter_is_asked_again_and_judged_again(tmp_path, temperature, max_tokens):
    cache = tmp_path / "cache"
    with answering() as stub:
        base = OpenAIJudge(stub.base_url, "j", api_key_env=KEY_ENV, cache_dir=cache)
        base.score(SOURCE, INSTRUCTION, "x")
        same = OpenAIJudge(stub.base_url, "j", api_key_env=KEY_ENV, cache_dir=cache)
        same.score(SOURCE, INSTRUCTION, "x")
        changed = OpenAIJudge(stub.base_url, "j", api_key_env=KEY_ENV, cache_dir=cache, temperature=temperature,
                              max_tokens=max_tokens)
        changed.score(SOURCE, INSTRUCTION, "x")
        assert stub.count() == 2 and same.usage.cache_hits == 1 and changed.usage.cache_misses == 1
    assert judge_identity(same) == judge_identity(base)
    identity = judge_identity(changed)
    assert identity != judge_identity(base)
    assert (identity["temperature"], identity["max_tokens"]) == (temperature, max_tokens)


@pytest.mark.parametrize("options, message", [
    ({"temperature": 3.0}, "the judge's temperature must be a number in [0, 2] or None (not sent), got 3.0"),
    ({"max_tokens": 0}, "the judge's max tokens must be an integer >= 1 or None (not sent), got 0"),
])
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ValueError) as error:
        OpenAIJudge("http://127.0.0.1:9/v1", "j", api_key_env=None, **options)
    assert str(error.value) == message


def test_flag_parsing():
    parser = argparse.ArgumentParser()
    add_judge_arguments(parser)
    assert judge_request_options(parser.parse_args([])) == {"temperature": 0.0, "max_tokens": 512,
                                                             "json_mode": False}
    assert judge_request_options(parser.parse_args(
        ["--judge-temperature", "none", "--judge-max-tokens", "None", "--judge-json-mode"])) == {
        "temperature": None, "max_tokens": None, "json_mode": True}
    assert parser.parse_args(["--judge-temperature", "0.7"]).judge_temperature == 0.7


@pytest.mark.parametrize("flags, message", [
    (["--judge-temperature", "hot"], "argument --judge-temperature: expected a number in [0, 2], or none"),
    (["--judge-temperature", "2.5"], "argument --judge-temperature: expected a number in [0, 2], or none"),
    (["--judge-max-tokens", "-3"], "argument --judge-max-tokens: expected an integer >= 1, or none"),
])
def test_bad_flags_give_one_line(flags, message, capsys):
    parser = argparse.ArgumentParser(prog="x")
    add_judge_arguments(parser)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(flags)
    assert stop.value.code == 2 and message in capsys.readouterr().err


class Results:
    files = {}

    def table(self):
        return "table"


def test_eval_run_command_line_builds_the_judge_from_the_flags(tmp_path, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(run, "evaluate", lambda checkpoints, benchmarks, judge, out, **kw: built.append(judge)
                        or Results())
    with answering() as stub:
        host = stub.base_url.removesuffix("/v1")
        code = run.main(["--checkpoint", str(tmp_path), "--benchmark", "jsonl:b.jsonl", "--judge", "openai:o3",
                         "--judge-base-url", host, "--judge-azure-api-version", VERSION,
                         "--judge-azure-deployment", "o3-prod", "--judge-api-key-env", KEY_ENV,
                         "--judge-temperature", "none", "--judge-max-tokens", "6000", "--judge-json-mode",
                         "--out", str(tmp_path / "out")])
        assert code == 0 and len(built) == 1
        judge = built[0]
        assert judge.score(SOURCE, INSTRUCTION, "- 25 euros").overall == 6
        sent = stub.requests[0]
    assert sent.path == f"/openai/deployments/o3-prod/chat/completions?api-version={VERSION}"
    assert sent.headers["api-key"] == SECRET
    assert sampling_fields(sent.body) == {"max_completion_tokens": 6000, "response_format": {"type": "json_object"}}
    assert judge.client.cache.directory == tmp_path / "out" / "judge_cache"

    monkeypatch.delenv(KEY_ENV)
    assert run.main(["--checkpoint", str(tmp_path), "--benchmark", "jsonl:b.jsonl", "--judge", "openai:o3",
                     "--judge-api-key-env", KEY_ENV, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval.run: --judge openai:o3: the environment variable {KEY_ENV} (api_key_env) is not "
                          "set or empty") and "Traceback" not in err
    assert run.main(["--checkpoint", str(tmp_path), "--benchmark", "jsonl:b.jsonl", "--judge", "none",
                     "--out", str(tmp_path / "out")]) == 0 and built[-1] is None


def test_eval_preferences_command_line_passes_the_judge_flags(tmp_path, monkeypatch):
    import model
    import model.tokenizer

    built = []
    monkeypatch.setattr(model, "load_pretrained", lambda *a, **k: "student")
    monkeypatch.setattr(model.tokenizer, "load_tokenizer", lambda *a, **k: "tokenizer")
    monkeypatch.setattr(preferences, "run", lambda manifests, out, student, tok, judge, config, **kw:
                        built.append((judge, config)))
    with answering() as stub:
        url = f"{stub.base_url.removesuffix('/v1')}/openai/deployments/gpt5?api-version={VERSION}"
        code = preferences.main(["--checkpoint", str(tmp_path), "--manifest", "m.jsonl", "--judge", "gpt-5",
                                 "--out", str(tmp_path / "pairs.jsonl"), "--base-url", url, "--api-key-env", KEY_ENV,
                                 "--judge-temperature", "none", "--judge-max-tokens", "3000", "--temperature", "0.9",
                                 "--device", "cpu"])
        assert code == 0
        judge, config = built[0]
        judge.prefer(SOURCE, INSTRUCTION, "one", "two")
        bodies, paths = [r.body for r in stub.requests], [r.path for r in stub.requests]
    assert config.temperature == 0.9  # the student's sampling temperature is its own flag
    assert paths == [f"/openai/deployments/gpt5/chat/completions?api-version={VERSION}"] * 2
    assert [sampling_fields(b) for b in bodies] == [{"max_completion_tokens": 3000}] * 2
    assert judge.client.cache.directory == tmp_path / "pairs.jsonl.cache"


def test_rollout_server_honours_max_completion_tokens(tmp_path):
    """The project's own server reads the new field: three tokens asked for, at most three sent back
    (its default without the field is 256)."""
    import threading

    from rollout.server import load_service, make_server
    from tests.rollout.tiny_checkpoint import build_tiny_checkpoint

    server = make_server(load_service(build_tiny_checkpoint(tmp_path / "ckpt"), model_name="tiny"), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        judge = OpenAIJudge(f"http://127.0.0.1:{server.server_address[1]}/v1", "tiny", api_key_env=None,
                            temperature=None, max_tokens=3)
        judge.score_many([(SOURCE, INSTRUCTION, "- 25 euros")] * 2)
        assert judge.usage.requests == 2 and 0 < judge.usage.completion_tokens <= 2 * 3
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
