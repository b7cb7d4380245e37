"""`python -m rollout.server` as a real process on a real socket, driven by the real `openai`
client (and raw sockets for requests no client would send): endpoints, formats, values against
the local model, auth, and survival of malformed requests."""
import json
import socket

import openai
import pytest
import torch

from model import load_pretrained
from model.tokenizer import load_tokenizer
from rollout.sampler import SamplingParams, generate
from rollout.server_requests import chat_prompt_ids
from tests.rollout.server_process import address, raw_exchange, running_server
from tests.rollout.tiny_checkpoint import build_tiny_checkpoint

SECRET = "sk-test-SERVER-77aa1c9e"
KEY_ENV = "SPEECHSUM_TEST_SERVER_KEY"
MAX_BODY = 200_000
READ_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("server_ckpt"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The server process on a free port; always terminated, its log kept for the secrecy check."""
    log_path = tmp_path_factory.mktemp("server_log") / "server.log"
    with running_server(checkpoint, log_path, "--api-key-env", KEY_ENV, "--max-body-bytes", str(MAX_BODY),
                        "--read-timeout", str(READ_TIMEOUT), "--log-level", "DEBUG", env={KEY_ENV: SECRET}) as (
            process, url):
        yield process, url, log_path


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key=SECRET, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def local(checkpoint):
    return load_pretrained(checkpoint).eval(), load_tokenizer(checkpoint)


def local_logprobs(model, ids):
    """(len - 1, V) log p(ids[p + 1] | ids[:p + 1]) from one forward."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completions_text_and_token_prompts_agree_and_match_local_greedy(client, local):
    model, tok = local
    prompt = "Summarize the meeting."
    ids = tok.encode(prompt)
    by_text = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    expected = generate(model, [torch.tensor(ids)], SamplingParams(max_new_tokens=6, temperature=0,
                                                                   eos_token_ids=tok.eos_token_ids))
    tokens = expected.tokens[0, : expected.lengths[0]].tolist()
    assert by_text.choices[0].text == by_ids.choices[0].text == tok.decode(tokens)
    assert by_ids.usage.prompt_tokens == len(ids) and by_ids.usage.completion_tokens == len(tokens)
    batch = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=4, n=2, temperature=1.0, seed=3)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=4, n=2, temperature=1.0, seed=3)
    assert [c.text for c in batch.choices] == [c.text for c in again.choices]  # seeded sampling is reproducible


def test_echo_with_max_tokens_zero_scores_the_prompt(client, local):
    """The legacy echo format over the prompt only, plus the token_ids / top_logprobs_by_id extras."""
    model, tok = local
    ids = tok.build_chat_prompt("List the action items.", response="We decided on 25 euros.").input_ids
    answer = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=3)
    block = answer.choices[0].logprobs
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 0
    assert block.token_ids == ids and block.tokens == [tok.decode([i], skip_special=False) for i in ids]
    assert block.token_logprobs[0] is None and block.top_logprobs[0] is None
    expected = local_logprobs(model, ids)
    got = torch.tensor(block.token_logprobs[1:])
    torch.testing.assert_close(got, expected.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-5, rtol=0)
    for p in range(1, len(ids)):
        top_values, top_ids = expected[p - 1].topk(3)
        by_id = block.top_logprobs_by_id[p]
        assert set(by_id) == {str(i) for i in top_ids.tolist()} | {str(ids[p])}  # top 3 + the prompt token
        assert abs(by_id[str(top_ids[0].item())] - top_values[0].item()) < 1e-5
    assert block.text_offset[:3] == [0, len(block.tokens[0]), len(block.tokens[0]) + len(block.tokens[1])]


def test_prompt_logprobs_follow_vllm_format(client, local):
    model, tok = local
    ids = tok.build_chat_prompt("Summarize briefly.", response="The budget.").input_ids
    raw = client.completions.with_raw_response.create(model="tiny", prompt=ids, max_tokens=1, temperature=0,
                                                      extra_body={"prompt_logprobs": 4})
    choice = json.loads(raw.http_response.text)["choices"][0]
    entries = choice["prompt_logprobs"]
    assert choice["prompt_token_ids"] == ids and len(entries) == len(ids) and entries[0] is None
    expected = local_logprobs(model, ids)
    for p in range(1, len(ids)):
        entry, row = entries[p], expected[p - 1]
        actual = entry[str(ids[p])]
        assert abs(actual["logprob"] - row[ids[p]].item()) < 1e-5
        assert actual["rank"] == int((row > row[ids[p]]).sum()) + 1
        assert actual["decoded_token"] == tok.decode([ids[p]], skip_special=False)
        ranked = sorted(entry.items(), key=lambda item: item[1]["rank"])  # top 4, then the prompt token if lower
        assert len(entry) in (4, 5) and [info["rank"] for _, info in ranked[:4]] == [1, 2, 3, 4]
        assert [int(token_id) for token_id, _ in ranked[:4]] == row.topk(4).indices.tolist()


