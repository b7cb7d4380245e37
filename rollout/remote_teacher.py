"""The API teacher for on-policy KD (rollout/teachers.py has the protocol and the local one):
OpenAICompatibleTeacher, a remote model over the OpenAI-compatible `/v1/completions` API.
A hard fact decides the design: OpenAI's chat completions API cannot score a given continuation.
It returns log-probabilities only for tokens the model generates itself (top_logprobs <= 20),
with no echo; the legacy `/v1/completions` had `echo` + `logprobs` (<= 5) but serves only old
models. So GPT-4o cannot score the student's tokens through the public API. Token-level KD on the
student's tokens needs an endpoint that scores a *supplied* sequence, given as token ids (the
vocabularies must match; Phi-4-mini and GPT-4o share the o200k-based vocabulary). Two forms:

* mode "prompt_logprobs" (default; vLLM, as verl's teacher loop does): POST /v1/completions
  {"prompt": prompt + response ids, "max_tokens": 1, "prompt_logprobs": k}. vLLM answers
  `choices[0].prompt_logprobs`: one entry per prompt position, the first null, each a dict
  token_id (string) -> {"logprob", "rank", "decoded_token"} holding the top k *and* the token
  actually at that position. vLLM caps k by its `--max-logprobs` (default 20).
* mode "echo" (legacy OpenAI completions): {"prompt": ids, "echo": true, "logprobs": k,
  "max_tokens": 0, "return_tokens_as_token_ids": true}; the answer is `choices[0].logprobs` with
  `tokens`, `token_logprobs`, `top_logprobs` (dicts token *string* -> logprob) and `text_offset`,
  first entry null. Token strings are ambiguous (several ids can decode to the same text, and a
  JSON object cannot hold two equal keys), so the request asks vLLM to write every token, in
  `tokens` and as `top_logprobs` keys, as "token_id:N" instead; other servers ignore the field.
  How tokens become ids is decided per response, in this order: the non-standard `token_ids` /
  `top_logprobs_by_id` fields that `rollout.server` adds; else, when any echoed token is a
  "token_id:N" string (the field was honoured, or vLLM runs with `--return-tokens-as-token-ids`),
  every token and key at the scored positions must be one, read as the id N; else (plain strings
  from a server that ignored the field) an exact match of the string against
  `tokenizer.decode([id])` for every id (needs `tokenizer=`; an alternative that two ids decode
  to is an error, since the strings cannot tell them apart). A server that refuses the field
  (HTTP 400/422 naming `return_tokens_as_token_ids`) is asked once more without it, and the
  teacher leaves it out of every later request for its lifetime; a server started with vLLM's
  `--return-tokens-as-token-ids` still answers with ids then.

Every response is checked against the ids that were sent: number of positions, the token at each
response position (by id, or by exact string), at least k alternatives per position. Any
mismatch raises TeacherAlignmentError naming the position; an endpoint that cannot score at all
(404 on /v1/completions, a 400 about echo/logprobs, or a 200 without the requested field) raises
ScoringUnsupportedError with the explanation above. The top k at a position are the k entries
with the largest log-probability (the actual token is kept only if it is among them; its own
log-probability is in token_logprobs). Retries, the crash-safe cache (a rerun makes no new
calls), usage and bounded concurrency come from `api.client.ApiClient` (docs/api-client.md).
"""
from __future__ import annotations

import base64
import logging
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from api.client import ApiClient, ApiError, ApiRequest, EndpointError, MalformedResponseError

from .scoring import NEG_INF, TokenIds
from .teacher_format import TEACHER_TEMPLATE, TeacherChatTemplate
from .teachers import DEFAULT_TOP_K, TopKLogprobs, _check_pairs, teacher_prompt_ids

logger = logging.getLogger(__name__)

# vLLM's request field that writes echoed tokens and top_logprobs keys as "token_id:N" (echo mode)
TOKEN_IDS_FIELD = "return_tokens_as_token_ids"
TOKEN_ID_PREFIX = "token_id:"

CHAT_ONLY_EXPLANATION = (
    "Token-level distillation on the student's tokens needs the log-probabilities of a *supplied* token "
    "sequence: an OpenAI-compatible /v1/completions endpoint that takes token-id prompts and returns either "
    "`prompt_logprobs` (vLLM: extra body {\"prompt_logprobs\": k}, mode='prompt_logprobs') or `echo` + "
    "`logprobs` (mode='echo'). OpenAI's public chat completions API (GPT-4o, GPT-4.1) cannot do this: it "
    "returns log-probabilities only for tokens the model generates itself (no echo, top_logprobs <= 20), and "
    "its legacy /v1/completions serves only old models. Serve the teacher with vLLM (`vllm serve MODEL "
    "--max-logprobs 20`) or with `python -m rollout.server --checkpoint DIR`, or use rollout.teachers.LocalTeacher."
)


