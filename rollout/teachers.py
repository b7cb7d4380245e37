"""Teachers for on-policy KD (paper section 2.2): log p_T(. | transcript, instruction, y_<t) on
the student's own tokens y.

The paper's teacher is GPT-4o in text mode: it reads the transcript while the student hears the
audio. A teacher here takes token ids of its own prompt (transcript + instruction, built with
the teacher's template, `Teacher.prompt`) and of the student's response, and returns, for every
response position t, the teacher's distribution over the token at t given prompt + y_<t:

    FullLogprobs   logprobs (B, T, V)                       a local model, full vocabulary
    TopKLogprobs   ids (B, T, k), logprobs (B, T, k)        an API teacher (or a local one asked for top-k)

both with token_logprobs (B, T) = log p_T(y_t) and mask (B, T), right-padded, row b = response b
(the layout of `rollout.sampler.Rollout`). These feed `losses.kd.forward_kl` / `losses.kd_topk.forward_kl_topk` (and
`fused_kd_loss` as TeacherLogprobs / TeacherTopK); for a full-vocabulary local teacher without a
(B, T, V) tensor use `LocalTeacher.hidden_states` with `losses.kd_fused.TeacherHead`.

LocalTeacher: any model of this project in text mode, batched, no grad, log-softmax computed
`chunk_tokens` positions at a time so a 200k vocabulary never needs a (tokens, V) tensor beyond
one chunk (except in FullLogprobs, which *is* (B, T, V): use top-k or hidden_states at scale).

OpenAICompatibleTeacher: a remote model over the OpenAI-compatible `/v1/completions` API.
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
  "max_tokens": 0}; the answer is `choices[0].logprobs` with `tokens`, `token_logprobs`,
  `top_logprobs` (dicts token *string* -> logprob) and `text_offset`, first entry null.
  Tokens are mapped back to ids, in this order of preference: the non-standard `token_ids` /
  `top_logprobs_by_id` fields that `rollout.server` adds; vLLM's "token_id:N" strings
  (`--return-tokens-as-token-ids`); else an exact match of the string against
  `tokenizer.decode([id])` for every id (needs `tokenizer=`; a string two ids decode to is an
  error, since the legacy format cannot tell them apart).

Every response is checked against the ids that were sent: number of positions, the token at each
response position (by id, or by exact string), at least k alternatives per position. Any
mismatch raises TeacherAlignmentError naming the position; an endpoint that cannot score at all
(404 on /v1/completions, a 400 about echo/logprobs, or a 200 without the requested field) raises
ScoringUnsupportedError with the explanation above. The top k at a position are the k entries
with the largest log-probability (the actual token is kept only if it is among them; its own
log-probability is in token_logprobs). Retries, the crash-safe cache (a rerun makes no new
calls), usage and bounded concurrency come from `rollout.api_client.ApiClient`.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from losses.kd_fused import TeacherLogprobs, TeacherTopK

from .api_client import ApiClient, ApiError, ApiRequest, EndpointError, MalformedResponseError

TEACHER_TEMPLATE = "Here is the transcript of a recording.\n\n{transcript}\n\n{instruction}"
DEFAULT_TOP_K = 20  # vLLM's default --max-logprobs
NEG_INF = float("-inf")
TokenIds = Sequence[Sequence[int]]  # one list (or 1-D tensor) of token ids per row

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


@dataclass
class TopKLogprobs:
    """The teacher's k most likely tokens at every response position (right-padded)."""

    ids: Tensor  # (B, T, k) int64, in the student's vocabulary; 0 where mask is False
    logprobs: Tensor  # (B, T, k) float32 log p_T(ids), descending; -inf where mask is False
    token_logprobs: Tensor  # (B, T) float32 log p_T(y_t) of the student's token; 0 where mask is False
    mask: Tensor  # (B, T) bool, True on response tokens

    def for_loss(self, device: torch.device | str) -> TeacherTopK:
        """The distribution losses.kd_fused.fused_kd_loss takes (top k + tail), on `device`."""
        return TeacherTopK(self.ids.to(device), self.logprobs.to(device))


@dataclass
class FullLogprobs:
    """The teacher's full log-softmax at every response position (right-padded)."""

    logprobs: Tensor  # (B, T, V) float32; 0 where mask is False
    token_logprobs: Tensor  # (B, T) float32 log p_T(y_t); 0 where mask is False
    mask: Tensor  # (B, T) bool

    def for_loss(self, device: torch.device | str) -> TeacherLogprobs:
        """The distribution losses.kd_fused.fused_kd_loss takes (full vocabulary), on `device`."""
        return TeacherLogprobs(self.logprobs.to(device))


