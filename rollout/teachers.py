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
text for ordinary text (special tokens may differ): `vocabulary_mismatch` compares the two
tokenizers on sample text before training. Cross-tokenizer distillation (ULD-style alignment of
two different vocabularies) is not supported.

Where the rest lives: rollout/scoring.py (`score_positions`, a local model's log-probabilities at
given positions, shared with rollout.server) and rollout/remote_teacher.py
(`OpenAICompatibleTeacher`, a model behind an OpenAI-compatible /v1/completions endpoint, and
the parsers of its two response formats).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import torch
from torch import Tensor

from losses.kd_fused import TeacherLogprobs, TeacherTopK

from .scoring import TokenIds, score_positions

TEACHER_TEMPLATE = "Here is the transcript of a recording.\n\n{transcript}\n\n{instruction}"
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


# ---------------------------------------------------------------------------------------------
# the teacher's chat template and vocabulary

# kd.teacher_template presets. None: the tokenizer's own Phi-4 template (build_chat_prompt), the
# default; the other strings are templates as described in TeacherChatTemplate.
CHAT_TEMPLATE_PRESETS: dict[str, str | None] = {
    "phi": None,
    # ChatML, the common <|im_start|> / <|im_end|> format; without a system turn, like the default
    "chatml": "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
    # gpt-oss's harmony format. Chosen: a system message in the form the format documents (identity,
    # knowledge cutoff, reasoning effort, valid channels) with reasoning effort low and no date, and the
    # assistant turn opened in the final channel, so the teacher scores the summary as its answer
    # rather than as its reasoning (the analysis channel).
    "harmony": ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                "Knowledge cutoff: 2024-06\n\nReasoning: low\n\n# Valid channels: analysis, commentary, final. "
                "Channel must be included for every message.<|end|>"
                "<|start|>user<|message|>{user}<|end|><|start|>assistant<|channel|>final<|message|>"),
}
TEMPLATE_FIELDS = ("user", "transcript", "instruction")
# Role markers in a template string: special-token text such as <|im_start|> or <|start|>.
MARKER = re.compile(r"<\|[^\s<>|]+\|>")
PHI_ROLE_TOKENS = ("user", "end", "assistant")  # model.tokenizer.SPECIAL_TOKENS names the Phi template needs
TEMPLATE_HELP = ('kd.teacher_template is "" or "phi" (the student\'s Phi-4 template), "chatml", "harmony", or a '
                 "template string with {user} (the user turn: transcript and instruction) or both {transcript} and "
                 "{instruction}, other braces doubled ({{ }}), and the role markers written as the teacher "
                 "tokenizer's special-token text, e.g. "
                 "\"<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n\"")


