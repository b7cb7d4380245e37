"""Teachers: the local teacher against a brute-force forward; the OpenAI-compatible teacher over
real HTTP (rollout.server in a thread, the real `openai` client) against the local teacher; and
the shared client's retries, cache, concurrency and secrecy, seen through the teacher, against a
scripted stub (the cache's crash safety on its own: tests/api/test_cache.py).
"""
import json
import logging
import time

import pytest
import torch

from api.client import EndpointError, RetriesExhaustedError
from api.retry import RetryPolicy
from model.tokenizer import load_tokenizer
from rollout.remote_teacher import (
    CHAT_ONLY_EXPLANATION,
    OpenAICompatibleTeacher,
    ScoringUnsupportedError,
    TeacherAlignmentError,
)
from rollout.teachers import LocalTeacher
from tests.api.http_stub import Reply, StubServer
from tests.rollout.tiny_checkpoint import build_tiny_checkpoint, serving

K = 5
SECRET = "sk-test-TEACHER-3b9f0c1d2e"  # recognisable, so a leak shows up in a grep
KEY_ENV = "SPEECHSUM_TEST_TEACHER_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("teacher_ckpt"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def local(checkpoint):
    return LocalTeacher.from_pretrained(checkpoint, top_k=K)


@pytest.fixture(scope="module")
def served(checkpoint):
    """rollout.server on 127.0.0.1 (free port) in a thread, requiring the test key."""
    with serving(checkpoint, "tiny", api_key=SECRET) as url:
        yield url


@pytest.fixture(scope="module")
def batch(local):
    """Three teacher prompts of different lengths; responses of 9, 4 and 0 tokens."""
    tok = local.tokenizer
    prompts = [
        local.prompt("We agreed the remote control should cost 25 euros.", "Summarize briefly."),
        local.prompt("The marketing manager said the battery button design is next week.", "List the action items."),
        local.prompt("Budget.", "Summarize."),
    ]
    responses = [tok.encode_response("The team agreed on 25 euros."), tok.encode_response("- design"), []]
    assert [len(r) for r in responses][:2] != [0, 0] and len(responses[0]) > len(responses[1]) > 0
    return prompts, responses


def api_teacher(url, tokenizer=None, **options):
    options.setdefault("mode", "prompt_logprobs")
    return OpenAICompatibleTeacher(url, "tiny", K, tokenizer=tokenizer, api_key_env=KEY_ENV, **options)


# ---------------------------------------------------------------------------------------------
# local teacher


