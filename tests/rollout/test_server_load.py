"""The server serves the clients that are still there: abandoned requests are cancelled, a
bounded queue answers 503 with Retry-After when full, a deadline ends work nobody will wait
for, and inputs that used to give a 500 (a lone surrogate, a stop id of 10**30) are 400s.

A "big" request is n=16 samples of up to 3000 tokens at temperature 1 with seed 0 from the tiny
random checkpoint: its longest sample runs about 940 tokens before an EOS, about 10 s of
decoding on one CPU thread, so a small request queued behind two of them would wait about 20 s
if nothing were cancelled. The bounds below (5 s) sit far from both that and from one decode
chunk (8 tokens, milliseconds).
"""
import json
import re
import socket
import time

import openai
import pytest

from tests.rollout.server_process import address, raw_exchange, running_server
from tests.rollout.tiny_checkpoint import build_tiny_checkpoint

BIG = {"model": "tiny", "prompt": "the meeting budget", "n": 16, "max_tokens": 3000, "temperature": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("load_ckpt"))


def post(url: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def open_request(url: str, body: dict) -> socket.socket:
    sock = socket.create_connection(address(url), timeout=30)
    sock.sendall(post(url, body))
    return sock


def test_abandoned_requests_are_cancelled_and_a_full_queue_answers_503(checkpoint, tmp_path):
    log_path = tmp_path / "server.log"
    with running_server(checkpoint, log_path, "--max-queue", "2", "--log-level", "INFO") as (_, url):
        first, second = open_request(url, BIG), open_request(url, BIG)  # one runs, one waits
        time.sleep(1.0)
        full = raw_exchange(url, post(url, {"model": "tiny", "prompt": "the", "max_tokens": 2}))
        head = full.split(b"\r\n\r\n")[0].decode()
        assert head.startswith("HTTP/1.1 503") and "Retry-After: 1" in head, full[:600]
        assert b'"code": "queue_full"' in full
        first.close()
        second.close()
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        started = time.monotonic()
        answer = client.completions.create(model="tiny", prompt="the meeting", max_tokens=4, temperature=0.0)
        waited = time.monotonic() - started
        assert answer.choices[0].text is not None and waited < 5.0, waited
        time.sleep(0.5)
    text = log_path.read_text()
    cancelled = re.findall(r"POST /v1/completions cancelled: the client closed the connection \((\d+\.\d+)s\)", text)
    assert len(cancelled) == 2, text[-3000:]
    # both hung up about 1.1 s after sending (the sleep and the 503 exchange); a decode chunk is
    # milliseconds, running to the end ~10 s each
    assert all(float(seconds) < 2.0 for seconds in cancelled), cancelled


def test_a_request_past_its_deadline_gets_503_and_the_server_goes_on(checkpoint, tmp_path):
    log_path = tmp_path / "server.log"
    with running_server(checkpoint, log_path, "--request-timeout", "1") as (_, url):
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as error:
            client.completions.create(**BIG)
        assert time.monotonic() - started < 4.0
        assert error.value.status_code == 503 and "--request-timeout of 1 s" in str(error.value)
        assert error.value.response.headers["Retry-After"] == "1"
        small = client.completions.create(model="tiny", prompt="the", max_tokens=2, temperature=0.0)
        assert small.choices[0].finish_reason in ("length", "stop")


def test_inputs_that_used_to_crash_a_handler_are_400s(checkpoint, tmp_path):
    log_path = tmp_path / "server.log"
    with running_server(checkpoint, log_path) as (_, url):
        # json.dumps writes the lone surrogate as the escape \ud800, which the server decodes back to it
        surrogate = raw_exchange(url, post(url, {"model": "tiny", "prompt": "Summarize \ud800.", "max_tokens": 2}))
        assert surrogate.startswith(b"HTTP/1.1 400"), surrogate[:300]
        assert b"'prompt' holds a lone surrogate (\\\\ud800)" in surrogate
        huge = raw_exchange(url, post(url, {"model": "tiny", "prompt": "the", "max_tokens": 2,
                                            "stop_token_ids": [10**30]}))
        assert huge.startswith(b"HTTP/1.1 400") and b"outside the vocabulary" in huge, huge[:300]
    assert "internal error" not in log_path.read_text()
