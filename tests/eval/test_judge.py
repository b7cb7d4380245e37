"""The LLM judge: parsing of real-looking replies, both-order pairwise preference, retries and
cache through the shared client (scripted stub), the chat path against rollout.server with the
real `openai` client, and secrecy of the API key."""
import json
import logging
import threading

import pytest

from api.client import RetriesExhaustedError
from api.retry import RetryPolicy
from eval.judge import (
    PREFER_TEMPLATE,
    SCORE_TEMPLATE,
    JudgeScore,
    OpenAIJudge,
    parse_preference,
    parse_score,
)
from rollout.server import load_service, make_server
from tests.api.http_stub import Reply, StubServer
from tests.rollout.tiny_checkpoint import build_tiny_checkpoint

SECRET = "sk-test-JUDGE-5e1d0a77c4"
KEY_ENV = "SPEECHSUM_TEST_JUDGE_KEY"
FAST_RETRY = RetryPolicy(max_attempts=6, initial_backoff_s=0.01, max_backoff_s=0.1)
SOURCE = "A: The remote should cost 25 euros. B: Agreed, and the button design is due next week {draft}."
INSTRUCTION = "Summarize the decisions as bullet points."


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


# ---------------------------------------------------------------------------------------------
# parsing

SCORE_REPLIES = [
    # (reply, (overall, hallucination, adherence), explanation or None for "the whole reply")
    ('{"explanation": "Accurate, and uses the bullets asked for.", "overall": 7, "hallucination": 0, "adherence": 7}',
     (7, 0, 7), "Accurate, and uses the bullets asked for."),
    ('```json\n{\n  "explanation": "Minor omission of the deadline.",\n  "overall": 6,\n  "hallucination": 0,\n'
     '  "adherence": 6\n}\n```', (6, 0, 6), "Minor omission of the deadline."),
    ('Here is my evaluation of the summary.\n\n{"explanation": "Adds a price that was never said.", "overall": 3, '
     '"hallucination": 1, "adherence": 6}\n\nLet me know if you need anything else.', (3, 1, 6),
     "Adds a price that was never said."),
    ('{"explanation": "Good.", "overall": "6", "hallucination": "0", "adherence": "7"}', (6, 0, 7), "Good."),
    ('{"overall": "4/7", "hallucination": "no", "adherence": "5 / 7", "explanation": "Misses the action items."}',
     (4, 0, 5), "Misses the action items."),
    ('{"explanation": "Excellent summary.", "overall": 9, "hallucination": 0, "adherence": 8}', (None, 0, None),
     "Excellent summary."),
    ('{"explanation": "The summary is empty, so it cannot be rated.", "overall": "N/A", "hallucination": "N/A", '
     '"adherence": "N/A"}', (None, None, None), "The summary is empty, so it cannot be rated."),
    ("", (None, None, None), ""),
    ('{"explanation": "Follows the requested JSON layout.", "score": 6}', (6, None, None),
     "Follows the requested JSON layout."),
    ('{"explanation": "Invents a budget figure.", "overall": 3.5, "hallucination": true, "adherence": 5}',
     (3.5, 1, 5), "Invents a budget figure."),
    ("{'explanation': 'Good coverage', 'overall': 6, 'hallucination': 0, 'adherence': 7,}", (6, 0, 7), None),
    ('Draft: {"overall": 4}\nOn reflection the point about {budget} is right.\nFinal answer: {"explanation": '
     '"Uses {budget} correctly.", "overall": 5, "hallucination": 0, "adherence": 5}', (5, 0, 5),
     "Uses {budget} correctly."),
    ('{"explanation": "x", "overall": true, "hallucination": 0, "adherence": 4}', (None, 0, 4), "x"),
    ('{"explanation": "y", "overall": -1, "hallucination": 2, "adherence": 0}', (None, None, None), "y"),
    ("Overall: 4\nHallucination: yes\nAdherence: 3\nThe summary invents a date.", (4, 1, 3), None),
    ('{"Explanation": "Fine.", "Overall": 7, "Hallucination": 0, "Adherence": 7}', (7, 0, 7), "Fine."),
    ('{"explanation": "The summary covers the decisions but', (None, None, None), None),
    ('{"explanation": "z", "overall": 5.25, "hallucination": 0, "adherence": 6}', (None, 0, 6), "z"),
    ("I'm sorry, but I can't help with evaluating this content.", (None, None, None), None),
]


