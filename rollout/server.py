"""An OpenAI-compatible HTTP server over a local model of this project (teacher or student).

    python -m rollout.server --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--api-key-env VAR]
                             [--served-model-name NAME] [--device cpu] [--dtype float32]

The model is served in text mode: prompts are text or token ids, never audio (a SpeechLM with a
speech encoder answers from its decoder; an audio placeholder id in a token prompt is embedded as
a plain token). That is what a teacher or judge reading transcripts needs.

Standard library only (http.server); the model runs on one thread at a time (a lock around
every model call, see Load below), connections are served by ThreadingHTTPServer. DIR is a
checkpoint of `model.save_pretrained` plus its tokenizer (`tokenizer.json` or `tokenizer.model`
next to config.json; `model.tokenizer.load_tokenizer(DIR)` reads either). `--port 0` picks a free port;
the first line on stdout is `speechsum server: serving NAME at http://HOST:PORT/v1`. With
`--api-key-env VAR` every /v1 request must send `Authorization: Bearer $VAR` (the value is
read from the environment, never logged). The server binds loopback unless told otherwise.

Endpoints (request and response shapes follow OpenAI's API; extensions follow vLLM):
* GET /v1/models, GET /v1/models/{name}, GET /health.
* POST /v1/completions: `prompt` as a string, a list of strings, a list of token ids or a list of
  lists of token ids; `max_tokens` (default 16, 0 allowed: no generation), `temperature`
  (0 = greedy), `top_p`, `top_k` (vLLM extension; -1 or 0 = off), `n`, `seed`, `stop` (strings;
  the text is cut before the first stop string, the tokens after the one that completes it),
  `stop_token_ids` (extension), `echo`, `logprobs` (0-20), `prompt_logprobs` (0-20, vLLM
  extension, via extra_body). EOS ids of the tokenizer always stop.
  - `logprobs`: the legacy format, `choices[i].logprobs` = {tokens, token_logprobs, top_logprobs
    (dicts token string -> logprob: the top n plus the chosen token, as vLLM), text_offset}, over
    the prompt too when `echo` (first entry null). Non-standard extras, added because token
    strings are ambiguous: `token_ids` (the id of every token) and `top_logprobs_by_id` (the
    same dicts keyed by token id, as a string).
  - `prompt_logprobs`: vLLM's format, `choices[i].prompt_logprobs` = [null, {token_id (string):
    {"logprob", "rank", "decoded_token"}}, ...] with the top n plus the prompt token at each
    position (rank 1-based over the whole vocabulary), and `choices[i].prompt_token_ids`.
* POST /v1/chat/completions: `messages` (roles system / user / assistant, text content as a string
  or a list of {"type": "text"} parts) through the Phi-4MM chat template
  (`<|role|>{content}<|end|>` per message, then `<|assistant|>`; one user turn gives exactly
  `tokenizer.build_chat_prompt`), `max_tokens` / `max_completion_tokens` (default 256),
  `temperature`, `top_p`, `n`, `seed`, `stop`, `logprobs` (bool) and `top_logprobs` (0-20) in
  the chat format (`choices[i].logprobs.content[j]` = {token, logprob, bytes, top_logprobs}).
  `response_format` is accepted and not enforced.
Log-probabilities are those of the raw model (temperature 1, no top-k/top-p), as vLLM reports
them, from one teacher-forced forward over prompt + completion; -inf is sent as -9999.0 (JSON
has no infinity). Not supported (an error says so): streaming, tools, audio or image content,
penalties, logit_bias, suffix, best_of != n.

Robustness: bodies need a Content-Length (411 otherwise) no larger than `--max-body-bytes`
(413, refused before reading); a client that stalls mid-request is dropped after
`--read-timeout` seconds (408); malformed JSON, wrong types and out-of-range values get 400
with an OpenAI-style body {"error": {"message", "type", "param", "code"}}; unknown paths 404,
wrong methods 405, unknown model 404, a missing or wrong key 401; a lone surrogate anywhere in
the body, or a stop id outside the vocabulary, is a 400 too. An unexpected exception while
handling a request is logged and answered with 500; the server keeps serving.

Load: at most `--max-queue` (8) generation requests run or wait for the model at once; one
more is answered 503 with `Retry-After: 1` at once, so no request queues behind more than
that. A request whose client closes its connection is cancelled, while it waits for the model
or within one decode chunk (8 tokens) of generating, and gets no answer; one still waiting or
generating after `--request-timeout` seconds (600; 0: none) is cancelled with a 503.
"""
from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import select
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import torch

