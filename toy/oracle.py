"""The oracle judge of the toy world: scores 1-7 computed from the meeting record, no LLM.

    judge = OracleJudge()
    judge.score(source, instruction, summary)   # JudgeScore(overall=7.0, hallucination=0, adherence=7.0, ...)
    judge.prefer(source, instruction, a, b)     # "a" | "b" | "tie"

It stands in for GPT-4.1 in both of its roles in the paper: the evaluation judge (section 3.4)
and the DPO preference judge (section 2.3; ties are dropped by eval/preferences.py). It
implements `eval.judge.Judge`. `source` is the manifest field `judge_source` of the toy world
(toy/corpus.py): a JSON object {"meeting": <record>, "task": {"family", "params"}}. The
instruction text is not read: the task's family and parameters are in `source`, so the judge
does not depend on the phrasing (the shifted test split phrases instructions differently).

Text is normalised before matching: lower case, digit-group commas dropped ("4,500" -> "4500"),
every other non-alphanumeric character a space, a leading "the" dropped from atoms and
entities, and an atom is mentioned when it occurs as a whole-word phrase.

Terms (all in [0, 1]):
  facts      F = toy.tasks.facts(record, task): the record's items the instruction asks
             for; each item is a tuple of atoms (an action item: owner, task, deadline).
  recall     R = mean over F of (atoms of the item mentioned / atoms of the item); 1 if F is empty.
  entities   E = the entities of the toy universe (toy.world.ENTITY_POOLS: names, topics,
             decisions, tasks, weekdays, months, cities) and digit runs found in the summary,
             distinct; E_bad = those that do not occur in the meeting (hallucinations).
  precision  P = 1 - |E_bad| / |E|; 1 if E is empty.
  format     C = compliance with toy.tasks.spec(task).format:
               prose:   0 if the summary is JSON, 0.5 if it has bullet lines, else 1;
               bullets: the fraction of non-empty lines that are bullets ("-", "*", "•", "1." or "1)");
               json:    the fraction of the asked keys present in the parsed JSON object
                        (code fences allowed); 0 if it does not parse to an object;
               email:   0.5 for a greeting on the first line (hi, hello, dear, hey, good morning)
                        + 0.5 for a sign-off in the last three lines (best, regards, thanks,
                        thank you, cheers, sincerely);
               list, any: 1.
  length     L = min(2, 2 (words - max_words) / max_words) when the spec has a word limit and
             the summary has more words (whitespace-separated), else 0.
  repetition Q = 1 - distinct word 4-grams / word 4-grams of the normalised summary (0 if it
             has fewer than four words).
  hallucination H = 1 if E_bad is non-empty, else 0.

  overall   = clip(1 + 6 R P - 3 (1 - C) - L - min(3, 6 Q) - H, 1, 7), rounded to 0.01;
  adherence = clip(1 + 6 C - L, 1, 7), rounded to 0.01;
  an empty (blank) summary scores overall 1, adherence 1, hallucination 0.

So the reference (toy.tasks.reference: every fact, the asked format, nothing invented, no
repeated 4-gram) scores exactly 7; a wrong format costs up to 3 points, a hallucinated entity at
least 1, heavy repetition up to 3. Preferences compare `overall`; equal scores are a "tie".
Deterministic: no randomness, no state.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from data.text import repeated_ngram_fraction
from eval.judge import JudgeScore, Preference

from .tasks import Spec, Task, facts, spec
from .world import ENTITY_POOLS, Meeting

BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
GREETING = re.compile(r"^\s*(hi|hello|dear|hey|good morning|good afternoon)\b", re.IGNORECASE)
SIGN_OFF = re.compile(r"^\s*(best|regards|kind regards|thanks|thank you|cheers|sincerely)\b", re.IGNORECASE)


def normalize(text: str) -> str:
    """Lower case, digit groups joined, non-alphanumerics as spaces, single spaces, no padding."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def _key(phrase: str) -> str:
    words = normalize(phrase).split()
    return " ".join(words[1:] if len(words) > 1 and words[0] == "the" else words)


@lru_cache(maxsize=1)
def _universe() -> tuple[str, ...]:
    return tuple(sorted({_key(item) for pool in ENTITY_POOLS.values() for item in pool}))


@dataclass(frozen=True)
class OracleScore:
    """The terms of the formula (module docstring) and the resulting scores."""

    overall: float
    adherence: float
    recall: float
    precision: float
    format: float
    length_penalty: float
    repetition: float
    hallucinated: tuple[str, ...]  # normalised entities not in the meeting
    missing: tuple[str, ...]  # atoms of the asked facts that were not mentioned
    words: int

    @property
    def hallucination(self) -> int:
        return int(bool(self.hallucinated))

    def explanation(self) -> str:
        return (f"recall {self.recall:.2f}, precision {self.precision:.2f}, format {self.format:.2f}, "
                f"length penalty {self.length_penalty:.2f} ({self.words} words), repetition {self.repetition:.2f}; "
                f"hallucinated: {', '.join(self.hallucinated) or 'none'}; missing: {', '.join(self.missing) or 'none'}")