@pytest.mark.parametrize("reply, expected, explanation", SCORE_REPLIES)
def test_parse_score(reply, expected, explanation):
    score = parse_score(reply)
    assert (score.overall, score.hallucination, score.adherence) == expected
    assert score.valid == (expected[0] is not None)
    assert score.explanation == (reply.strip() if explanation is None else explanation)


@pytest.mark.parametrize("reply, expected", [
    ('{"explanation": "A keeps the bullets.", "winner": "A"}', "a"),
    ('```json\n{"winner": "B", "explanation": "A invents a date."}\n```', "b"),
    ('{"explanation": "Both equally good.", "winner": "tie"}', "tie"),
    ('{"explanation": "...", "winner": "Summary A"}', "a"),
    ("Summary B repeats itself. My verdict: [[A]]", "a"),
    ('{"winner": "both are bad"}', None),
    ('{"winner": "N/A"}', None),
    ("", None),
])
def test_parse_preference(reply, expected):
    assert parse_preference(reply)[0] == expected


def test_templates_take_text_with_braces():
    text = SCORE_TEMPLATE.format(source=SOURCE, instruction=INSTRUCTION, summary="- {price}: 25 euros")
    assert SOURCE in text and "- {price}: 25 euros" in text and '{"explanation": "...", "overall": <1-7>' in text
    assert "7: fully follows the instruction" in text and "1: fails to follow" in text
    assert SOURCE in PREFER_TEMPLATE.format(source=SOURCE, instruction=INSTRUCTION, a="x", b="y")


# ---------------------------------------------------------------------------------------------
# over HTTP


