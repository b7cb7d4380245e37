"""LLM judges of summaries: a rubric score (evaluation, paper section 3.4) and a pairwise
preference (the DPO pairs of section 2.3).

    judge = OpenAIJudge("https://api.openai.com/v1", "gpt-4.1", cache_dir="runs/judge_cache")
    judge.score(transcript, instruction, summary)   # JudgeScore(overall=6, hallucination=0, adherence=7, ...)
    judge.prefer(transcript, instruction, a, b)     # "a" | "b" | "tie"

The paper's judge is GPT-4.1 reading the transcript (the source) and the output, giving one
overall score from 1 to 7. The rubric below is written for this project after the
summarization judge of the Phi-4-multimodal report (arXiv 2503.01743): overall quality 1-7 in
bands (7 fully follows the instruction with accurate details and the requested structure; 5-6
mostly, minor issues; 4-5 follows most of it with extra or missing content; 2-4 partial,
inconsistent, hallucinated or irrelevant content; 1 fails), a binary hallucination flag and
instruction adherence 1-7, the judge explaining before scoring, answer as JSON. The bands
overlap as in the report; the judge picks within them.

Parsing (`parse_score`, `parse_preference`) is tolerant of how judges really answer: code
fences, prose around the JSON, several JSON objects (the last one that has a score wins),
numbers as strings ("6", "6/7"), booleans or "yes"/"no" for the hallucination flag, Python-style
quotes or trailing commas (read field by field), "score" for "overall" (the report's format).
It is strict about meaning: a score outside its range, "N/A", a boolean, or no score at all
leaves that field None; `JudgeScore.valid` is False when `overall` is None. An invalid reply is
returned, never guessed at, and counted (`OpenAIJudge.invalid_replies`), so an evaluation can
report how many judgments it dropped. Replies are not re-asked: with temperature 0 the same
request gives the same reply (and is cached).

Request parameters. `temperature` (default 0, the paper's deterministic judge) is not sent
when None: reasoning models (o-series, GPT-5) accept only their default and answer HTTP 400 to
any explicit value. `max_tokens` (default 512) is sent as `max_completion_tokens`, the field
reasoning models require (OpenAI-compatible servers such as vLLM and rollout.server accept it
too); for a reasoning model it also bounds the hidden reasoning, so give it a few thousand
tokens, or None to send no limit. `json_mode` sends response_format {"type": "json_object"}.
On the command line of eval.run and eval.preferences these are `--judge-temperature` (a number
or `none`), `--judge-max-tokens` (an integer or `none`) and `--judge-json-mode`
(`add_judge_arguments`, `judge_request_options`). `config()` records them under the names
temperature, max_tokens and json_mode; eval.run keys its stored judgements on that config, so
a judge with another temperature, limit or JSON mode judges again instead of reusing them, and
the response cache's key holds the request parameters themselves.

Pairwise preference is judged in both orders, (a, b) and (b, a), to cancel position bias
(as MT-Bench does); the answer is a winner only when both orders agree, and "tie" otherwise,
including when either reply is unusable. DPO drops ties (paper section 2.3).

HTTP, retries, the crash-safe cache, usage and bounded concurrency are the teacher's:
`api.client.ApiClient` (one client for both; docs/api-client.md). The API key is read from the
environment variable named by `api_key_env`, never stored or logged.
"""
from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from api.client import ApiClient, ApiRequest, MalformedResponseError
from api.options import check_generation, generation_params, optional_max_tokens, optional_temperature

SCORE_SYSTEM = (
    "You are a meticulous evaluator of summaries of spoken recordings such as meetings, lectures and "
    "interviews. You compare each summary against the transcript of the recording and the user's "
    "instruction, and you answer only with the JSON object you are asked for."
)