@dataclass(frozen=True)
class TeacherChatTemplate:
    """The teacher's chat format (config `kd.teacher_template`), parsed and checked once.

    `spec` is what was given: "" or "phi" (the default: the tokenizer's own Phi-4 template,
    `build_chat_prompt`, exactly the prompts of the student's format), a preset name of
    CHAT_TEMPLATE_PRESETS, or a template string. A template string has the fields {user} (the user
    turn, `TEACHER_TEMPLATE` filled with transcript and instruction) or {transcript} and
    {instruction}, literal braces doubled as in `str.format`, and its role markers written as the
    special-token text of the teacher's tokenizer (`<|im_start|>`), which encodes each as one id.
    Ids are built piece by piece, as `build_chat_prompt` does: the template's literal text and each
    field's text are encoded separately and joined, so no marker can arise from the text inside a
    field and the ids at a boundary do not depend on the text across it.
    """

    spec: str
    text: str | None  # the template string; None for "phi"
    parts: tuple[tuple[str, str | None], ...] = ()  # (literal text, field name or None after it)

    @classmethod
    def parse(cls, spec: "str | TeacherChatTemplate") -> "TeacherChatTemplate":
        """The template `spec` names or is; ValueError saying what is wrong (TEMPLATE_HELP)."""
        if isinstance(spec, TeacherChatTemplate):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"expected a string, got {spec!r}; {TEMPLATE_HELP}")
        text = CHAT_TEMPLATE_PRESETS.get(spec or "phi", spec)
        if text is None:
            return cls(spec=spec, text=None)
        try:
            pieces = list(string.Formatter().parse(text))
        except ValueError as error:  # a lone brace
            raise ValueError(f"{_short(spec)} is not a template string ({error}); {TEMPLATE_HELP}") from None
        parts = []
        for literal, field, format_spec, conversion in pieces:
            if field is not None and (field not in TEMPLATE_FIELDS or format_spec or conversion):
                shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{format_spec}" if format_spec
                                                                                  else "") + "}"
                raise ValueError(f"{_short(spec)} has the placeholder {shown}; the placeholders are "
                                 f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}, without format specs; "
                                 f"{TEMPLATE_HELP}")
            parts.append((literal, field))
        fields = {field for _, field in parts if field}
        if "user" not in fields and not {"transcript", "instruction"} <= fields:
            what = f"the placeholders {sorted(fields)}" if fields else "no placeholder"
            preset = "" if fields else f" and is not a preset ({', '.join(CHAT_TEMPLATE_PRESETS)})"
            raise ValueError(f"{_short(spec)} has {what}{preset}, so the teacher would not read the transcript and "
                             f"the instruction; {TEMPLATE_HELP}")
        return cls(spec=spec, text=text, parts=tuple(parts))

    @property
    def name(self) -> str:
        """The preset's name, or "custom" for a template string of one's own."""
        return (self.spec or "phi") if (self.spec or "phi") in CHAT_TEMPLATE_PRESETS else "custom"

    @property
    def markers(self) -> tuple[str, ...]:
        """The special-token texts in the template's literal text, in order of first appearance."""
        found = [m for literal, _ in self.parts for m in MARKER.findall(literal)]
        return tuple(dict.fromkeys(found))

    def tokenizer_problem(self, tokenizer) -> str | None:
        """Why `tokenizer` cannot build this template's prompts, or None: the Phi template needs
        the Phi role tokens among its special ids; a template string needs every marker encoded
        as exactly one id (else the tokenizer has no such special token and would spell it out)."""
        if self.text is None:
            missing = [name for name in PHI_ROLE_TOKENS if name not in getattr(tokenizer, "special_ids", {})]
            if missing:
                return (f"the teacher's tokenizer has no Phi-4 role tokens {missing} for the \"phi\" template; "
                        "set kd.teacher_template to the teacher's own chat template")
            return None
        for marker in self.markers:
            ids = tokenizer.encode(marker)
            if len(ids) != 1:
                return (f"the marker {marker!r} of kd.teacher_template is not one token of the teacher's tokenizer "
                        f"(it encodes as {len(ids)} ids {ids[:8]}), so the tokenizer has no such special token: "
                        "set kd.teacher_tokenizer to the teacher's own tokenizer, or write the markers the "
                        "teacher's tokenizer has")
        return None

    def prompt_ids(self, tokenizer, transcript: str, instruction: str, *, user_template: str = TEACHER_TEMPLATE,
                   system: str | None = None) -> list[int]:
        """Token ids of the teacher's prompt for one (transcript, instruction), ending where the
        teacher's answer starts (the student's response ids are appended to it, unchanged)."""
        user = user_template.format(transcript=transcript, instruction=instruction)
        if self.text is None:
            return tokenizer.build_chat_prompt(user, system=system).input_ids
        if system is not None:
            raise ValueError("a kd.teacher_template string carries its own system turn; write it into the "
                             "template instead of passing system=")
        values = {"user": user, "transcript": transcript, "instruction": instruction}
        ids: list[int] = []
        for literal, field in self.parts:
            if literal:
                ids += tokenizer.encode(literal)
            if field is not None:
                ids += tokenizer.encode(values[field])
        return ids


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def teacher_template_problem(spec) -> str | None:
    """What is wrong with a kd.teacher_template value, or None (train/config.py checks it)."""
    try:
        TeacherChatTemplate.parse(spec)
    except ValueError as error:
        return str(error)
    return None