class Teacher(Protocol):
    top_k: int | None  # None: full vocabulary (FullLogprobs)

    def prompt(self, transcript: str, instruction: str) -> list[int]:
        """Token ids of the teacher's prompt for one (transcript, instruction), by its own template."""

    def score(self, prompts: TokenIds, responses: TokenIds) -> TopKLogprobs | FullLogprobs:
        """Log-probabilities at every position of each response, conditioned on its prompt."""


def teacher_prompt_ids(tokenizer, transcript: str, instruction: str, *, template: str = TEACHER_TEMPLATE,
                       system: str | None = None) -> list[int]:
    """`<|user|>{template(transcript, instruction)}<|end|><|assistant|>` in the tokenizer's chat template."""
    text = template.format(transcript=transcript, instruction=instruction)
    return tokenizer.build_chat_prompt(text, system=system).input_ids


def _as_id_lists(name: str, sequences: TokenIds) -> list[list[int]]:
    out = []
    for i, sequence in enumerate(sequences):
        ids = sequence.tolist() if isinstance(sequence, Tensor) else list(sequence)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise TypeError(f"{name}[{i}] must hold integer token ids, got {ids[:8]}...")
        out.append(ids)
    return out


def _check_pairs(prompts, responses) -> tuple[list[list[int]], list[list[int]]]:
    prompts, responses = _as_id_lists("prompts", prompts), _as_id_lists("responses", responses)
    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"score: prompts[{i}] is empty; a teacher prompt needs at least one token")
    return prompts, responses


# ---------------------------------------------------------------------------------------------
# local teacher


@dataclass
class ScoredPositions:
    """Scores of positions [start_b, len_b) of each sequence b, right-padded to T = max(len_b - start_b)."""

    token_logprobs: Tensor  # (B, T) float32
    topk_ids: Tensor  # (B, T, k) int64
    topk_logprobs: Tensor  # (B, T, k) float32, -inf where padded
    ranks: Tensor | None  # (B, T) int64, 1-based rank of the token in the full vocabulary
    full: Tensor | None  # (B, T, V) float32
    mask: Tensor  # (B, T) bool