SCORE_TEMPLATE = """Evaluate a summary that was written from a recording, following a user's instruction. The transcript of the recording is the only source of truth.

<transcript>
{source}
</transcript>

<instruction>
{instruction}
</instruction>

<summary>
{summary}
</summary>

Rate the summary on three criteria.

overall (integer 1-7): overall quality, covering accuracy of details with respect to the transcript, coherence, writing style, absence of hallucination, and compliance with the format, content and length that the instruction asked for.
  7: fully follows the instruction, with accurate details and the requested structure.
  5-6: mostly follows the instruction; minor issues in detail, structure, style or length.
  4-5: follows most of the instruction, but adds content that was not asked for or misses content that was.
  2-4: follows the instruction only partially; has inconsistencies, hallucinated or irrelevant content, or heavy repetition.
  1: fails to follow the instruction (wrong task, empty, unreadable, or mostly fabricated).
hallucination (0 or 1): 1 if the summary states anything the transcript does not support (invented names, numbers, dates, decisions or events), otherwise 0.
adherence (integer 1-7): how completely the summary follows the requested format, content and length, regardless of accuracy (7 completely, 1 not at all).

Judge against the transcript only, not outside knowledge. Longer is not better: reward exactly what was asked for. Write the explanation first (two to four sentences), then the scores. Answer with one JSON object and nothing else:
{{"explanation": "...", "overall": <1-7>, "hallucination": <0 or 1>, "adherence": <1-7>}}"""

PREFER_SYSTEM = SCORE_SYSTEM

PREFER_TEMPLATE = """Two summaries, A and B, were written from the same recording, following the same instruction. The transcript of the recording is the only source of truth. Decide which summary is better.

<transcript>
{source}
</transcript>

<instruction>
{instruction}
</instruction>

<summary_a>
{a}
</summary_a>

<summary_b>
{b}
</summary_b>

The better summary follows the instruction's requested format, content and length more closely, states only what the transcript supports (no hallucinated names, numbers, decisions or events), is coherent and free of repetition, and gets the details right. Do not let the order of presentation or the length of the summaries influence you. Answer "tie" only if neither is better.

Write the explanation first (two to four sentences). Answer with one JSON object and nothing else:
{{"explanation": "...", "winner": "A" | "B" | "tie"}}"""

OVERALL_KEYS = ("overall", "score", "overall_score", "overall_quality", "rating")
HALLUCINATION_KEYS = ("hallucination", "hallucinated", "has_hallucination", "hallucinations")
ADHERENCE_KEYS = ("adherence", "instruction_adherence", "instruction_following", "adherence_score")
WINNER_KEYS = ("winner", "preferred", "better", "choice", "verdict")


@dataclass(frozen=True)
class JudgeScore:
    overall: float | None  # 1-7 (integers asked for; halves accepted); None: the reply gave no usable score
    hallucination: int | None  # 1: states something the transcript does not support; 0: does not
    adherence: float | None  # 1-7
    explanation: str

    @property
    def valid(self) -> bool:
        return self.overall is not None


@dataclass(frozen=True)
class Preference:
    winner: str  # "a" | "b" | "tie": a winner only when both orders agree
    first: str | None  # the verdict with a shown first ("a" | "b" | "tie"; None: unusable reply)
    second: str | None  # the verdict with b shown first, mapped back to a / b
    explanations: tuple[str, str]


class Judge(Protocol):
    def score(self, source: str, instruction: str, summary: str) -> JudgeScore: ...

    def prefer(self, source: str, instruction: str, a: str, b: str) -> str:
        """Which summary is better: "a", "b" or "tie"."""


# ---------------------------------------------------------------------------------------------
# parsing judge replies


def _json_objects(text: str) -> list[dict]:
    """Every JSON object embedded in `text` (code fences and prose around them ignored), in order."""
    decoder = json.JSONDecoder()
    objects, position = [], 0
    while True:
        start = text.find("{", position)
        if start < 0:
            return objects
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            position = start + 1
            continue
        if isinstance(value, dict):
            objects.append(value)
        position = end


def _lookup(obj: dict, keys: Sequence[str]) -> tuple[bool, Any]:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for key in keys:
        if key in lowered:
            return True, lowered[key]
    return False, None


def _loose_field(text: str, keys: Sequence[str]) -> tuple[bool, Any]:
    """`"key": value` / `'key': value` / `key: value` in text that is not valid JSON."""
    for key in keys:
        match = re.search(rf"""["']?\b{key}\b["']?\s*[:=]\s*("[^"]*"|'[^']*'|[^,}}\n]+)""", text, re.IGNORECASE)
        if match:
            return True, match.group(1).strip().strip("\"'").strip()
    return False, None