def load_teacher_tokenizer(path: str | Path, chat_template: "str | TeacherChatTemplate" = ""):
    """The teacher's tokenizer at `path` (what model.tokenizer.load_tokenizer reads): with the Phi-4
    chat's special tokens required for the "phi" template (as the student's); for a template string
    none are, since the teacher has its own (its markers are checked by `tokenizer_problem`)."""
    from model.tokenizer import load_tokenizer

    if TeacherChatTemplate.parse(chat_template).text is None:
        return load_tokenizer(path)
    return load_tokenizer(path, special_tokens={})


# Ordinary text the vocabulary check always reads, besides the data's own: words, capitals, digits,
# punctuation, runs of spaces, newlines, markup, non-ASCII letters and an emoji.
VOCABULARY_SAMPLE = (
    "The team agreed that the remote control should cost 25 euros, and the budget is 1,250.75 in total.",
    "Action items: - Anna sends the design by Friday (3 June).\n- Bob checks the battery; deadline 2024-06-03.",
    'Summary in JSON: {"decisions": ["price", "colour"], "owner": "Marketing"}',
    "  Indented text\twith a tab, UPPER CASE WORDS, camelCase and snake_case_names?!",
    "Café, naïve, Zürich, São Paulo, 東京, Москва: a few words from other scripts; done \U0001F44D",
)


def vocabulary_mismatch(student_tokenizer, teacher_tokenizer, texts: Iterable[str] = ()) -> str | None:
    """Where the teacher's vocabulary gives the student's tokens other text, or None if it never
    does on `texts` + VOCABULARY_SAMPLE.

    The teacher scores the student's token ids as they are, so for ordinary text both tokenizers
    must agree: for each text, the teacher encodes it to the student's ids, decodes each of those
    ids to the student's piece, and decodes the whole sequence to the student's text. Special
    tokens may differ (ids the student's tokenizer counts as special are not compared).
    """
    special = set(getattr(student_tokenizer, "special_ids", {}).values())
    teacher_size = teacher_tokenizer.vocab_size
    for text in [*texts, *VOCABULARY_SAMPLE]:
        if not text:
            continue
        shown = _short(text, 60)
        ids = student_tokenizer.encode(text)
        ordinary = [i for i in ids if i not in special]
        beyond = [i for i in ordinary if i >= teacher_size]
        if beyond:
            return (f"on {shown} the student's tokens include id {beyond[0]}, but the teacher's tokenizer has "
                    f"{teacher_size} tokens")
        for token_id in dict.fromkeys(ordinary):
            mine = student_tokenizer.decode([token_id], skip_special=False)
            theirs = teacher_tokenizer.decode([token_id], skip_special=False)
            if mine != theirs:
                return (f"on {shown} the student's token {token_id} is {mine!r}, but the teacher's token "
                        f"{token_id} is {theirs!r}")
        teacher_ids = teacher_tokenizer.encode(text)
        if teacher_ids != ids:
            at = next((t for t, (a, b) in enumerate(zip(ids, teacher_ids)) if a != b), min(len(ids), len(teacher_ids)))
            return (f"on {shown} the student's tokenizer gives {len(ids)} ids and the teacher's {len(teacher_ids)}, "
                    f"first different at token {at} (student {ids[at:at + 3]}, teacher {teacher_ids[at:at + 3]})")
        mine = student_tokenizer.decode(ordinary, skip_special=False)
        theirs = teacher_tokenizer.decode(ordinary, skip_special=False)
        if mine != theirs:
            return (f"on {shown} the student's ids decode to {_short(mine, 60)} but the teacher's to "
                    f"{_short(theirs, 60)}")
    return None


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