def test_chat_completions_with_top_logprobs(client, local):
    model, tok = local
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarize the meeting."}]
    prompt = chat_prompt_ids(tok, messages)
    assert prompt == tok.build_chat_prompt("Summarize the meeting.", system="Be brief.").input_ids
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=4)
    choice = answer.choices[0]
    expected = generate(model, [torch.tensor(prompt)], SamplingParams(max_new_tokens=5, temperature=0,
                                                                      eos_token_ids=tok.eos_token_ids))
    tokens = expected.tokens[0, : expected.lengths[0]].tolist()
    assert choice.message.role == "assistant" and choice.message.content == tok.decode(tokens)
    content = choice.logprobs.content
    assert [c.token for c in content] == [tok.decode([t], skip_special=False) for t in tokens]
    scores = local_logprobs(model, prompt + tokens)[len(prompt) - 1 :]
    for step, entry in enumerate(content):
        assert abs(entry.logprob - scores[step, tokens[step]].item()) < 1e-5
        assert len(entry.top_logprobs) == 4
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Summarize "}, {"type": "text", "text": "the meeting."}]}], max_tokens=3,
        response_format={"type": "json_object"})
    assert plain.choices[0].logprobs is None and plain.object == "chat.completion"


def test_stop_strings_cut_the_text(client, local):
    _, tok = local
    free = client.completions.create(model="tiny", prompt="The team", max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text[3:5]
    assert len(stop) == 2 and stop in text
    cut = client.completions.create(model="tiny", prompt="The team", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_authentication(server):
    wrong = openai.OpenAI(base_url=server[1], api_key="sk-wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, body = status_and_body(raw_exchange(server[1], b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = status_and_body(raw_exchange(server[1], b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 200  # the health check needs no key


def test_parameter_errors_are_openai_style(client):
    cases = [
        (dict(model="tiny", prompt="x", logprobs=21), openai.BadRequestError, "logprobs"),
        (dict(model="tiny", prompt=[1, 2, 300]), openai.BadRequestError, "prompt"),
        (dict(model="tiny", prompt=[]), openai.BadRequestError, "prompt"),
        (dict(model="tiny", prompt="x", max_tokens=-1), openai.BadRequestError, "max_tokens"),
        (dict(model="tiny", prompt="x", max_tokens=9000), openai.BadRequestError, "max_tokens"),
        (dict(model="tiny", prompt="x", temperature=-1), openai.BadRequestError, "temperature"),
        (dict(model="tiny", prompt="x", n=0), openai.BadRequestError, "n"),
        (dict(model="tiny", prompt="x", extra_body={"prompt_logprobs": 99}), openai.BadRequestError, "prompt_logprobs"),
        (dict(model="tiny", prompt="x", presence_penalty=1.0), openai.BadRequestError, "presence_penalty"),
        (dict(model="gpt-4o", prompt="x"), openai.NotFoundError, "model"),
    ]
    for kwargs, error_type, param in cases:
        with pytest.raises(error_type) as error:
            client.completions.create(**kwargs)
        assert error.value.body["param"] == param, kwargs
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x"}])


def status_and_body(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def post(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {SECRET}"]
    lines += [f"{k}: {v}" for k, v in (headers if headers is not None else {"Content-Length": str(len(body))}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_survives_malformed_requests(server, client):
    process, url, _ = server
    cases = [
        (post("/v1/completions", b'{"model": "tiny", "prompt": '), 400, "not valid JSON"),
        (post("/v1/completions", b"[1, 2, 3]"), 400, "must be a JSON object"),
        (post("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}'), 400, "NaN"),
        (post("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}'), 400, "not UTF-8"),
        (post("/v1/completions", b"[" * 100_000 + b"]" * 100_000), 400, "not valid JSON"),
        (post("/v1/completions", b'{"prompt": "x"}'), 400, "'model' is required"),
        (post("/v1/completions", b'{"model": "tiny", "prompt": [true, 2]}'), 400, "'prompt' must be"),
        (post("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": "7"}'), 400, "an integer"),
        (post("/v1/completions", b"", {"Content-Length": str(10 * MAX_BODY)}), 413, "at most"),
        (post("/v1/completions", b"", {}), 411, "Content-Length"),
        (post("/v1/completions", b"", {"Content-Length": "lots"}), 400, "not an integer"),
        (post("/v1/nothing", b"{}"), 404, "unknown path"),
        (b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET.encode() + b"\r\n\r\n",
         405, "use POST"),
        (b"BREW /coffee HTTP/1.1\r\n\r\n", 501, "Unsupported method"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 garbage\r\n\r\n", 400, ""),
        (post("/v1/completions", b'{"model": "tiny"', {"Content-Length": "500"}), 408, "did not arrive"),
    ]
    for request, status, message in cases:
        got_status, body = status_and_body(raw_exchange(url, request))
        assert got_status == status, (request[:60], got_status, body)
        assert set(body["error"]) == {"message", "type", "param", "code"} and message in body["error"]["message"]
        assert process.poll() is None
    with socket.create_connection(address(url), timeout=5) as sock:  # a client that hangs up mid-body
        sock.sendall(post("/v1/completions", b'{"mod', {"Content-Length": "999"}))
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.prompt_tokens == 1
    assert process.poll() is None


def test_log_never_contains_the_key(server, client):
    client.completions.create(model="tiny", prompt="x", max_tokens=1)
    log = server[2].read_text(errors="replace")
    assert "POST /v1/completions 200" in log and SECRET not in log