@torch.no_grad()
def score_positions(
    model,
    sequences: TokenIds,
    starts: Sequence[int],
    top_k: int = 0,
    *,
    full: bool = False,
    ranks: bool = False,
    batch_size: int = 8,
    chunk_tokens: int = 1024,
) -> ScoredPositions:
    """Teacher-forced log p(seq[t] | seq[:t]) and top-k for t in [start, len) of every sequence.

    Sequences are right-padded `batch_size` at a time and run through `model.hidden_states`
    (text only); the LM head and log-softmax run `chunk_tokens` positions at a time.
    """
    decoder = model.decoder
    vocab_size = decoder.config.vocab_size
    device = decoder.embed_tokens.weight.device
    sequences = [list(s) for s in sequences]
    if not 0 <= top_k <= vocab_size:
        raise ValueError(f"top_k must lie in [0, vocab_size={vocab_size}], got {top_k}")
    for b, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
        if not 1 <= start <= len(sequence):
            raise ValueError(f"sequence {b}: start {start} must lie in [1, len={len(sequence)}] "
                             "(position 0 has no prediction)")
        bad = [t for t in sequence if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sequence {b}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    lengths = [len(s) - start for s, start in zip(sequences, starts)]
    num, steps = len(sequences), max(lengths, default=0)
    out = ScoredPositions(
        token_logprobs=torch.zeros(num, steps),
        topk_ids=torch.zeros(num, steps, top_k, dtype=torch.long),
        topk_logprobs=torch.full((num, steps, top_k), NEG_INF),
        ranks=torch.zeros(num, steps, dtype=torch.long) if ranks else None,
        full=torch.zeros(num, steps, vocab_size) if full else None,
        mask=torch.arange(steps)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None],
    )
    pad = decoder.config.pad_token_id
    for first in range(0, num, batch_size):
        rows = [b for b in range(first, min(first + batch_size, num)) if lengths[b] > 0]
        if not rows:
            continue
        width = max(len(sequences[b]) for b in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, b in enumerate(rows):
            input_ids[i, : len(sequences[b])] = torch.tensor(sequences[b])
            attention_mask[i, : len(sequences[b])] = 1
        padded = bool((attention_mask == 0).any())
        hidden = model.hidden_states(input_ids.to(device), attention_mask.to(device) if padded else None)  # (n, S, H)
        # position p of a row predicts token p + 1: take p in [start - 1, len - 1)
        row_index = torch.cat([torch.full((lengths[b],), i) for i, b in enumerate(rows)])  # (N,)
        source = torch.cat([torch.arange(starts[b] - 1, len(sequences[b]) - 1) for b in rows])  # (N,)
        target_row = torch.cat([torch.full((lengths[b],), b) for b in rows])  # (N,) row of the output
        target_step = torch.cat([torch.arange(lengths[b]) for b in rows])  # (N,) step of the output
        targets = torch.cat([torch.tensor(sequences[b][starts[b]:]) for b in rows])  # (N,) the scored tokens
        flat_hidden = hidden[row_index.to(device), source.to(device)]  # (N, H)
        for c in range(0, flat_hidden.shape[0], chunk_tokens):
            chunk = slice(c, c + chunk_tokens)
            logprobs = decoder.logits(flat_hidden[chunk]).float().log_softmax(-1)  # (C, V)
            token_lp = logprobs.gather(-1, targets[chunk, None].to(device))[:, 0]  # (C,)
            where = (target_row[chunk], target_step[chunk])
            out.token_logprobs[where] = token_lp.cpu()
            if top_k:
                values, ids = logprobs.topk(top_k, dim=-1)  # (C, k) descending
                out.topk_logprobs[where] = values.cpu()
                out.topk_ids[where] = ids.cpu()
            if ranks:
                out.ranks[where] = ((logprobs > token_lp[:, None]).sum(-1) + 1).cpu()
            if full:
                out.full[where] = logprobs.cpu()
    return out


class LocalTeacher:
    """A model of this project as the teacher, in text mode (see the module docstring).

    top_k None: `score` returns FullLogprobs (B, T, V); an int: TopKLogprobs (B, T, k).
    """

    def __init__(self, model, tokenizer=None, *, top_k: int | None = None, batch_size: int = 8,
                 chunk_tokens: int = 1024, template: str = TEACHER_TEMPLATE):
        self.model = model
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.batch_size = batch_size
        self.chunk_tokens = chunk_tokens
        self.template = template
        if top_k is not None and top_k < 1:
            raise ValueError(f"LocalTeacher: top_k must be >= 1 or None (full vocabulary), got {top_k}")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None, device=None,
                        **kwargs) -> "LocalTeacher":
        """Model and tokenizer from one checkpoint directory (tokenizer.json or tokenizer.model inside)."""
        from model import load_pretrained
        from model.tokenizer import load_tokenizer

        model = load_pretrained(path, dtype=dtype, device=device).eval()
        return cls(model, load_tokenizer(path), **kwargs)

    def __repr__(self) -> str:
        return f"LocalTeacher(top_k={self.top_k}, vocab_size={self.model.decoder.config.vocab_size})"

    def prompt(self, transcript: str, instruction: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("LocalTeacher.prompt needs a tokenizer; pass tokenizer= or use from_pretrained")
        return teacher_prompt_ids(self.tokenizer, transcript, instruction, template=self.template)

    def score(self, prompts: TokenIds, responses: TokenIds) -> TopKLogprobs | FullLogprobs:
        prompts, responses = _check_pairs(prompts, responses)
        scored = score_positions(
            self.model, [p + r for p, r in zip(prompts, responses)], [len(p) for p in prompts],
            top_k=self.top_k or 0, full=self.top_k is None, batch_size=self.batch_size,
            chunk_tokens=self.chunk_tokens,
        )
        if self.top_k is None:
            return FullLogprobs(logprobs=scored.full, token_logprobs=scored.token_logprobs, mask=scored.mask)
        return TopKLogprobs(ids=scored.topk_ids, logprobs=scored.topk_logprobs,
                            token_logprobs=scored.token_logprobs, mask=scored.mask)

    @torch.no_grad()
    def hidden_states(self, prompts: TokenIds, responses: TokenIds) -> tuple[Tensor, Tensor]:
        """(hidden (B, T, H), mask (B, T)): the teacher's final states that predict each response
        token; with `model.decoder.lm_head.weight` this is `losses.kd_fused.TeacherHead`."""
        prompts, responses = _check_pairs(prompts, responses)
        decoder = self.model.decoder
        device = decoder.embed_tokens.weight.device
        steps = max((len(r) for r in responses), default=0)
        hidden_out = torch.zeros(len(prompts), steps, decoder.config.hidden_size,
                                 dtype=decoder.embed_tokens.weight.dtype, device=device)
        mask = torch.arange(steps)[None, :] < torch.tensor([len(r) for r in responses])[:, None]
        for b, (prompt, response) in enumerate(zip(prompts, responses)):
            if response:
                ids = torch.tensor([prompt + response], device=device)
                hidden = self.model.hidden_states(ids)[0]  # (P + T, H)
                hidden_out[b, : len(response)] = hidden[len(prompt) - 1 : len(prompt) + len(response) - 1]
        return hidden_out, mask.to(device)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible teacher


class OpenAICompatibleTeacher:
    """A remote teacher over /v1/completions (see the module docstring for what endpoints work).

    `model` is the name the server serves; `top_k` the alternatives per position (vLLM allows up
    to its --max-logprobs, 20 by default); `tokenizer` builds prompts and, in echo mode, maps token
    strings to ids. `api_key_env` is the *name* of the environment variable holding the key
    (None for a server without auth). Other keyword arguments go to ApiClient (cache_dir,
    max_concurrency, timeout_s, retry, seed, sleep).
    """

    def __init__(self, base_url: str, model: str, top_k: int = DEFAULT_TOP_K, *, tokenizer=None,
                 mode: str = "prompt_logprobs", api_key_env: str | None = "OPENAI_API_KEY",
                 template: str = TEACHER_TEMPLATE, **client_options: Any):
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
        self.client = ApiClient(base_url, api_key_env=api_key_env, **client_options)
        self._strings: dict[str, list[int]] | None = None

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
        return teacher_prompt_ids(self.tokenizer, transcript, instruction, template=self.template)

    def score(self, prompts: TokenIds, responses: TokenIds) -> TopKLogprobs:
        prompts, responses = _check_pairs(prompts, responses)
        scored = [b for b, response in enumerate(responses) if response]
        requests = [self._request(prompts[b], responses[b]) for b in scored]
        try:
            values = self.client.map(requests)
        except EndpointError as error:
            if _looks_chat_only(error):
                raise ScoringUnsupportedError(
                    f"{error.endpoint} refused the scoring request (HTTP {error.status_code}: "
                    f"{error.server_message}). {CHAT_ONLY_EXPLANATION}") from None
            raise
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

            def extract(body):
                return pack_scores(parse_echo_logprobs(body, sequence, len(prompt), k, where, self._string_ids))
        tag = {"teacher": f"{self.mode}/v2-packed", "prompt_length": len(prompt)}
        return ApiRequest("completions", params, extract, cache_tag=tag)

    def _string_ids(self, token: str) -> list[int]:
        """Ids whose decoded text is exactly `token` (for echo answers without ids)."""
        if self.tokenizer is None:
            raise TeacherAlignmentError(
                "the server returned token strings without ids; pass tokenizer= so they can be matched exactly, "
                "or use mode='prompt_logprobs' (vLLM), or start vLLM with --return-tokens-as-token-ids")
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
    if error.status_code not in (400, 422):
        return False
    message = error.server_message.lower()
    refused = any(word in message for word in ("unrecognized", "unsupported", "not supported", "unknown",
                                                "extra inputs", "extra_forbidden", "not permitted"))
    return "chat model" in message or (refused and ("echo" in message or "logprobs" in message))


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
    """A legacy `echo` + `logprobs` answer -> top-k of the response positions, checked against `sequence`."""
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
    ids, logprobs, token_logprobs = [], [], []
    for position in range(prompt_length, len(sequence)):
        here = f"{where}, logprobs position {position}"
        actual = sequence[position]
        if isinstance(token_ids, list) and isinstance(tops_by_id, list):
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
            echoed = _token_id(tokens[position], here, string_ids, expected=actual)
            if echoed != actual:
                raise TeacherAlignmentError(f"{here}: the server echoed {tokens[position]!r} (id {echoed}) where "
                                            f"{actual} was sent")
            candidates = {}
            for token, value in entry.items():
                candidates[_token_id(token, here, string_ids)] = _logprob(value, here)
        top_ids, top_logprobs = _top_k(candidates, k, here)
        ids.append(top_ids)
        logprobs.append(top_logprobs)
        token_logprobs.append(_logprob(token_lps[position], here))
    return {"ids": ids, "logprobs": logprobs, "token_logprobs": token_logprobs}


def _token_id(token: str, where: str, string_ids, expected: int | None = None) -> int:
    """A legacy token string -> id: vLLM's "token_id:N", else the unique id that decodes to it."""
    if not isinstance(token, str):
        raise TeacherAlignmentError(f"{where}: expected a token string, got {token!r}")
    if token.startswith("token_id:"):
        try:
            return int(token[len("token_id:"):])
        except ValueError:
            raise TeacherAlignmentError(f"{where}: malformed token {token!r}") from None
    candidates = string_ids(token)
    if expected is not None and expected in candidates:
        return expected
    if len(candidates) != 1:
        problem = "no id of the tokenizer decodes to it" if not candidates else f"ids {candidates[:5]} all decode to it"
        raise TeacherAlignmentError(
            f"{where}: cannot map the token string {token!r} to one id ({problem}); use mode='prompt_logprobs' "
            "(vLLM) or a server that returns ids (vLLM --return-tokens-as-token-ids, rollout.server)")
    return candidates[0]
