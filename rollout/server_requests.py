"""rollout.server's request side: the limits of a request, its validation (types and ranges
of every field, with the OpenAI-style 400 that names the field), the Phi-4MM chat template for
`messages`, and a request's deadline and cancellation (`RequestContext`). No HTTP and no model
here: rollout/server_service.py answers the validated requests, rollout/server.py speaks HTTP.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

MAX_LOGPROBS = 20
MAX_N = 16
MAX_PROMPTS = 64
MAX_ROWS = 256  # prompts x n per request
MAX_STOP = 4
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256


class RequestError(Exception):
    """An error answered to the client: HTTP status + OpenAI-style error body (+ Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client closed its connection while its request waited or ran: no answer is sent."""


class RequestContext:
    """What a request may still spend: a deadline and a probe for a client that has gone.
    `check()` raises ClientGone or a 503 RequestError; `cancelled()` is its boolean form for the
    sampler, asked between decode chunks."""

    def __init__(self, timeout_s: float | None = None, client_gone: Callable[[], bool] = lambda: False):
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.client_gone = client_gone

    def check(self) -> None:
        if self.client_gone():
            raise ClientGone()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RequestError(503, f"the request did not finish within this server's --request-timeout of "
                               f"{self.timeout_s:g} s; ask for fewer tokens or retry later", type="server_error",
                               code="request_timeout", retry_after=1)

    def cancelled(self) -> bool:
        return self.client_gone() or (self.deadline is not None and time.monotonic() > self.deadline)


# ---------------------------------------------------------------------------------------------
# fields


def field_value(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(400, f"'{name}' must be {what}, got {json.dumps(value)[:60]}", param=name)
    return value


def int_field(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = field_value(body, name, (int,), default, "an integer")
    if value is not None and not low <= value <= high:
        raise RequestError(400, f"'{name}' must lie in [{low}, {high}], got {value}", param=name)
    return value


def float_field(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = field_value(body, name, (int, float), default, "a number")
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RequestError(400, f"'{name}' must lie in {bracket}{low}, {high}], got {value}", param=name)
    return float(value)


def bool_field(body: dict, name: str, default: bool) -> bool:
    return field_value(body, name, (bool,), default, "true or false")


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise RequestError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them",
                           param="stop")
    return stops


def reject_unsupported(body: dict, names_and_neutral: dict[str, Any]) -> None:
    for name, neutral in names_and_neutral.items():
        value = body.get(name)
        if value is not None and value != neutral and not (isinstance(neutral, tuple) and value in neutral):
            raise RequestError(400, f"'{name}' is not supported by this server", param=name)


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """Token ids of `messages` in the Phi-4MM template: `<|role|>{content}<|end|>` each, then `<|assistant|>`."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    special = tokenizer.special_ids
    ids: list[int] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{i}] must be an object with role 'system', 'user' or 'assistant'",
                               param=f"messages[{i}]")
        ids += [special[message["role"]], *tokenizer.encode(_message_text(message.get("content"), i)), special["end"]]
    return ids + [special["assistant"]]


def _message_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"messages[{index}].content: only text parts ({{\"type\": \"text\", "
                                   "\"text\": ...}) are supported by this server", param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(400, f"messages[{index}].content must be a string or a list of text parts",
                       param=f"messages[{index}].content")


def lone_surrogate(body: dict) -> tuple[str, int] | None:
    """(top-level key, code point) of the first string anywhere in `body` that holds a lone
    surrogate (JSON's \\ud800 decodes to one), or None. Iterative: bodies nest deeply."""
    for key, value in body.items():
        stack = [key, value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                for char in item:
                    if "\ud800" <= char <= "\udfff":
                        return key, ord(char)
            elif isinstance(item, dict):
                stack += [*item.keys(), *item.values()]
            elif isinstance(item, list):
                stack += item
    return None


def reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")