def chat_reply(content):
    return {"id": "chatcmpl-stub", "object": "chat.completion", "model": "judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}}


GOOD_REPLY = '{"explanation": "Accurate.", "overall": 6, "hallucination": 0, "adherence": 7}'


def user_message(request):
    return request.body["messages"][-1]["content"]


def judge(url, **options):
    return OpenAIJudge(url, "judge", api_key_env=KEY_ENV, **options)


def test_retries_429_500_timeout_malformed_then_scores():
    script = [Reply(429), Reply(503), Reply(delay_s=3.0, body=chat_reply(GOOD_REPLY)), Reply(body=b"<html>Bad gateway")]
    with StubServer(lambda request: Reply(body=chat_reply(GOOD_REPLY)), script=script) as stub:
        scorer = judge(stub.base_url, timeout_s=0.5, retry=FAST_RETRY, seed=0)
        score = scorer.score(SOURCE, INSTRUCTION, "- 25 euros")
        assert stub.count("/chat/completions") == 5
        sent = stub.requests[-1].body
    assert score == JudgeScore(overall=6, hallucination=0, adherence=7, explanation="Accurate.")
    assert (scorer.usage.requests, scorer.usage.retries, scorer.usage.prompt_tokens) == (5, 4, 120)
    assert sent["model"] == "judge" and sent["temperature"] == 0.0
    assert SOURCE in sent["messages"][1]["content"] and "- 25 euros" in sent["messages"][1]["content"]


def test_gives_up_after_the_retry_budget():
    with StubServer(lambda request: Reply(500)) as stub:
        with pytest.raises(RetriesExhaustedError, match="all 6 attempts failed"):
            judge(stub.base_url, retry=FAST_RETRY).score(SOURCE, INSTRUCTION, "x")
        assert stub.count() == 6


def test_warm_cache_makes_zero_requests(tmp_path):
    items = [(SOURCE, INSTRUCTION, f"- summary {i}") for i in range(4)]
    with StubServer(lambda request: Reply(body=chat_reply(GOOD_REPLY))) as stub:
        first = judge(stub.base_url, cache_dir=tmp_path).score_many(items)
        assert stub.count() == 4
        again = judge(stub.base_url, cache_dir=tmp_path)
        assert again.score_many(items) == first
        assert again.prefer(SOURCE, INSTRUCTION, "x", "y") == "tie"  # not cached yet: 2 requests
        assert stub.count() == 6 and again.usage.cache_hits == 4


def test_pairwise_in_both_orders():
    """A judge that recognises the better summary wins it in both orders; a judge that always says
    "A" (position bias) gives a tie; an unusable reply gives a tie and is counted."""
    def content_judge(request):
        text = user_message(request)
        a_part = text.split("<summary_a>")[1].split("</summary_a>")[0]
        return Reply(body=chat_reply(json.dumps({"explanation": "...", "winner": "A" if "GOOD" in a_part else "B"})))

    with StubServer(content_judge) as stub:
        scorer = judge(stub.base_url, max_concurrency=1)  # one request at a time: a fixed order to inspect
        assert scorer.prefer(SOURCE, INSTRUCTION, "GOOD: 25 euros", "bad - bad - bad") == "a"
        assert scorer.prefer(SOURCE, INSTRUCTION, "bad - bad - bad", "GOOD: 25 euros") == "b"
        first, second = [user_message(r) for r in stub.requests[:2]]
        assert "<summary_a>\nGOOD: 25 euros\n</summary_a>" in first
        assert "<summary_a>\nbad - bad - bad\n</summary_a>" in second  # the swapped order
    with StubServer(lambda request: Reply(body=chat_reply('{"winner": "A"}'))) as stub:
        preference = judge(stub.base_url).prefer_many([(SOURCE, INSTRUCTION, "one", "two")])[0]
        assert (preference.winner, preference.first, preference.second) == ("tie", "a", "b")
    replies = iter([chat_reply('{"winner": "A"}'), chat_reply("I cannot decide.")])
    with StubServer(lambda request: Reply(body=next(replies))) as stub:
        scorer = judge(stub.base_url, max_concurrency=1)
        assert scorer.prefer(SOURCE, INSTRUCTION, "one", "two") == "tie"
        assert scorer.invalid_replies == 1


def test_against_rollout_server_with_the_real_client(tmp_path):
    """The chat path end to end: rollout.server (a tiny random model) answers nonsense, which the
    judge reports as an invalid score instead of guessing."""
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt")
    server = make_server(load_service(checkpoint, model_name="tiny-judge"), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        scorer = OpenAIJudge(url, "tiny-judge", api_key_env=None, max_tokens=8, json_mode=True)
        scores = scorer.score_many([(SOURCE, INSTRUCTION, "- 25 euros"), (SOURCE, INSTRUCTION, "- next week")])
        assert [s.valid for s in scores] == [False, False] and scorer.invalid_replies == 2
        assert scorer.usage.requests == 2 and scorer.usage.completion_tokens > 0
        assert scorer.prefer(SOURCE, INSTRUCTION, "a", "b") == "tie"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_api_key_never_reaches_logs_caches_or_configs(tmp_path, caplog):
    def check_key(request):
        if request.headers.get("authorization") != f"Bearer {SECRET}":
            return Reply(401)
        return Reply(body=chat_reply(GOOD_REPLY))

    leak = Reply(502, body={"error": {"message": f"proxy saw Authorization: Bearer {SECRET}"}})
    with caplog.at_level(logging.DEBUG), StubServer(check_key, script=[leak]) as stub:
        scorer = judge(stub.base_url, cache_dir=tmp_path / "cache", retry=FAST_RETRY)
        assert scorer.score(SOURCE, INSTRUCTION, "- 25 euros").overall == 6
        assert stub.count() == 2
    (tmp_path / "eval_config.json").write_text(json.dumps({"judge": scorer.config(), "usage": scorer.usage.as_dict()}))
    assert "[REDACTED]" in caplog.text
    written = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 2
    for text in [caplog.text, repr(scorer), *written]:
        assert SECRET not in text