from model.errors import report_error

from .sampler import GenerationCancelled, SamplingParams, generate
from .teachers import score_positions

logger = logging.getLogger("rollout.server")

MAX_LOGPROBS = 20
MAX_N = 16
MAX_PROMPTS = 64
MAX_ROWS = 256  # prompts x n per request
MAX_STOP = 4
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256
FINITE_FLOOR = -9999.0  # what -inf log-probabilities are sent as
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_QUEUE = 8  # generation requests running or waiting for the model; more get 503 + Retry-After
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # a request still waiting or generating after this gets 503
DECODE_CHUNK = 8  # decode steps between checks for a client that has gone (and for the deadline)
LOCK_POLL_S = 0.05  # how often a request waiting for the model checks the same


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
# request validation


def _field(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(400, f"'{name}' must be {what}, got {json.dumps(value)[:60]}", param=name)
    return value


def _int(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = _field(body, name, (int,), default, "an integer")
    if value is not None and not low <= value <= high:
        raise RequestError(400, f"'{name}' must lie in [{low}, {high}], got {value}", param=name)
    return value


def _float(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = _field(body, name, (int, float), default, "a number")
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RequestError(400, f"'{name}' must lie in {bracket}{low}, {high}], got {value}", param=name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    return _field(body, name, (bool,), default, "true or false")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise RequestError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them",
                           param="stop")
    return stops


def _reject_unsupported(body: dict, names_and_neutral: dict[str, Any]) -> None:
    for name, neutral in names_and_neutral.items():
        value = body.get(name)
        if value is not None and value != neutral and not (isinstance(neutral, tuple) and value in neutral):
            raise RequestError(400, f"'{name}' is not supported by this server", param=name)


# ---------------------------------------------------------------------------------------------
# the model behind the endpoints


@dataclass
class Choice:
    prompt_index: int
    prompt: list[int]
    tokens: list[int]  # completion tokens kept (after stop handling)
    text: str
    finish_reason: str


class ModelService:
    """The model, its tokenizer and the endpoint logic; every model call holds `self.lock`."""

    def __init__(self, model, tokenizer, model_name: str, *, max_queue: int = DEFAULT_MAX_QUEUE,
                 request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.lock = threading.Lock()
        self.max_queue = max_queue  # generation requests admitted at once: the one running + those waiting
        self.request_timeout_s = request_timeout_s
        self._admitted = 0
        self._admission_lock = threading.Lock()
        self.created = int(time.time())
        config = model.decoder.config
        self.vocab_size = config.vocab_size
        self.context_length = config.max_position_embeddings
        self.eos_token_ids = tuple(dict.fromkeys((*tokenizer.eos_token_ids, *config.eos_token_ids)))

    # ------------------------------------------------------------------ endpoints

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "speechsum",
                "max_model_len": self.context_length}

    def context(self, client_gone: Callable[[], bool] = lambda: False) -> RequestContext:
        return RequestContext(self.request_timeout_s, client_gone)

    @contextlib.contextmanager
    def admitted(self):
        """A place among the `max_queue` requests that may wait for or hold the model; a full
        queue is answered 503 with Retry-After at once, so no request waits behind more."""
        with self._admission_lock:
            if self._admitted >= self.max_queue:
                raise RequestError(503, f"the server is busy: {self._admitted} requests are running or queued (its "
                                   f"--max-queue); retry later", type="server_error", code="queue_full",
                                   retry_after=1)
            self._admitted += 1
        try:
            yield
        finally:
            with self._admission_lock:
                self._admitted -= 1

    @contextlib.contextmanager
    def model_turn(self, context: RequestContext):
        """The model lock, given up while waiting if the client goes or the deadline passes."""
        while not self.lock.acquire(timeout=LOCK_POLL_S):
            context.check()
        try:
            yield
        finally:
            self.lock.release()

    def completions(self, body: dict, context: RequestContext | None = None) -> dict:
        context = context or self.context()
        self._check_model(body)
        _reject_unsupported(body, {"stream": False, "suffix": "", "presence_penalty": 0, "frequency_penalty": 0,
                                   "logit_bias": {}})
        prompts, prompt_texts = self._prompts(body.get("prompt"))
        max_tokens = _int(body, "max_tokens", DEFAULT_COMPLETION_TOKENS, 0, self.context_length)
        n = _int(body, "n", 1, 1, MAX_N)
        if body.get("best_of") not in (None, n):
            raise RequestError(400, "'best_of' other than n is not supported by this server", param="best_of")
        echo = _bool(body, "echo", False)
        logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        prompt_logprobs = _int(body, "prompt_logprobs", None, 0, MAX_LOGPROBS)
        with self.admitted():
            choices = self._run(body, prompts, n, max_tokens, context)
            scores = self._scores(choices, [logprobs, prompt_logprobs], prompt_logprobs is not None, context)
        out = []
        for index, (choice, scored) in enumerate(zip(choices, scores)):
            prompt_text = prompt_texts[choice.prompt_index]
            text = (prompt_text + choice.text) if echo else choice.text
            entry: dict[str, Any] = {"index": index, "text": text, "logprobs": None,
                                     "finish_reason": choice.finish_reason}
            if logprobs is not None:
                entry["logprobs"] = self._legacy_logprobs(choice, scored, logprobs, echo)
            if prompt_logprobs is not None:
                entry["prompt_logprobs"] = self._prompt_logprobs(choice, scored, prompt_logprobs)
                entry["prompt_token_ids"] = choice.prompt
            out.append(entry)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": out, "usage": self._usage(prompts, choices)}

    def chat_completions(self, body: dict, context: RequestContext | None = None) -> dict:
        context = context or self.context()
        self._check_model(body)
        _reject_unsupported(body, {"stream": False, "presence_penalty": 0, "frequency_penalty": 0,
                                   "logit_bias": {}, "tools": [], "functions": []})
        format_type = (body.get("response_format") or {}).get("type", "text") if isinstance(
            body.get("response_format") or {}, dict) else None
        if format_type not in ("text", "json_object", "json_schema"):
            raise RequestError(400, "'response_format' must be {\"type\": \"text\" | \"json_object\" | "
                               "\"json_schema\"}", param="response_format")
        prompt = chat_prompt_ids(self.tokenizer, body.get("messages"))
        self._check_ids(prompt, "messages")
        limit = self.context_length
        max_tokens = _int(body, "max_completion_tokens", None, 1, limit)
        max_tokens = _int(body, "max_tokens", max_tokens or min(DEFAULT_CHAT_TOKENS, limit), 1, limit)
        n = _int(body, "n", 1, 1, MAX_N)
        want_logprobs = _bool(body, "logprobs", False)
        top_logprobs = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top_logprobs is not None and not want_logprobs:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        with self.admitted():
            choices = self._run(body, [prompt], n, max_tokens, context)
            scores = self._scores(choices, [(top_logprobs or 0) if want_logprobs else None], False, context)
        out = []
        for index, (choice, scored) in enumerate(zip(choices, scores)):
            entry = {"index": index, "message": {"role": "assistant", "content": choice.text}, "logprobs": None,
                     "finish_reason": choice.finish_reason}
            if want_logprobs:
                entry["logprobs"] = {"content": self._chat_logprobs(choice, scored, top_logprobs or 0)}
            out.append(entry)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": out, "usage": self._usage([prompt], choices)}

    # ------------------------------------------------------------------ inputs

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str):
            raise RequestError(400, "'model' is required: a string (see GET /v1/models)", param="model")
        if name != self.model_name:
            raise RequestError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                               param="model", code="model_not_found")

    def _check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise RequestError(400, f"'{param}' encodes to no tokens", param=param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(400, f"token ids {bad[:5]} in '{param}' are outside the vocabulary "
                               f"[0, {self.vocab_size})", param=param)

    def _prompts(self, prompt) -> tuple[list[list[int]], list[str]]:
        """`prompt` in any of the four OpenAI forms -> token ids and echo texts, one per prompt."""
        if isinstance(prompt, str):
            items = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            items = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            items = list(prompt)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            items = list(prompt)
        else:
            raise RequestError(400, "'prompt' must be a non-empty string, list of strings, list of token ids or "
                               "list of lists of token ids", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise RequestError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
        ids, texts = [], []
        for item in items:
            if isinstance(item, str):
                item_ids, text = self.tokenizer.encode(item), item
            else:
                item_ids, text = list(item), None
            self._check_ids(item_ids, "prompt")
            ids.append(item_ids)
            texts.append(text if text is not None else self.tokenizer.decode(item_ids, skip_special=False))
        return ids, texts

    # ------------------------------------------------------------------ generation and scoring

    def _run(self, body: dict, prompts: list[list[int]], n: int, max_tokens: int,
             context: RequestContext) -> list[Choice]:
        temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _float(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        top_k = _int(body, "top_k", -1, -1, self.vocab_size)
        seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
        stops = _stop(body)
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
            raise RequestError(400, "'stop_token_ids' must be a list of token ids", param="stop_token_ids")
        outside = [t for t in stop_ids if not 0 <= t < self.vocab_size]
        if outside:
            raise RequestError(400, f"'stop_token_ids' {outside[:5]} are outside the vocabulary [0, "
                               f"{self.vocab_size})", param="stop_token_ids")
        if len(prompts) * n > MAX_ROWS:
            raise RequestError(400, f"prompts x n must be at most {MAX_ROWS}, got {len(prompts) * n}", param="n")
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.context_length:
            raise RequestError(400, f"This model's maximum context length is {self.context_length} tokens; the "
                               f"request asks for {longest} prompt + {max_tokens} completion tokens",
                               param="max_tokens")
        if max_tokens == 0:
            return [Choice(i, p, [], "", "length") for i, p in enumerate(prompts) for _ in range(n)]
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
            eos_token_ids=tuple(dict.fromkeys((*self.eos_token_ids, *stop_ids))), num_samples=n,
            seed=None if seed is None else seed % (2**31),
        )
        device = self.model.decoder.embed_tokens.weight.device
        with self.model_turn(context):
            context.check()
            try:
                rollout = generate(self.model, [torch.tensor(p, device=device) for p in prompts], params,
                                   stop_check_interval=DECODE_CHUNK, cancelled=context.cancelled)
            except GenerationCancelled:
                context.check()  # says why: the client went, or the deadline passed
                raise
        tokens, lengths = rollout.tokens.tolist(), rollout.lengths.tolist()
        stop_set = set(params.eos_token_ids)
        choices = []
        for row, prompt_index in enumerate(rollout.prompt_index.tolist()):
            completion = tokens[row][: lengths[row]]
            finish = "stop" if completion and completion[-1] in stop_set else "length"
            completion, text, hit = self._apply_stop(completion, stops)
            choices.append(Choice(prompt_index, prompts[prompt_index], completion, text, "stop" if hit else finish))
        return choices

    def _apply_stop(self, completion: list[int], stops: list[str]) -> tuple[list[int], str, bool]:
        text = self.tokenizer.decode(completion)
        cuts = [text.find(s) for s in stops if s in text]
        if not cuts:
            return completion, text, False
        cut = min(cuts)
        for end in range(1, len(completion) + 1):  # the shortest prefix whose text reaches a stop string
            prefix = self.tokenizer.decode(completion[:end])
            if any(s in prefix for s in stops):
                return completion[:end], text[:cut], True
        return completion, text[:cut], True

    def _scores(self, choices: list[Choice], top_ns: list[int | None], ranks: bool, context: RequestContext):
        """One teacher-forced pass over prompt + completion of every choice, if any log-probs are wanted."""
        wanted = [k for k in top_ns if k is not None]
        if not wanted:
            return [None] * len(choices)
        sequences = [c.prompt + c.tokens for c in choices]
        scorable = [b for b, s in enumerate(sequences) if len(s) > 1]
        results = [None] * len(choices)
        if scorable:
            with self.model_turn(context):
                context.check()
                scored = score_positions(self.model, [sequences[b] for b in scorable], [1] * len(scorable),
                                         top_k=max(wanted), ranks=ranks)
            for i, b in enumerate(scorable):
                steps = len(sequences[b]) - 1
                results[b] = _RowScores(
                    token_logprobs=scored.token_logprobs[i, :steps].tolist(),
                    top_ids=scored.topk_ids[i, :steps].tolist(),
                    top_logprobs=scored.topk_logprobs[i, :steps].tolist(),
                    ranks=scored.ranks[i, :steps].tolist() if ranks else None,
                )
        return results

    # ------------------------------------------------------------------ output formats

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special=False)

    def _legacy_logprobs(self, choice: Choice, scored, n: int, echo: bool) -> dict:
        """OpenAI legacy completions logprobs (+ token_ids, top_logprobs_by_id) for the echoed prompt
        (if echo) and the completion. Position p of prompt + completion is scored by entry p - 1."""
        sequence = choice.prompt + choice.tokens
        first = 0 if echo else len(choice.prompt)
        block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [], "token_ids": [],
                 "top_logprobs_by_id": []}
        offset = 0
        for position in range(first, len(sequence)):
            token_id = sequence[position]
            piece = self._piece(token_id)
            block["tokens"].append(piece)
            block["token_ids"].append(token_id)
            block["text_offset"].append(offset)
            offset += len(piece)
            if position == 0:
                for key in ("token_logprobs", "top_logprobs", "top_logprobs_by_id"):
                    block[key].append(None)
                continue
            step = position - 1
            token_lp = _finite(scored.token_logprobs[step])
            by_id = {str(i): _finite(lp) for i, lp in zip(scored.top_ids[step][:n], scored.top_logprobs[step][:n])}
            by_id[str(token_id)] = token_lp
            block["token_logprobs"].append(token_lp)
            block["top_logprobs_by_id"].append(by_id)
            block["top_logprobs"].append({self._piece(int(i)): lp for i, lp in by_id.items()})
        return block

    def _prompt_logprobs(self, choice: Choice, scored, n: int) -> list:
        """vLLM's prompt_logprobs: [None, {id: {logprob, rank, decoded_token}}, ...] over the prompt."""
        entries: list = [None]
        for position in range(1, len(choice.prompt)):
            step = position - 1
            entry = {}
            for rank, (token_id, lp) in enumerate(zip(scored.top_ids[step][:n], scored.top_logprobs[step][:n]), 1):
                entry[str(token_id)] = {"logprob": _finite(lp), "rank": rank, "decoded_token": self._piece(token_id)}
            actual = choice.prompt[position]
            entry[str(actual)] = {"logprob": _finite(scored.token_logprobs[step]), "rank": scored.ranks[step],
                                  "decoded_token": self._piece(actual)}
            entries.append(entry)
        return entries

    def _chat_logprobs(self, choice: Choice, scored, n: int) -> list:
        content = []
        for i, token_id in enumerate(choice.tokens):
            step = len(choice.prompt) + i - 1
            piece = self._piece(token_id)
            top = [{"token": self._piece(t), "logprob": _finite(lp), "bytes": list(self._piece(t).encode())}
                   for t, lp in zip(scored.top_ids[step][:n], scored.top_logprobs[step][:n])]
            content.append({"token": piece, "logprob": _finite(scored.token_logprobs[step]),
                            "bytes": list(piece.encode()), "top_logprobs": top})
        return content

    @staticmethod
    def _usage(prompts: list[list[int]], choices: list[Choice]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class _RowScores:
    token_logprobs: list[float]  # [steps] log p(seq[p + 1] | seq[:p + 1])
    top_ids: list[list[int]]  # [steps][k]
    top_logprobs: list[list[float]]  # [steps][k]
    ranks: list[int] | None  # [steps]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: float) -> float:
    return value if value > FINITE_FLOOR else FINITE_FLOOR


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


# ---------------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    """Routing, auth, body limits and error bodies; the endpoints live in ModelService."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # answer garbage with a status line, not an HTTP/0.9 bare body
    server_version = "speechsum-server"
    error_content_type = "application/json"

    # set per server by make_server
    service: ModelService
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout = DEFAULT_READ_TIMEOUT_S  # socket timeout for every read and write (StreamRequestHandler)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, oversize headers, ...) as OpenAI-style JSON."""
        self.close_connection = True
        self._reply(code, RequestError(code, message or explain or self.responses.get(code, ("error",))[0]).body())

    def log_request(self, code="-", size="-"):
        pass  # one line per request is written by _dispatch, without headers or query

    def log_message(self, format, *args):
        logger.info("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        started = time.monotonic()
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        status, retry_after = 500, None
        try:
            status, payload = self._route(method, path)
        except ClientGone:
            self.close_connection = True
            logger.info("%s %s cancelled: the client closed the connection (%.3fs)", method, path,
                        time.monotonic() - started)
            return
        except RequestError as error:
            status, payload, retry_after = error.status, error.body(), error.retry_after
        except Exception:  # a bug must not take the server down: log it, answer 500
            logger.exception("internal error on %s %s", method, path)
            status, payload = 500, RequestError(500, "internal server error; see the server log",
                                                type="server_error").body()
        try:
            self._reply(status, payload, allow="POST" if path.endswith("completions") else "GET",
                        retry_after=retry_after)
        finally:
            logger.info("%s %s %d %.3fs", method, path, status, time.monotonic() - started)

    def _route(self, method: str, path: str) -> tuple[int, dict]:
        if path == "/health":
            return self._only(method, "GET") or (200, {"status": "ok"})
        if not (path == "/v1" or path.startswith("/v1/")):
            raise RequestError(404, f"unknown path {path}; this server has /v1/models, /v1/completions, "
                               "/v1/chat/completions and /health", code="not_found")
        self._authenticate()
        service = self.service
        if path == "/v1/models":
            return self._only(method, "GET") or (200, service.models())
        if path.startswith("/v1/models/"):
            self._only(method, "GET")
            if path[len("/v1/models/"):] != service.model_name:
                raise RequestError(404, f"The model '{path[len('/v1/models/'):]}' does not exist",
                                   code="model_not_found")
            return 200, service.model_card()
        if path in ("/v1/completions", "/v1/chat/completions"):
            self._only(method, "POST")
            body = self._read_json()
            context = service.context(self._client_gone)
            if path == "/v1/completions":
                return 200, service.completions(body, context)
            return 200, service.chat_completions(body, context)
        raise RequestError(404, f"unknown path {path}", code="not_found")

    def _client_gone(self) -> bool:
        """The peer closed the connection: its socket reads as end-of-file (a pipelined next
        request would read as data, not as gone)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            self.close_connection = True
            raise RequestError(405, f"method {method} is not allowed here; use {allowed}", code="method_not_allowed")

    def _authenticate(self) -> None:
        if self.api_key is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers.get("Content-Length") is None:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required (chunked bodies are not accepted)")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            self.close_connection = True
            raise RequestError(400, "Content-Length is not an integer") from None
        if length < 0:
            self.close_connection = True
            raise RequestError(400, "Content-Length is negative")
        if length > self.max_body_bytes:
            self.close_connection = True
            raise RequestError(413, f"the body has {length} bytes; this server accepts at most {self.max_body_bytes}",
                               code="request_too_large")
        try:
            raw = self.rfile.read(length)
        except (TimeoutError, OSError):
            self.close_connection = True
            raise RequestError(408, f"the body did not arrive within {self.timeout} s", code="timeout") from None
        if len(raw) != length:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(raw)} of {length} bytes")
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as error:
            raise RequestError(400, f"the body is not UTF-8 ({error.reason} at byte {error.start})") from None
        except json.JSONDecodeError as error:
            raise RequestError(400, f"the body is not valid JSON: {error.msg} at line {error.lineno} column "
                               f"{error.colno}") from None
        except (ValueError, RecursionError) as error:
            raise RequestError(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
        where = _lone_surrogate(body)
        if where is not None:
            raise RequestError(400, f"'{where[0]}' holds a lone surrogate (\\u{where[1]:04x}), which is not a "
                               "character and cannot be tokenized; send valid Unicode text", param=where[0])
        return body

    def _reply(self, status: int, payload: dict, allow: str | None = None, retry_after: int | None = None) -> None:
        data = json.dumps(payload, allow_nan=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 405 and allow:
                self.send_header("Allow", allow)
            if retry_after is not None:
                self.send_header("Retry-After", str(retry_after))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client went away; nothing else to do


def _lone_surrogate(body: dict) -> tuple[str, int] | None:
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


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request, client_address):
        """Errors outside a handler's own try (a client that hangs up mid-request): log, keep serving."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logger.info("%s: connection dropped (%s)", client_address[0], type(error).__name__)
        else:
            logger.exception("error while serving %s", client_address[0])


def make_server(service: ModelService, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> Server:
    """A bound (not yet serving) server; call `serve_forever()` on it, `shutdown()` from another thread."""
    handler = type("BoundHandler", (Handler,), {"service": service, "api_key": api_key,
                                                "max_body_bytes": max_body_bytes, "timeout": read_timeout_s})
    return Server((host, port), handler)


def load_service(checkpoint: str | Path, *, model_name: str | None = None, device: str | None = None,
                 dtype: str | None = None, **limits) -> ModelService:
    """The checkpoint's model and tokenizer as a ModelService; `limits`: max_queue, request_timeout_s."""
    from model import load_pretrained
    from model.tokenizer import load_tokenizer

    checkpoint = Path(checkpoint)
    torch_dtype = None if dtype is None else getattr(torch, dtype)
    model = load_pretrained(checkpoint, dtype=torch_dtype, device=device)
    return ModelService(model, load_tokenizer(checkpoint), model_name or checkpoint.resolve().name, **limits)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollout.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (config.json, *.safetensors, tokenizer.json or tokenizer.model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed on stdout)")
    parser.add_argument("--api-key-env", default=None,
                        help="name of an environment variable holding the key clients must send as a Bearer token")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: DIR's name)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
                        help="seconds a client may stall while sending a request")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="generation requests running or waiting at once; more are answered 503 + Retry-After")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                        help="seconds a request may wait and generate before it is cancelled (503); 0: no limit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.max_queue < 1 or args.request_timeout < 0:
        parser.error(f"--max-queue must be >= 1 and --request-timeout >= 0, got {args.max_queue} and "
                     f"{args.request_timeout}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    if not _is_loopback(args.host) and api_key is None:
        logger.warning("binding %s (not loopback) without --api-key-env: anyone who can reach it can use the model",
                       args.host)
    from model.checkpoint import CheckpointError

    try:
        service = load_service(args.checkpoint, model_name=args.served_model_name, device=args.device,
                               dtype=args.dtype, max_queue=args.max_queue,
                               request_timeout_s=args.request_timeout or None)
    except (CheckpointError, OSError) as error:  # a missing or damaged checkpoint: one line, no traceback
        return report_error("rollout.server", CheckpointError(f"--checkpoint {args.checkpoint}: {error}"))
    server = make_server(service, args.host, args.port, api_key=api_key, max_body_bytes=args.max_body_bytes,
                         read_timeout_s=args.read_timeout)
    host, port = server.server_address[:2]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM -> KeyboardInterrupt -> clean exit
    print(f"speechsum server: serving {service.model_name} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
