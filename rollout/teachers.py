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

The teacher's prompt is in the teacher's own chat format (`TeacherChatTemplate`, config
`kd.teacher_template`): "phi" (the default; the student's Phi-4 template, built by the tokenizer's
`build_chat_prompt`), a preset ("chatml", "harmony" for gpt-oss), or a template string whose role
markers are the teacher tokenizer's special-token text. The response ids that follow it are the
student's tokens, unchanged, so the teacher's vocabulary must give the student's ids the same
text for ordinary text (special tokens may differ): rollout/teacher_format.py holds the template,
the vocabulary check run before training and the end-of-turn swap. Cross-tokenizer distillation
(ULD-style alignment of two different vocabularies) is not supported.

Where the rest lives: rollout/scoring.py (`score_positions`, a local model's log-probabilities at
given positions, shared with rollout.server) and rollout/remote_teacher.py
(`OpenAICompatibleTeacher`, a model behind an OpenAI-compatible /v1/completions endpoint, and
the parsers of its two response formats).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from losses.kd_fused import TeacherLogprobs, TeacherTopK

from .scoring import TokenIds, score_positions
from .teacher_format import TEACHER_TEMPLATE, TeacherChatTemplate, load_teacher_tokenizer

DEFAULT_TOP_K = 20  # vLLM's default --max-logprobs


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
                       system: str | None = None, chat_template: "str | TeacherChatTemplate" = "") -> list[int]:
    """The teacher's prompt ids: the user turn `template(transcript, instruction)` in the teacher's
    chat format `chat_template` (a `TeacherChatTemplate` or its spec; "" = "phi":
    `[<|system|>{system}<|end|>]<|user|>{user turn}<|end|><|assistant|>` by the tokenizer's own
    `build_chat_prompt`, the prompts of the student's format)."""
    return TeacherChatTemplate.parse(chat_template).prompt_ids(tokenizer, transcript, instruction,
                                                               user_template=template, system=system)


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


class LocalTeacher:
    """A model of this project as the teacher, in text mode (see the module docstring).

    top_k None: `score` returns FullLogprobs (B, T, V); an int: TopKLogprobs (B, T, k).
    """

    def __init__(self, model, tokenizer=None, *, top_k: int | None = None, batch_size: int = 8,
                 chunk_tokens: int = 1024, template: str = TEACHER_TEMPLATE,
                 chat_template: "str | TeacherChatTemplate" = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.batch_size = batch_size
        self.chunk_tokens = chunk_tokens
        self.template = template  # the user turn (transcript + instruction)
        self.chat_template = TeacherChatTemplate.parse(chat_template)  # the teacher's chat format around it
        if top_k is not None and top_k < 1:
            raise ValueError(f"LocalTeacher: top_k must be >= 1 or None (full vocabulary), got {top_k}")
        problem = tokenizer is not None and self.chat_template.tokenizer_problem(tokenizer)
        if problem:
            raise ValueError(f"LocalTeacher: {problem}")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None, device=None,
                        tokenizer=None, **kwargs) -> "LocalTeacher":
        """Model and tokenizer from one checkpoint directory (tokenizer.json or tokenizer.model inside);
        `tokenizer` given: that one instead (the teacher's own, e.g. kd.teacher_tokenizer)."""
        from model import load_pretrained

        model = load_pretrained(path, dtype=dtype, device=device).eval()
        if tokenizer is None:
            tokenizer = load_teacher_tokenizer(path, kwargs.get("chat_template", ""))
        return cls(model, tokenizer, **kwargs)

    def __repr__(self) -> str:
        return f"LocalTeacher(top_k={self.top_k}, vocab_size={self.model.decoder.config.vocab_size})"

    def prompt(self, transcript: str, instruction: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("LocalTeacher.prompt needs a tokenizer; pass tokenizer= or use from_pretrained")
        return self.chat_template.prompt_ids(self.tokenizer, transcript, instruction, user_template=self.template)

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
