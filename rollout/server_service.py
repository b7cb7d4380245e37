"""rollout.server's model side: `ModelService` answers /v1/completions and /v1/chat/completions
(sampling with rollout.sampler, log-probabilities with rollout.scoring.score_positions, one
model call at a time under a lock, a bounded queue) and `load_service` builds it from a
checkpoint. The HTTP layer is rollout/server.py; request validation rollout/server_requests.py.
"""
from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .sampler import GenerationCancelled, SamplingParams, generate
from .server_requests import (DEFAULT_CHAT_TOKENS, DEFAULT_COMPLETION_TOKENS, MAX_LOGPROBS, MAX_N, MAX_PROMPTS,
                              MAX_ROWS, RequestContext, RequestError, bool_field, chat_prompt_ids, float_field,
                              int_field, reject_unsupported, stop_strings)
from .scoring import score_positions


FINITE_FLOOR = -9999.0  # what -inf log-probabilities are sent as
DEFAULT_MAX_QUEUE = 8  # generation requests running or waiting for the model; more get 503 + Retry-After
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # a request still waiting or generating after this gets 503
DECODE_CHUNK = 8  # decode steps between checks for a client that has gone (and for the deadline)
LOCK_POLL_S = 0.05  # how often a request waiting for the model checks the same


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
        reject_unsupported(body, {"stream": False, "suffix": "", "presence_penalty": 0, "frequency_penalty": 0,
                                   "logit_bias": {}})
        prompts, prompt_texts = self._prompts(body.get("prompt"))
        max_tokens = int_field(body, "max_tokens", DEFAULT_COMPLETION_TOKENS, 0, self.context_length)
        n = int_field(body, "n", 1, 1, MAX_N)
        if body.get("best_of") not in (None, n):
            raise RequestError(400, "'best_of' other than n is not supported by this server", param="best_of")
        echo = bool_field(body, "echo", False)
        logprobs = int_field(body, "logprobs", None, 0, MAX_LOGPROBS)
        prompt_logprobs = int_field(body, "prompt_logprobs", None, 0, MAX_LOGPROBS)
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
        reject_unsupported(body, {"stream": False, "presence_penalty": 0, "frequency_penalty": 0,
                                   "logit_bias": {}, "tools": [], "functions": []})
        format_type = (body.get("response_format") or {}).get("type", "text") if isinstance(
            body.get("response_format") or {}, dict) else None
        if format_type not in ("text", "json_object", "json_schema"):
            raise RequestError(400, "'response_format' must be {\"type\": \"text\" | \"json_object\" | "
                               "\"json_schema\"}", param="response_format")
        prompt = chat_prompt_ids(self.tokenizer, body.get("messages"))
        self._check_ids(prompt, "messages")
        limit = self.context_length
        max_tokens = int_field(body, "max_completion_tokens", None, 1, limit)
        max_tokens = int_field(body, "max_tokens", max_tokens or min(DEFAULT_CHAT_TOKENS, limit), 1, limit)
        n = int_field(body, "n", 1, 1, MAX_N)
        want_logprobs = bool_field(body, "logprobs", False)
        top_logprobs = int_field(body, "top_logprobs", None, 0, MAX_LOGPROBS)
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
        temperature = float_field(body, "temperature", 1.0, 0.0, 2.0)
        top_p = float_field(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        top_k = int_field(body, "top_k", -1, -1, self.vocab_size)
        seed = int_field(body, "seed", None, -(2**63), 2**63 - 1)
        stops = stop_strings(body)
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


def load_service(checkpoint: str | Path, *, model_name: str | None = None, device: str | None = None,
                 dtype: str | None = None, **limits) -> ModelService:
    """The checkpoint's model and tokenizer as a ModelService; `limits`: max_queue, request_timeout_s."""
    from model import load_pretrained
    from model.tokenizer import load_tokenizer

    checkpoint = Path(checkpoint)
    torch_dtype = None if dtype is None else getattr(torch, dtype)
    model = load_pretrained(checkpoint, dtype=torch_dtype, device=device)
    return ModelService(model, load_tokenizer(checkpoint), model_name or checkpoint.resolve().name, **limits)