def parse_source(source: str) -> tuple[Meeting, Task]:
    """`judge_source` -> (record, task); a clear error when it is not the toy world's."""
    try:
        payload = json.loads(source)
        return Meeting.from_dict(payload["meeting"]), Task.from_dict(payload["task"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            "OracleJudge needs the toy world's judge_source: a JSON object {\"meeting\": ..., \"task\": ...} "
            f"(the manifest field judge_source written by toy.corpus); got {source[:80]!r}: {error}"
        ) from error


def _mentioned(haystack: str, phrase: str) -> bool:
    key = _key(phrase)
    return bool(key) and f" {key} " in haystack


def _format_score(summary: str, task_spec: Spec) -> float:
    lines = [line for line in summary.splitlines() if line.strip()]
    kind = task_spec.format
    if kind == "prose":
        if _json_object(summary) is not None:
            return 0.0
        return 0.5 if any(BULLET.match(line) for line in lines) else 1.0
    if kind == "bullets":
        return sum(bool(BULLET.match(line)) for line in lines) / len(lines)
    if kind == "json":
        parsed = _json_object(summary)
        if not isinstance(parsed, dict):
            return 0.0
        keys = task_spec.json_keys
        return sum(key in parsed for key in keys) / len(keys) if keys else 1.0
    if kind == "email":
        greeting = bool(GREETING.match(lines[0]))
        sign_off = any(SIGN_OFF.match(line) for line in lines[-3:])
        return 0.5 * greeting + 0.5 * sign_off
    return 1.0


def _json_object(summary: str):
    text = summary.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def analyze(meeting: Meeting, task: Task, summary: str) -> OracleScore:
    """Every term of the formula for one summary (module docstring)."""
    words = len(summary.split())
    if not summary.strip():
        return OracleScore(1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, (), (), 0)
    normalized = normalize(summary)
    haystack = f" {normalized} "
    items = facts(meeting, task)
    missing = [atom for item in items for atom in item if not _mentioned(haystack, atom)]
    recall = (sum(sum(_mentioned(haystack, atom) for atom in item) / len(item) for item in items) / len(items)
              if items else 1.0)

    real = {_key(entity) for entity in meeting.entities()}
    found = {entity for entity in _universe() if f" {entity} " in haystack}
    found |= set(re.findall(r"\d+", normalized))
    hallucinated = tuple(sorted(found - real))
    precision = 1.0 - len(hallucinated) / len(found) if found else 1.0

    task_spec = spec(task)
    format_score = _format_score(summary, task_spec)
    limit = task_spec.max_words
    length_penalty = min(2.0, 2.0 * (words - limit) / limit) if limit and words > limit else 0.0
    repetition = repeated_ngram_fraction(normalized.split())  # data.text's measure, on the judge's words
    raw = (1 + 6 * recall * precision - 3 * (1 - format_score) - length_penalty - min(3.0, 6 * repetition)
           - (1 if hallucinated else 0))
    return OracleScore(
        overall=round(min(7.0, max(1.0, raw)), 2),
        adherence=round(min(7.0, max(1.0, 1 + 6 * format_score - length_penalty)), 2),
        recall=recall, precision=precision, format=format_score, length_penalty=length_penalty,
        repetition=repetition, hallucinated=hallucinated, missing=tuple(missing), words=words,
    )


class OracleJudge:
    """`eval.judge.Judge` computed from the toy world's record (formula in the module docstring)."""

    def details(self, source: str, instruction: str, summary: str) -> OracleScore:
        meeting, task = parse_source(source)
        return analyze(meeting, task, summary or "")

    def score(self, source: str, instruction: str, summary: str) -> JudgeScore:
        result = self.details(source, instruction, summary)
        return JudgeScore(overall=result.overall, hallucination=result.hallucination,
                          adherence=result.adherence, explanation=result.explanation())

    def prefer(self, source: str, instruction: str, a: str, b: str) -> str:
        score_a = self.score(source, instruction, a).overall
        score_b = self.score(source, instruction, b).overall
        return "tie" if score_a == score_b else ("a" if score_a > score_b else "b")

    def prefer_many(self, items) -> list[Preference]:
        """`OpenAIJudge.prefer_many`'s form for eval.preferences: the oracle has no position bias,
        so both orders give the same verdict (ties stay ties)."""
        out = []
        for source, instruction, a, b in items:
            score_a = self.score(source, instruction, a).overall
            score_b = self.score(source, instruction, b).overall
            verdict = "tie" if score_a == score_b else ("a" if score_a > score_b else "b")
            why = f"oracle score a {score_a:.2f}, b {score_b:.2f}"
            out.append(Preference(verdict, verdict, verdict, (why, why)))
        return out