def test_local_teacher_equals_brute_force_forward(local, batch):
    """Batched (right padding), chunked scoring = one unpadded forward per sequence, log_softmax."""
    prompts, responses = batch
    model = local.model
    full = LocalTeacher(model, local.tokenizer, batch_size=2, chunk_tokens=3).score(prompts, responses)
    topk = LocalTeacher(model, local.tokenizer, top_k=K, batch_size=2, chunk_tokens=3).score(prompts, responses)
    hidden, hidden_mask = local.hidden_states(prompts, responses)
    assert full.logprobs.shape == (3, len(responses[0]), model.config.decoder.vocab_size)
    assert full.mask.tolist() == topk.mask.tolist() == hidden_mask.tolist()
    assert full.mask.sum(-1).tolist() == [len(r) for r in responses]
    with torch.no_grad():
        for b, (prompt, response) in enumerate(zip(prompts, responses)):
            if not response:
                assert not full.mask[b].any() and torch.isinf(topk.logprobs[b]).all()
                continue
            n = len(response)
            logits = model(torch.tensor([prompt + response]))[0, len(prompt) - 1 : -1]  # (n, V)
            expected = logits.float().log_softmax(-1)
            torch.testing.assert_close(full.logprobs[b, :n], expected, atol=1e-5, rtol=0)
            token_logprobs = expected.gather(-1, torch.tensor(response)[:, None])[:, 0]
            torch.testing.assert_close(full.token_logprobs[b, :n], token_logprobs, atol=1e-5, rtol=0)
            values, ids = expected.topk(K, dim=-1)
            assert topk.ids[b, :n].tolist() == ids.tolist()
            torch.testing.assert_close(topk.logprobs[b, :n], values, atol=1e-5, rtol=0)
            torch.testing.assert_close(topk.token_logprobs[b, :n], full.token_logprobs[b, :n], atol=1e-6, rtol=0)
            # TeacherHead form: hidden states through the LM head give the same distribution
            head = model.decoder.logits(hidden[b, :n]).float().log_softmax(-1)
            torch.testing.assert_close(head, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible teacher against rollout.server over real HTTP


@pytest.mark.parametrize("mode", ["prompt_logprobs", "echo"])
def test_api_teacher_equals_local_teacher_over_http(served, local, batch, mode):
    prompts, responses = batch
    teacher = api_teacher(served, local.tokenizer, mode=mode)
    remote, expected = teacher.score(prompts, responses), local.score(prompts, responses)
    assert remote.mask.tolist() == expected.mask.tolist()
    assert remote.ids[remote.mask].tolist() == expected.ids[expected.mask].tolist()
    torch.testing.assert_close(remote.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(remote.token_logprobs, expected.token_logprobs, atol=1e-5, rtol=0)
    usage = teacher.usage
    assert usage.requests == 2 and usage.retries == 0  # the empty response needs no request
    assert usage.prompt_tokens == len(prompts[0] + responses[0]) + len(prompts[1] + responses[1])


@pytest.mark.parametrize("form", ["strings", "vllm_token_ids"])
def test_echo_mode_without_the_id_fields(served, local, batch, form):
    """A proxy strips rollout.server's `token_ids` / `top_logprobs_by_id`: the legacy answer has only
    token strings, which the teacher maps to ids through the tokenizer (exact match), or refuses;
    or (form "vllm_token_ids") the strings are vLLM's "token_id:N" (--return-tokens-as-token-ids)."""
    import urllib.request

    def strip_ids(request):
        forward = urllib.request.Request(served + "/completions", data=json.dumps(request.body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": request.headers["authorization"]})
        with urllib.request.urlopen(forward, timeout=10) as answer:
            body = json.loads(answer.read())
        for choice in body["choices"]:
            block = choice["logprobs"]
            ids, by_id = block.pop("token_ids"), block.pop("top_logprobs_by_id")
            if form == "vllm_token_ids":
                block["tokens"] = [f"token_id:{i}" for i in ids]
                block["top_logprobs"] = [None if top is None else {f"token_id:{i}": lp for i, lp in top.items()}
                                         for top in by_id]
        return Reply(body=body)

    prompts, responses = batch
    with StubServer(strip_ids) as proxy:
        remote = api_teacher(proxy.base_url, local.tokenizer, mode="echo").score(prompts, responses)
        expected = local.score(prompts, responses)
        assert remote.ids[remote.mask].tolist() == expected.ids[expected.mask].tolist()
        torch.testing.assert_close(remote.logprobs, expected.logprobs, atol=1e-5, rtol=0)
        if form == "strings":
            with pytest.raises(TeacherAlignmentError, match=r"token strings without ids \(it ignored or refused "
                                                            r"return_tokens_as_token_ids\); pass tokenizer="):
                api_teacher(proxy.base_url, None, mode="echo").score(prompts[:1], responses[:1])
        else:
            no_tokenizer = api_teacher(proxy.base_url, None, mode="echo").score(prompts, responses)
            assert torch.equal(no_tokenizer.ids, remote.ids)


def test_wrong_key_is_refused_without_retries(served, local, batch, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    teacher = api_teacher(served, local.tokenizer)
    with pytest.raises(EndpointError, match="HTTP 401"):
        teacher.score(*[x[:1] for x in batch])
    assert teacher.usage.requests == 1 and teacher.usage.failed_calls == 1


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"environment variable {KEY_ENV} .* is not set"):
        api_teacher("http://127.0.0.1:9/v1")


# ---------------------------------------------------------------------------------------------
# a scripted stub: faults, cache, misalignment, chat-only endpoints

VOCAB = 300


def fake_prompt_logprobs(ids, k, *, drop_actual=False, alternatives=None):
    """A vLLM-format answer of a made-up teacher: at position p the top k ids are (ids[p] + j) % V
    with log-prob -0.5 (j + 1) - 0.01 p, so the prompt token itself is rank 1."""
    entries = [None]
    for p in range(1, len(ids)):
        entry = {str((ids[p] + j) % VOCAB): {"logprob": -0.5 * (j + 1) - 0.01 * p, "rank": j + 1, "decoded_token": "?"}
                 for j in range(alternatives or k)}
        if drop_actual:
            entry.pop(str(ids[p]))
        entries.append(entry)
    return {"id": "cmpl-stub", "object": "text_completion", "model": "tiny",
            "choices": [{"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": entries}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}


def vllm_like(request):
    if not request.path.endswith("/completions") or not isinstance(request.body, dict):
        return Reply(404)
    return Reply(body=fake_prompt_logprobs(request.body["prompt"], request.body["prompt_logprobs"]))


def expected_fake(prompt, response):
    """What the teacher must return for fake_prompt_logprobs: (ids (T, k), logprobs (T, k), token_logprobs (T,))."""
    positions = range(len(prompt), len(prompt) + len(response))
    ids = [[(response[t] + j) % VOCAB for j in range(K)] for t in range(len(response))]
    logprobs = [[-0.5 * (j + 1) - 0.01 * p for j in range(K)] for p in positions]
    return torch.tensor(ids), torch.tensor(logprobs), torch.tensor([-0.5 - 0.01 * p for p in positions])


PROMPTS = [[7, 20, 21, 22, 6, 5], [7, 30, 31, 6, 5]]
RESPONSES = [[40, 41, 42, 6], [50, 6]]
FAST_RETRY = RetryPolicy(max_attempts=6, initial_backoff_s=0.05, max_backoff_s=1.0, jitter=0.5)


def assert_fake_result(result, prompts=PROMPTS, responses=RESPONSES):
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, logprobs, token_logprobs = expected_fake(prompt, response)
        n = len(response)
        assert result.ids[b, :n].tolist() == ids.tolist()
        torch.testing.assert_close(result.logprobs[b, :n], logprobs.float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(result.token_logprobs[b, :n], token_logprobs.float(), atol=1e-6, rtol=0)


def test_retries_429_500_timeout_malformed_then_succeeds(tmp_path):
    script = [Reply(429, headers={"Retry-After": "0.2"}), Reply(500), Reply(delay_s=3.0, body={}),
              Reply(body=b"{not json")]
    sleeps = []
    with StubServer(vllm_like, script=script) as stub:
        teacher = api_teacher(stub.base_url, timeout_s=0.5, retry=FAST_RETRY, sleep=sleeps.append, seed=0,
                              max_concurrency=1)
        result = teacher.score(PROMPTS[:1], RESPONSES[:1])
        assert stub.count("/completions") == 5
    assert_fake_result(result, PROMPTS[:1], RESPONSES[:1])
    usage = teacher.usage
    assert (usage.requests, usage.retries, usage.failed_calls) == (5, 4, 0)
    assert len(sleeps) == 4
    assert sleeps[0] == 0.2  # Retry-After (0.2 s) is longer than the first backoff (<= 0.05 s)
    for retry, delay in enumerate(sleeps[1:], start=1):  # equal jitter: [0.5, 1] x min(1, 0.05 * 2^retry)
        ceiling = FAST_RETRY.ceiling(retry)
        assert 0.5 * ceiling <= delay <= ceiling


def test_retry_headers_as_the_openai_sdk_reads_them():
    """retry-after-ms wins over retry-after; an HTTP-date retry-after counts; x-should-retry
    overrides the status: false stops a 503 at once, true retries a 400."""
    import email.utils
    import time as clock

    date = email.utils.formatdate(clock.time() + 0.3, usegmt=True)  # whole seconds: somewhere in (0, 1.3] s
    script = [Reply(429, headers={"retry-after-ms": "250", "Retry-After": "9"}), Reply(503, headers={"Retry-After": date}),
              Reply(400, headers={"x-should-retry": "true"})]
    sleeps = []
    with StubServer(vllm_like, script=script) as stub:
        teacher = api_teacher(stub.base_url, retry=FAST_RETRY, sleep=sleeps.append, seed=0, max_concurrency=1)
        teacher.score(PROMPTS[:1], RESPONSES[:1])
        assert stub.count("/completions") == 4
    assert sleeps[0] == 0.25 and 0.0 < sleeps[1] <= 1.0 and sleeps[2] <= FAST_RETRY.ceiling(2)
    with StubServer(lambda request: Reply(503, headers={"x-should-retry": "false"})) as stub:
        teacher = api_teacher(stub.base_url, retry=FAST_RETRY, sleep=sleeps.append)
        with pytest.raises(EndpointError, match="HTTP 503"):
            teacher.score(PROMPTS[:1], RESPONSES[:1])
        assert stub.count() == 1


def test_retries_are_bounded():
    sleeps = []
    with StubServer(lambda request: Reply(503)) as stub:
        teacher = api_teacher(stub.base_url, retry=FAST_RETRY, sleep=sleeps.append)
        with pytest.raises(RetriesExhaustedError, match=r"all 6 attempts failed in \d+ s: #1 HTTP 503"):
            teacher.score(PROMPTS[:1], RESPONSES[:1])
        assert stub.count() == 6 and len(sleeps) == 5


def test_warm_cache_makes_zero_requests(tmp_path):
    with StubServer(vllm_like) as stub:
        first = api_teacher(stub.base_url, cache_dir=tmp_path / "cache").score(PROMPTS, RESPONSES)
        assert stub.count() == 2
        rerun = api_teacher(stub.base_url, cache_dir=tmp_path / "cache")
        second = rerun.score(PROMPTS, RESPONSES)
        assert stub.count() == 2  # nothing new reached the server
    assert rerun.usage.cache_hits == 2 and rerun.usage.requests == 0
    assert_fake_result(first)
    for name in ("ids", "logprobs", "token_logprobs", "mask"):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_bounded_concurrency():
    def slow(request):
        time.sleep(0.15)
        return vllm_like(request)

    prompts, responses = [PROMPTS[0]] * 9, [[40 + i, 6] for i in range(9)]
    with StubServer(slow) as stub:
        api_teacher(stub.base_url, max_concurrency=3).score(prompts, responses)
        assert stub.count() == 9
        assert stub.max_in_flight == 3


@pytest.mark.parametrize("reply, reason", [
    (Reply(404, body={"error": {"message": "This is a chat model and not supported in the v1/completions "
                                           "endpoint. Did you mean to use v1/chat/completions?"}}), "HTTP 404"),
    (Reply(400, body={"error": {"message": "Unrecognized request argument supplied: prompt_logprobs",
                                "type": "invalid_request_error"}}), "HTTP 400"),
    (Reply(body={"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "!", "logprobs": None}]}),
     "without `prompt_logprobs`"),
])
def test_chat_only_endpoint_fails_loudly(reply, reason):
    with StubServer(lambda request: reply) as stub:
        with pytest.raises(ScoringUnsupportedError) as error:
            api_teacher(stub.base_url, retry=FAST_RETRY).score(PROMPTS[:1], RESPONSES[:1])
        assert stub.count() == 1  # not retried
    message = str(error.value)
    assert reason in message and CHAT_ONLY_EXPLANATION in message
    assert "OpenAI's public chat completions API" in message and "prompt_logprobs" in message and "echo" in message


def test_a_cap_on_k_is_not_mistaken_for_a_chat_only_endpoint():
    message = "Requested prompt logprobs of 5, which is greater than max allowed: 2"  # vLLM's words
    cap = Reply(400, body={"error": {"message": message}})
    with StubServer(lambda request: cap) as stub:
        with pytest.raises(EndpointError, match="HTTP 400: Requested prompt logprobs of 5") as error:
            api_teacher(stub.base_url).score(PROMPTS[:1], RESPONSES[:1])
        assert error.value.status_code == 400 and stub.count() == 1  # an EndpointError, not ScoringUnsupportedError


@pytest.mark.parametrize("answer, match", [
    (lambda ids: fake_prompt_logprobs(ids[:-1], K), r"has 9 entries for the 10 prompt tokens"),
    (lambda ids: fake_prompt_logprobs(ids, K, drop_actual=True),
     r"prompt_logprobs\[6\]: the entry does not contain the token id"),
    (lambda ids: fake_prompt_logprobs(ids, K, alternatives=3), r"returned 3 alternatives but top_k is 5"),
    (lambda ids: {**fake_prompt_logprobs(ids, K), "choices": [{**fake_prompt_logprobs(ids, K)["choices"][0],
                                                               "prompt_token_ids": ids[:-1] + [0]}]},
     r"prompt_token_ids differ from the ids sent, first at position 9"),
])
def test_misalignment_fails_loudly(answer, match):
    with StubServer(lambda request: Reply(body=answer(request.body["prompt"]))) as stub:
        with pytest.raises(TeacherAlignmentError, match=match):
            api_teacher(stub.base_url, retry=FAST_RETRY).score(PROMPTS[:1], RESPONSES[:1])
        assert stub.count() == 1


def fake_echo(ids, k):
    """A legacy echo answer with rollout.server's id fields, from the same made-up teacher."""
    positions = range(1, len(ids))
    tops = [None] + [{str((ids[p] + j) % VOCAB): -0.5 * (j + 1) - 0.01 * p for j in range(k)} for p in positions]
    block = {"tokens": [f"t{i}" for i in ids], "token_logprobs": [None] + [-0.5 - 0.01 * p for p in positions],
             "top_logprobs": tops, "text_offset": list(range(len(ids))), "token_ids": list(ids),
             "top_logprobs_by_id": tops}
    return {"choices": [{"index": 0, "text": "", "logprobs": block, "finish_reason": "length"}]}


@pytest.mark.parametrize("corrupt, match", [
    (lambda body: body, None),
    (lambda body: body["choices"][0]["logprobs"]["token_ids"].__setitem__(7, 0) or body,
     r"logprobs position 7: token_ids has 0, but 41 was sent"),
    (lambda body: {"choices": [{"index": 0, "logprobs": {
        name: values[:-1] for name, values in body["choices"][0]["logprobs"].items()}}]},
     r"the echo covers 9 tokens but 10 were sent"),
])
def test_echo_answers_are_checked(corrupt, match):
    def answer(request):
        assert request.body["echo"] is True and request.body["max_tokens"] == 0 and request.body["logprobs"] == K
        return Reply(body=corrupt(fake_echo(request.body["prompt"], K)))

    with StubServer(answer) as stub:
        teacher = api_teacher(stub.base_url, mode="echo")
        if match is None:
            assert_fake_result(teacher.score(PROMPTS[:1], RESPONSES[:1]), PROMPTS[:1], RESPONSES[:1])
        else:
            with pytest.raises(TeacherAlignmentError, match=match):
                teacher.score(PROMPTS[:1], RESPONSES[:1])


class FakeTokenizer:
    """Decodes id i to "t<i>", or with `twins` to "t<i mod VOCAB/2>": ids i and i + VOCAB/2 then read the
    same (as a byte-fallback token and a merged token can), so a token string cannot name one id.
    Counts decode calls, to show which answers needed no string matching."""

    def __init__(self, twins=False):
        self.vocab_size, self.twins, self.decode_calls = VOCAB, twins, 0

    def decode(self, ids, skip_special=False):
        self.decode_calls += 1
        return "".join(f"t{i % (VOCAB // 2) if self.twins else i}" for i in ids)


def twin_alternatives(token_id, k):
    """A made-up teacher whose rank 2 is the twin of the token at rank 1 (same text, other id)."""
    return [token_id, (token_id + VOCAB // 2) % VOCAB] + [(token_id + j) % VOCAB for j in range(1, k - 1)]


def legacy_echo(ids, k, name, alternatives=lambda token_id, k: [(token_id + j) % VOCAB for j in range(k)]):
    """A legacy echo answer without rollout.server's id fields: every token written as `name(id)`
    (vLLM's "token_id:N", or the text a plain server writes). At position p the j-th alternative
    has log-prob -0.5 (j + 1) - 0.01 p, as in fake_prompt_logprobs; equal names keep the last value."""
    positions = range(1, len(ids))
    tops = [None] + [{name(i): -0.5 * (j + 1) - 0.01 * p for j, i in enumerate(alternatives(ids[p], k))}
                     for p in positions]
    block = {"tokens": [name(i) for i in ids], "token_logprobs": [None] + [-0.5 - 0.01 * p for p in positions],
             "top_logprobs": tops, "text_offset": list(range(len(ids)))}
    return {"choices": [{"index": 0, "text": "", "logprobs": block, "finish_reason": "length"}]}


def vllm_name(token_id):
    return f"token_id:{token_id}"


def plain_name(tokenizer):
    return lambda token_id: tokenizer.decode([token_id])


def test_echo_mode_asks_for_token_ids_and_reads_them_exactly():
    """The request carries return_tokens_as_token_ids; vLLM's "token_id:N" answer gives exactly
    those ids, the twins included, without the tokenizer. The same scores as plain strings cannot
    be read: the twins share one string (one JSON key), and string matching refuses it."""
    twins = FakeTokenizer(twins=True)
    with StubServer(lambda request: Reply(body=legacy_echo(request.body["prompt"], K, vllm_name,
                                                           twin_alternatives))) as stub:
        teacher = api_teacher(stub.base_url, twins, mode="echo")
        result = teacher.score(PROMPTS, RESPONSES)
        bodies = [request.body for request in stub.requests]
    assert len(bodies) == 2 and teacher.ask_token_ids
    for body in bodies:
        assert body["return_tokens_as_token_ids"] is True and body["echo"] is True and body["logprobs"] == K
    assert twins.decode_calls == 0
    for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        positions = range(len(prompt), len(prompt) + len(response))
        assert result.ids[b, :len(response)].tolist() == [twin_alternatives(token_id, K) for token_id in response]
        expected = torch.tensor([[-0.5 * (j + 1) - 0.01 * p for j in range(K)] for p in positions])
        torch.testing.assert_close(result.logprobs[b, :len(response)], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(result.token_logprobs[b, :len(response)], expected[:, 0], atol=1e-6, rtol=0)
    assert result.ids[0, 0, :2].tolist() == [40, 190] and twins.decode([40]) == twins.decode([190]) == "t40"

    plain = legacy_echo(PROMPTS[0] + RESPONSES[0], K, plain_name(twins), twin_alternatives)
    assert len(plain["choices"][0]["logprobs"]["top_logprobs"][6]) == K - 1  # 40 and 190 became one key
    with StubServer(lambda request: Reply(body=plain)) as stub:
        with pytest.raises(TeacherAlignmentError, match=r"logprobs position 6: cannot map the token string 't40' "
                                                        r"to one id \(ids \[40, 190\] all decode to it\)"):
            api_teacher(stub.base_url, twins, mode="echo").score(PROMPTS[:1], RESPONSES[:1])


def test_echo_mode_falls_back_to_string_matching_when_the_field_is_ignored():
    """A stock server ignores return_tokens_as_token_ids and answers plain strings: they are matched
    through the tokenizer, and the teacher keeps asking (ignoring is not refusing)."""
    tokenizer, server_side = FakeTokenizer(), FakeTokenizer()
    with StubServer(lambda request: Reply(body=legacy_echo(request.body["prompt"], K, plain_name(server_side)))) as stub:
        teacher = api_teacher(stub.base_url, tokenizer, mode="echo")
        assert_fake_result(teacher.score(PROMPTS, RESPONSES))
        assert_fake_result(teacher.score(PROMPTS, RESPONSES))
        assert [r.body["return_tokens_as_token_ids"] for r in stub.requests] == [True] * 4
    assert teacher.ask_token_ids and tokenizer.decode_calls >= VOCAB  # the strings were matched


@pytest.mark.parametrize("refusal", [
    Reply(400, body={"error": {"message": "Unrecognized request argument supplied: return_tokens_as_token_ids",
                               "type": "invalid_request_error", "param": None, "code": None}}),
    Reply(422, body={"object": "error", "type": "BadRequestError", "code": 422,  # a strict pydantic model's words
                     "message": "1 validation error for CompletionRequest\nreturn_tokens_as_token_ids\n  Extra "
                                "inputs are not permitted [type=extra_forbidden, input_value=True, input_type=bool]"}),
    Reply(422, body={"detail": [{"type": "extra_forbidden", "loc": ["body", "return_tokens_as_token_ids"],  # FastAPI's
                                 "msg": "Extra inputs are not permitted", "input": True}]}),
])
def test_echo_mode_retries_once_without_a_refused_field_and_remembers(refusal):
    tokenizer = FakeTokenizer()

    def strict(request):
        if "return_tokens_as_token_ids" in request.body:
            return refusal
        return Reply(body=legacy_echo(request.body["prompt"], K, plain_name(tokenizer)))

    with StubServer(strict) as stub:
        teacher = api_teacher(stub.base_url, tokenizer, mode="echo", retry=FAST_RETRY, max_concurrency=1)
        assert_fake_result(teacher.score(PROMPTS, RESPONSES))
        assert [("return_tokens_as_token_ids" in r.body) for r in stub.requests] == [True, False, False]
        assert not teacher.ask_token_ids
        assert_fake_result(teacher.score(PROMPTS, RESPONSES))  # for the teacher's lifetime: no new refusal
        assert [("return_tokens_as_token_ids" in r.body) for r in stub.requests] == [True] + [False] * 4
    assert teacher.usage.retries == 0 and teacher.usage.failed_calls == 1


def test_a_400_about_another_field_is_not_taken_for_a_refused_token_ids_field():
    refusal = Reply(400, body={"error": {"message": "Unrecognized request argument supplied: echo"}})
    with StubServer(lambda request: refusal) as stub:
        teacher = api_teacher(stub.base_url, FakeTokenizer(), mode="echo", retry=FAST_RETRY)
        with pytest.raises(ScoringUnsupportedError, match="HTTP 400: Unrecognized request argument supplied: echo"):
            teacher.score(PROMPTS[:1], RESPONSES[:1])
        assert stub.count() == 1 and stub.requests[0].body["return_tokens_as_token_ids"] is True
    assert teacher.ask_token_ids


def _set_top(position, key, value):
    def corrupt(body):
        body["choices"][0]["logprobs"]["top_logprobs"][position][key] = value
        return body
    return corrupt


def _set_token(position, token):
    def corrupt(body):
        body["choices"][0]["logprobs"]["tokens"][position] = token
        return body
    return corrupt


@pytest.mark.parametrize("corrupt, match", [
    (_set_top(7, "token_id:x", -0.1),
     r"logprobs position 7, top_logprobs: expected a token in vLLM's \"token_id:N\" form .* got 'token_id:x'"),
    (_set_top(8, "t3", -0.1), r"logprobs position 8, top_logprobs: expected a token in .* got 't3'"),
    (_set_token(6, "t40"), r"logprobs position 6, tokens: expected a token in .* got 't40'"),
    (_set_token(9, "token_id:-6"), r"logprobs position 9, tokens: .* got 'token_id:-6'"),
    (_set_token(7, "token_id:99"), r"logprobs position 7: the server echoed 'token_id:99' \(id 99\) where 41 was sent"),
])
def test_token_id_answers_are_checked(corrupt, match):
    """An answer in "token_id:N" form must use it at every scored position; each fault names where."""
    answer = lambda request: Reply(body=corrupt(legacy_echo(request.body["prompt"], K, vllm_name)))  # noqa: E731
    with StubServer(answer) as stub:
        with pytest.raises(TeacherAlignmentError, match=match):
            api_teacher(stub.base_url, FakeTokenizer(), mode="echo", retry=FAST_RETRY).score(PROMPTS[:1], RESPONSES[:1])
        assert stub.count() == 1


def test_api_key_never_reaches_logs_caches_or_configs(tmp_path, caplog):
    """The stub checks the key arrives, and echoes it in an error body: the log must redact it;
    cache files, repr, saved config and usage must not contain it."""
    def check_key(request):
        if request.headers.get("authorization") != f"Bearer {SECRET}":
            return Reply(401)
        return vllm_like(request)

    leak = Reply(500, body={"error": {"message": f"upstream rejected Authorization: Bearer {SECRET}"}})
    with caplog.at_level(logging.DEBUG), StubServer(check_key, script=[leak]) as stub:
        teacher = api_teacher(stub.base_url, cache_dir=tmp_path / "cache", retry=FAST_RETRY, sleep=lambda s: None)
        assert_fake_result(teacher.score(PROMPTS, RESPONSES))
        assert stub.count() == 3 and teacher.usage.retries == 1
    saved = {"teacher": teacher.config(), "usage": teacher.usage.as_dict()}
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    assert "[REDACTED]" in caplog.text
    written = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 3  # two cache entries and the config
    for text in [caplog.text, repr(teacher), str(teacher.usage), *written]:
        assert SECRET not in text
    assert teacher.config()["api_key_env"] == KEY_ENV


def test_scores_are_packed_for_the_cache_exactly_and_in_fewer_bytes():
    """What the response cache stores per scored token, top-20, before (JSON lists of the parsed
    numbers) and after (base64 int32 / float32): the same values at float32, 2.5x fewer bytes."""
    import json
    import random

    from rollout.remote_teacher import pack_scores, unpack_scores

    rng = random.Random(0)
    steps, k = 300, 20
    value = {"ids": [[rng.randrange(200064) for _ in range(k)] for _ in range(steps)],
             "logprobs": [sorted((-rng.expovariate(0.3) for _ in range(k)), reverse=True) for _ in range(steps)],
             "token_logprobs": [-rng.expovariate(0.5) for _ in range(steps)]}
    ids, logprobs, token_logprobs = unpack_scores(json.loads(json.dumps(pack_scores(value))))
    assert ids.tolist() == value["ids"] and ids.dtype == torch.long
    torch.testing.assert_close(logprobs, torch.tensor(value["logprobs"]).float(), rtol=0, atol=0)
    torch.testing.assert_close(token_logprobs, torch.tensor(value["token_logprobs"]).float(), rtol=0, atol=0)
    before = len(json.dumps(value)) / steps
    after = len(json.dumps(pack_scores(value))) / steps
    assert 500 < before < 600 and after < 225 and before / after > 2.4, (before, after)