class ScoringUnsupportedError(ApiError):
    """The endpoint cannot return log-probabilities of a supplied sequence (e.g. chat-only)."""


class TeacherAlignmentError(ApiError):
    """The teacher's answer does not line up with the token ids that were sent."""



class OpenAICompatibleTeacher:
    """A remote teacher over /v1/completions (see the module docstring for what endpoints work).

    `model` is the name the server serves; `top_k` the alternatives per position (vLLM allows up
    to its --max-logprobs, 20 by default); `tokenizer` builds prompts and, in echo mode, maps plain
    token strings to ids (an answer in "token_id:N" form needs none). `api_key_env` is the *name*
    of the environment variable holding the key (None for a server without auth). Other keyword
    arguments go to ApiClient (cache_dir, max_concurrency, timeout_s, retry, seed, sleep).
    `ask_token_ids` says whether echo requests still carry `return_tokens_as_token_ids`.
    """

    def __init__(self, base_url: str, model: str, top_k: int = DEFAULT_TOP_K, *, tokenizer=None,
                 mode: str = "prompt_logprobs", api_key_env: str | None = "OPENAI_API_KEY",
                 template: str = TEACHER_TEMPLATE, chat_template: str | TeacherChatTemplate = "",
                 **client_options: Any):
        if mode not in ("prompt_logprobs", "echo"):
            raise ValueError(f"OpenAICompatibleTeacher: mode must be 'prompt_logprobs' (vLLM) or 'echo' "
                             f"(legacy completions), got {mode!r}")
        if top_k < 1:
            raise ValueError(f"OpenAICompatibleTeacher: top_k must be >= 1, got {top_k}")
        self.model = model
        self.top_k = top_k
        self.tokenizer = tokenizer
        self.mode = mode
        self.template = template
        # the teacher's chat format around the user turn (rollout.teachers.TeacherChatTemplate; "" = Phi-4's)
        self.chat_template = TeacherChatTemplate.parse(chat_template)
        self.client = ApiClient(base_url, api_key_env=api_key_env, **client_options)
        self._strings: dict[str, list[int]] | None = None
        # echo mode: whether requests carry TOKEN_IDS_FIELD; False for good once a server refuses it
        self.ask_token_ids = mode == "echo"

    def __repr__(self) -> str:
        return (f"OpenAICompatibleTeacher(model={self.model!r}, top_k={self.top_k}, mode={self.mode!r}, "
                f"client={self.client!r})")

    def config(self) -> dict[str, Any]:
        """What a run records about this teacher (no secrets)."""
        return {"type": type(self).__name__, "model": self.model, "top_k": self.top_k, "mode": self.mode,
                **self.client.config()}

    @property
    def usage(self):
        return self.client.usage

    def prompt(self, transcript: str, instruction: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("OpenAICompatibleTeacher.prompt needs tokenizer= (the teacher's tokenizer, whose "
                             "vocabulary must match the student's)")
        # checked here, not in __init__: a tokenizer given only to read echo answers need not build prompts
        problem = self.chat_template.tokenizer_problem(self.tokenizer)
        if problem:
            raise ValueError(f"OpenAICompatibleTeacher.prompt: {problem}")
        return teacher_prompt_ids(self.tokenizer, transcript, instruction, template=self.template,
                                  chat_template=self.chat_template)

    def score(self, prompts: TokenIds, responses: TokenIds) -> TopKLogprobs:
        prompts, responses = _check_pairs(prompts, responses)
        scored = [b for b, response in enumerate(responses) if response]
        values = self._fetch([prompts[b] for b in scored], [responses[b] for b in scored])
        steps, k = max((len(r) for r in responses), default=0), self.top_k
        out = TopKLogprobs(
            ids=torch.zeros(len(responses), steps, k, dtype=torch.long),
            logprobs=torch.full((len(responses), steps, k), NEG_INF),
            token_logprobs=torch.zeros(len(responses), steps),
            mask=torch.arange(steps)[None, :] < torch.tensor([len(r) for r in responses], dtype=torch.long)[:, None],
        )
        for b, value in zip(scored, values):
            length = len(responses[b])
            out.ids[b, :length], out.logprobs[b, :length], out.token_logprobs[b, :length] = unpack_scores(value)
        return out

    # -----------------------------------------------------------------------------------------

    def _fetch(self, prompts: list[list[int]], responses: list[list[int]]) -> list[dict]:
        """The packed scores of each (prompt, response) pair. In echo mode a server that refuses
        TOKEN_IDS_FIELD (a 400/422 naming it) is asked once more without it, and never again with it:
        the loop runs at most twice, since `ask_token_ids` only ever goes from True to False."""
        while True:
            asked = self.ask_token_ids
            try:
                return self.client.map([self._request(p, r) for p, r in zip(prompts, responses)])
            except EndpointError as error:
                if asked and _refuses(error, TOKEN_IDS_FIELD):
                    self.ask_token_ids = False
                    logger.warning("%s refused %s (HTTP %d: %s); asking again without it, for this teacher's "
                                   "lifetime: echoed tokens come back as strings and are matched through the "
                                   "tokenizer", error.endpoint, TOKEN_IDS_FIELD, error.status_code,
                                   error.server_message)
                    continue
                if _looks_chat_only(error):
                    raise ScoringUnsupportedError(
                        f"{error.endpoint} refused the scoring request (HTTP {error.status_code}: "
                        f"{error.server_message}). {CHAT_ONLY_EXPLANATION}") from None
                raise

    def _request(self, prompt: list[int], response: list[int]) -> ApiRequest:
        sequence, k = prompt + response, self.top_k
        where = f"{self.client.config()['base_url']}/completions (model {self.model!r})"
        if self.mode == "prompt_logprobs":
            params = {"model": self.model, "prompt": sequence, "max_tokens": 1, "temperature": 0.0,
                      "extra_body": {"prompt_logprobs": k}}

            def extract(body):
                return pack_scores(parse_prompt_logprobs(body, sequence, len(prompt), k, where))
        else:
            params = {"model": self.model, "prompt": sequence, "max_tokens": 0, "echo": True, "logprobs": k,
                      "temperature": 0.0}
            if self.ask_token_ids:
                params["extra_body"] = {TOKEN_IDS_FIELD: True}

            def extract(body):
                return pack_scores(parse_echo_logprobs(body, sequence, len(prompt), k, where, self._string_ids))
        tag = {"teacher": f"{self.mode}/v2-packed", "prompt_length": len(prompt)}
        return ApiRequest("completions", params, extract, cache_tag=tag)

    def _string_ids(self, token: str) -> list[int]:
        """Ids whose decoded text is exactly `token` (for echo answers in plain strings)."""
        if self.tokenizer is None:
            raise TeacherAlignmentError(
                f"the server returned token strings without ids (it ignored or refused {TOKEN_IDS_FIELD}); pass "
                "tokenizer= so they can be matched exactly, or use mode='prompt_logprobs' (vLLM), or start vLLM "
                "with --return-tokens-as-token-ids")
        if self._strings is None:
            strings: dict[str, list[int]] = {}
            for token_id in range(self.tokenizer.vocab_size):
                strings.setdefault(self.tokenizer.decode([token_id], skip_special=False), []).append(token_id)
            self._strings = strings
        return self._strings.get(token, [])


def _looks_chat_only(error: EndpointError) -> bool:
    """404/405/501 on /v1/completions, OpenAI's "This is a chat model", or a 400/422 refusing
    echo / (prompt_)logprobs as unknown or unsupported. A cap on k ("greater than max allowed: 20")
    is not: it stays an EndpointError with the server's message."""
    if error.status_code in (404, 405, 501):
        return True
    return "chat model" in error.server_message.lower() or _refuses(error, "echo", "logprobs")


def _refuses(error: EndpointError, *fields: str) -> bool:
    """A 400/422 whose message refuses a request field (unknown, unsupported, extra input: the words
    of OpenAI, vLLM and pydantic) and names one of `fields`."""
    if error.status_code not in (400, 422):
        return False
    message = error.server_message.lower()
    refused = any(word in message for word in ("unrecognized", "unsupported", "not supported", "unknown",
                                                "extra inputs", "extra_forbidden", "not permitted"))
    return refused and any(field in message for field in fields)


# ---------------------------------------------------------------------------------------------
# response parsing: body -> {"ids": [[k]] * T, "logprobs": [[k]] * T, "token_logprobs": [T]}


def pack_scores(value: dict) -> dict:
    """One response's scores as the client hands them on (and its cache stores them): the
    arrays as base64 of little-endian int32 ids and float32 log-probs (the precision the loss
    uses), with their shape. JSON lists of the same numbers take about 2.5x the bytes."""
    ids = np.asarray(value["ids"], dtype="<i4").reshape(len(value["ids"]), -1)  # (T, k)
    return {"shape": list(ids.shape), "ids": _b64(ids),
            "logprobs": _b64(np.asarray(value["logprobs"], dtype="<f4")),
            "token_logprobs": _b64(np.asarray(value["token_logprobs"], dtype="<f4"))}


def unpack_scores(packed: dict) -> tuple[Tensor, Tensor, Tensor]:
    """`pack_scores`'s output -> ids (T, k) int64, logprobs (T, k) float32, token_logprobs (T,) float32."""
    steps, k = packed["shape"]

    def array(name: str, dtype: str, shape) -> Tensor:
        return torch.from_numpy(np.frombuffer(base64.b64decode(packed[name]), dtype=dtype).reshape(shape).copy())
    return (array("ids", "<i4", (steps, k)).long(), array("logprobs", "<f4", (steps, k)),
            array("token_logprobs", "<f4", (steps,)))


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _first_choice(body: dict, where: str) -> dict:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponseError(f"{where}: the body has no choices list: {str(body)[:200]}")
    return choices[0]


def _logprob(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TeacherAlignmentError(f"{where}: expected a number as log-probability, got {value!r}")
    return float(value)


def _top_k(candidates: dict[int, float], k: int, where: str) -> tuple[list[int], list[float]]:
    if len(candidates) < k:
        raise TeacherAlignmentError(
            f"{where}: the server returned {len(candidates)} alternatives but top_k is {k}; it caps them "
            "(vLLM: --max-logprobs, default 20; legacy OpenAI completions: 5): lower top_k or raise the cap")
    best = sorted(candidates.items(), key=lambda item: (-item[1], item[0]))[:k]
    return [token_id for token_id, _ in best], [logprob for _, logprob in best]


def parse_prompt_logprobs(body: dict, sequence: list[int], prompt_length: int, k: int, where: str) -> dict:
    """vLLM's `prompt_logprobs` answer -> top-k of the response positions, checked against `sequence`."""
    choice = _first_choice(body, where)
    entries = choice.get("prompt_logprobs")
    if entries is None:
        raise ScoringUnsupportedError(
            f"{where} answered without `prompt_logprobs`: the endpoint ignored the parameter. {CHAT_ONLY_EXPLANATION}")
    if not isinstance(entries, list) or len(entries) != len(sequence):
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise TeacherAlignmentError(
            f"{where}: prompt_logprobs has {got} entries for the {len(sequence)} prompt tokens sent; the server "
            "re-tokenized the prompt or the vocabularies differ (send token ids to a server with the student's "
            "vocabulary)")
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != sequence:
        first = next((t for t, (a, b) in enumerate(zip(echoed, sequence)) if a != b), min(len(echoed), len(sequence)))
        raise TeacherAlignmentError(f"{where}: prompt_token_ids differ from the ids sent, first at position {first}")
    ids, logprobs, token_logprobs = [], [], []
    for position in range(prompt_length, len(sequence)):
        here = f"{where}, prompt_logprobs[{position}]"
        entry = entries[position]
        if not isinstance(entry, dict):
            raise TeacherAlignmentError(f"{here}: expected a dict token_id -> logprob, got {str(entry)[:100]}")
        candidates: dict[int, float] = {}
        for key, info in entry.items():
            try:
                token_id = int(key)
            except ValueError:
                raise TeacherAlignmentError(f"{here}: key {key!r} is not a token id") from None
            candidates[token_id] = _logprob(info.get("logprob") if isinstance(info, dict) else info, here)
        actual = sequence[position]
        if actual not in candidates:
            raise TeacherAlignmentError(
                f"{here}: the entry does not contain the token id that was sent ({actual}); vLLM always includes "
                "the prompt token, so the server scored a different sequence (vocabulary or tokenization mismatch)")
        top_ids, top_logprobs = _top_k(candidates, k, here)
        ids.append(top_ids)
        logprobs.append(top_logprobs)
        token_logprobs.append(candidates[actual])
    return {"ids": ids, "logprobs": logprobs, "token_logprobs": token_logprobs}


def parse_echo_logprobs(body: dict, sequence: list[int], prompt_length: int, k: int, where: str,
                        string_ids) -> dict:
    """A legacy `echo` + `logprobs` answer -> top-k of the response positions, checked against `sequence`.

    Which form the ids are read from is decided for the whole response (see the module docstring):
    rollout.server's id fields; else "token_id:N" strings when any echoed token is one; else plain
    strings, matched through `string_ids` (token string -> the ids that decode to it)."""
    choice = _first_choice(body, where)
    block = choice.get("logprobs")
    if not isinstance(block, dict) or not isinstance(block.get("tokens"), list):
        raise ScoringUnsupportedError(
            f"{where} answered without echoed `logprobs.tokens`: the endpoint ignored echo/logprobs. "
            f"{CHAT_ONLY_EXPLANATION}")
    tokens, token_lps, tops = block["tokens"], block.get("token_logprobs"), block.get("top_logprobs")
    token_ids, tops_by_id = block.get("token_ids"), block.get("top_logprobs_by_id")
    if len(tokens) < len(sequence) or not isinstance(token_lps, list) or not isinstance(tops, list) \
            or len(token_lps) < len(sequence) or len(tops) < len(sequence):
        raise TeacherAlignmentError(
            f"{where}: the echo covers {len(tokens)} tokens but {len(sequence)} were sent (or token_logprobs / "
            "top_logprobs are missing or shorter); the server re-tokenized the prompt or did not echo it")
    if isinstance(token_ids, list) and isinstance(tops_by_id, list):
        form = "id fields"
    elif any(isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX) for token in tokens):
        form = "token_id strings"
    else:
        form = "plain strings"
    ids, logprobs, token_logprobs = [], [], []
    for position in range(prompt_length, len(sequence)):
        here = f"{where}, logprobs position {position}"
        actual = sequence[position]
        if form == "id fields":
            if token_ids[position] != actual:
                raise TeacherAlignmentError(f"{here}: token_ids has {token_ids[position]}, but {actual} was sent")
            entry = tops_by_id[position]
            if not isinstance(entry, dict):
                raise TeacherAlignmentError(f"{here}: top_logprobs_by_id entry is {str(entry)[:100]}")
            candidates = {int(key): _logprob(value, here) for key, value in entry.items()}
        else:
            entry = tops[position]
            if not isinstance(entry, dict):
                raise TeacherAlignmentError(f"{here}: top_logprobs entry is {str(entry)[:100]}")
            if form == "token_id strings":
                echoed = parse_token_id(tokens[position], f"{here}, tokens")
                candidates = {parse_token_id(token, f"{here}, top_logprobs"): _logprob(value, here)
                              for token, value in entry.items()}
            else:
                echoed = _match_token_string(tokens[position], here, string_ids, expected=actual)
                candidates = {_match_token_string(token, here, string_ids): _logprob(value, here)
                              for token, value in entry.items()}
            if echoed != actual:
                raise TeacherAlignmentError(f"{here}: the server echoed {tokens[position]!r} (id {echoed}) where "
                                            f"{actual} was sent")
        top_ids, top_logprobs = _top_k(candidates, k, here)
        ids.append(top_ids)
        logprobs.append(top_logprobs)
        token_logprobs.append(_logprob(token_lps[position], here))
    return {"ids": ids, "logprobs": logprobs, "token_logprobs": token_logprobs}


def parse_token_id(token: Any, where: str) -> int:
    """vLLM's "token_id:N" (what return_tokens_as_token_ids writes for a token) -> N, a non-negative
    integer; anything else, in an answer that is in this form, is an error naming `where`."""
    digits = token[len(TOKEN_ID_PREFIX):] if isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX) else ""
    if not (digits.isascii() and digits.isdigit()):
        raise TeacherAlignmentError(
            f"{where}: expected a token in vLLM's \"{TOKEN_ID_PREFIX}N\" form (the answer uses it for other "
            f"tokens), got {str(token)[:100]!r}")
    return int(digits)


def _match_token_string(token: Any, where: str, string_ids, expected: int | None = None) -> int:
    """A plain token string -> the unique id that decodes to it (`expected`, when it is one of several)."""
    if not isinstance(token, str):
        raise TeacherAlignmentError(f"{where}: expected a token string, got {token!r}")
    candidates = string_ids(token)
    if expected is not None and expected in candidates:
        return expected
    if len(candidates) != 1:
        problem = "no id of the tokenizer decodes to it" if not candidates else f"ids {candidates[:5]} all decode to it"
        raise TeacherAlignmentError(
            f"{where}: cannot map the token string {token!r} to one id ({problem}); use mode='prompt_logprobs' "
            f"(vLLM) or a server that returns ids (vLLM honours {TOKEN_IDS_FIELD}; rollout.server adds token_ids)")
    return candidates[0]