def _scale(value: Any, low: float, high: float) -> float | None:
    """A score on [low, high] from a number or a string like "6", "6.0", "6/7"; None if not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?\s*", value)
        if not match:
            return None
        value = float(match.group(1))
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        return None
    if value * 2 != int(value * 2):  # only whole and half points
        return None
    return int(value) if value == int(value) else float(value)


def _flag(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        word = value.strip().strip(".").lower()
        return {"0": 0, "1": 1, "no": 0, "yes": 1, "false": 0, "true": 1, "none": 0}.get(word)
    return None


def parse_score(reply: str | None) -> JudgeScore:
    """A judge reply -> JudgeScore; unusable fields are None (see the module docstring)."""
    text = (reply or "").strip()
    objects = [obj for obj in _json_objects(text) if _lookup(obj, OVERALL_KEYS)[0]]
    if objects:
        obj = objects[-1]
        lookup = lambda keys: _lookup(obj, keys)  # noqa: E731
        explanation = lookup(("explanation", "reasoning", "rationale"))[1]
    else:  # not JSON: read the fields one by one, keep the whole reply as the explanation
        lookup = lambda keys: _loose_field(text, keys)  # noqa: E731
        explanation = None
    explanation = explanation.strip() if isinstance(explanation, str) else text
    return JudgeScore(
        overall=_scale(lookup(OVERALL_KEYS)[1], 1, 7),
        hallucination=_flag(lookup(HALLUCINATION_KEYS)[1]),
        adherence=_scale(lookup(ADHERENCE_KEYS)[1], 1, 7),
        explanation=explanation,
    )


def _verdict(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    word = re.sub(r"[\[\]\"'.*]", "", value).strip().lower()
    word = re.sub(r"^(summary|response|option)\s+", "", word)
    if word in ("a", "b"):
        return word
    if word in ("tie", "equal", "both", "neither", "draw", "c"):
        return "tie"
    return None


def parse_preference(reply: str | None) -> tuple[str | None, str]:
    """A pairwise reply -> ("a" | "b" | "tie" | None, explanation)."""
    text = (reply or "").strip()
    objects = [obj for obj in _json_objects(text) if _lookup(obj, WINNER_KEYS)[0]]
    if objects:
        found, value = _lookup(objects[-1], WINNER_KEYS)
        explanation = _lookup(objects[-1], ("explanation", "reasoning", "rationale"))[1]
    else:
        found, value = _loose_field(text, WINNER_KEYS)
        if not found:  # MT-Bench style "[[A]]"
            match = re.search(r"\[\[\s*(A|B|C|tie)\s*\]\]", text, re.IGNORECASE)
            value = match.group(1) if match else None
        explanation = None
    return _verdict(value), explanation.strip() if isinstance(explanation, str) else text


# ---------------------------------------------------------------------------------------------
# the OpenAI-compatible judge


def _message_content(body: dict) -> dict:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponseError(f"the chat completion has no choices: {str(body)[:200]}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if content is not None and not isinstance(content, str):
        raise MalformedResponseError(f"choices[0].message.content is not a string: {str(content)[:200]}")
    return {"content": content or "", "finish_reason": choices[0].get("finish_reason")}


class OpenAIJudge:
    """The rubric judge over `/v1/chat/completions` of any OpenAI-compatible endpoint.

    `model` e.g. "gpt-4.1" (the paper's judge); `api_key_env` names the environment variable with
    the key (None: no auth). `temperature` None is not sent; `max_tokens` is sent as
    `max_completion_tokens` (None: not sent). `json_mode` sends response_format
    {"type": "json_object"} (OpenAI and vLLM support it; parsing does not need it). Other keyword
    arguments go to ApiClient (cache_dir, max_concurrency, timeout_s, retry, seed, sleep,
    azure_api_version, azure_deployment).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 temperature: float | None = 0.0, max_tokens: int | None = 512, json_mode: bool = False,
                 score_template: str = SCORE_TEMPLATE, prefer_template: str = PREFER_TEMPLATE,
                 **client_options: Any):
        check_generation(temperature, max_tokens, "the judge's")
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = json_mode
        self.score_template = score_template
        self.prefer_template = prefer_template
        self.client = ApiClient(base_url, api_key_env=api_key_env, **client_options)
        self.invalid_replies = 0
        self._invalid_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, client={self.client!r})"

    def config(self) -> dict[str, Any]:
        """What a run records about this judge (no secrets)."""
        return {"type": type(self).__name__, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "json_mode": self.json_mode, **self.client.config()}

    @property
    def usage(self):
        return self.client.usage

    # ------------------------------------------------------------------ public API

    def score(self, source: str, instruction: str, summary: str) -> JudgeScore:
        return self.score_many([(source, instruction, summary)])[0]

    def score_many(self, items: Sequence[tuple[str, str, str]]) -> list[JudgeScore]:
        """Scores of (source, instruction, summary) triples, requests run concurrently."""
        requests = []
        for source, instruction, summary in items:
            prompt = self.score_template.format(source=source, instruction=instruction, summary=summary)
            requests.append(self._request(SCORE_SYSTEM, prompt, "score"))
        scores = [parse_score(value["content"]) for value in self.client.map(requests)]
        self._count_invalid(sum(not s.valid for s in scores))
        return scores

    def prefer(self, source: str, instruction: str, a: str, b: str) -> str:
        return self.prefer_many([(source, instruction, a, b)])[0].winner

    def prefer_many(self, items: Sequence[tuple[str, str, str, str]]) -> list[Preference]:
        """Both-order pairwise verdicts of (source, instruction, a, b) items."""
        requests = []
        for source, instruction, a, b in items:
            for first, second in ((a, b), (b, a)):
                prompt = self.prefer_template.format(source=source, instruction=instruction, a=first, b=second)
                requests.append(self._request(PREFER_SYSTEM, prompt, "prefer"))
        values = self.client.map(requests)
        out = []
        for i in range(len(items)):
            first, first_explanation = parse_preference(values[2 * i]["content"])
            swapped, second_explanation = parse_preference(values[2 * i + 1]["content"])
            second = {"a": "b", "b": "a"}.get(swapped, swapped)  # the swapped order's "A" is b
            self._count_invalid((first is None) + (second is None))
            winner = first if first is not None and first == second else "tie"
            out.append(Preference(winner, first, second, (first_explanation, second_explanation)))
        return out

    # ------------------------------------------------------------------ internals

    def _request(self, system: str, user: str, kind: str) -> ApiRequest:
        params: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            **generation_params(self.temperature, self.max_tokens),
        }
        if self.json_mode:
            params["response_format"] = {"type": "json_object"}
        return ApiRequest("chat.completions", params, _message_content, cache_tag={"judge": f"{kind}/v1"})

    def _count_invalid(self, count: int) -> None:
        with self._invalid_lock:
            self.invalid_replies += count


# ---------------------------------------------------------------------------------------------
# command line


def add_judge_arguments(parser) -> None:
    """`--judge-temperature`, `--judge-max-tokens`, `--judge-json-mode` (see the module docstring)."""
    group = parser.add_argument_group("judge requests")
    group.add_argument("--judge-temperature", type=optional_temperature, default=0.0, metavar="T|none",
                       help="the judge's temperature (default 0); none sends none (reasoning models: o-series, GPT-5)")
    group.add_argument("--judge-max-tokens", type=optional_max_tokens, default=512, metavar="N|none",
                       help="the judge's reply limit, sent as max_completion_tokens (default 512; a reasoning "
                            "model's hidden reasoning counts too: give it thousands); none sends no limit")
    group.add_argument("--judge-json-mode", action="store_true",
                       help='ask for response_format {"type": "json_object"}')


def judge_request_options(args) -> dict[str, Any]:
    """OpenAIJudge keyword arguments from `add_judge_arguments`' options."""
    return {"temperature": args.judge_temperature, "max_tokens": args.judge_max_tokens,
            "json_mode": args.judge_json_mode}
