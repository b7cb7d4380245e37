"""What data.synth asks the text LLM, and how its answers are read.

Two requests per recording: PROPOSE_* asks for candidate summarization requests in seven
styles, each with an importance score from 1 to 10, as one JSON object; SUMMARY_* asks for the
reference answer to one chosen request, from the transcript alone. `parse_candidates` reads a
proposal reply leniently (code fences, prose around the JSON, style-name variants) and
`choose` keeps the candidates at or above the threshold, without repeats, and draws the
requests per recording with a generator seeded by (seed, recording id). PROMPT_VERSION is part
of every cache key: change it when the prompts change.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Sequence

from api.client import MalformedResponseError

QUERY_STYLES = ("short", "bullets", "json", "email", "length_limit", "part_question", "other")
STYLE_ALIASES = {"bullet": "bullets", "bullet_points": "bullets", "list": "bullets", "e_mail": "email",
                 "mail": "email", "length": "length_limit", "limit": "length_limit", "question": "part_question",
                 "brief": "short", "structured": "json"}
PROMPT_VERSION = "synth/v1"  # part of every cache key: change it when the prompts change

PROPOSE_SYSTEM = (
    "You design instruction data for a model that listens to recordings (meetings, lectures, podcasts, "
    "interviews) and answers requests about them. You answer only with the JSON object you are asked for."
)

PROPOSE_TEMPLATE = """Below is the transcript of a recording. Propose {count} different requests that a user could make of an assistant that has listened to this recording and must answer from it alone. Each request asks for a summary of the recording or for information drawn from it. Vary the form across these styles:
- short: a brief summary in one to three sentences
- bullets: a bulleted list (key points, decisions, action items, open questions)
- json: structured output as JSON with the fields the request names
- email: a summary written as an e-mail to someone who missed the recording
- length_limit: a summary under an explicit limit (a number of words, sentences or bullets)
- part_question: a question about one part of the recording (a topic, a speaker, a stretch of time)
- other: any other useful summarization request

Write each request as a user would, in one or two sentences, without quoting the transcript at length. Rate the importance of each request from 1 to 10: how useful, natural and answerable from this recording it is as a summarization task (10: central to the recording and clearly answerable; 1: trivial, off-topic, or not answerable from the transcript).

<transcript>
{transcript}
</transcript>

Answer with one JSON object and nothing else:
{{"queries": [{{"query": "...", "style": "short | bullets | json | email | length_limit | part_question | other", "importance": <1-10>}}]}}"""

SUMMARY_SYSTEM = (
    "You write reference answers for requests about recordings. You have listened to the recording; "
    "its transcript is your only source."
)

SUMMARY_TEMPLATE = """Below is the transcript of a recording and a request from a user about it. Write the response the user asked for.

Follow the request's format, content and length exactly (bullets, JSON, e-mail, word or sentence limits). Where the request sets no length, be thorough: cover every relevant point with its details (names, numbers, decisions and their reasons) rather than a one-line gist. State only what the transcript supports: do not invent names, numbers or events. Do not mention the transcript; write as someone who heard the recording. Answer with the response alone, without a preamble.

<transcript>
{transcript}
</transcript>

<request>
{query}
</request>"""


@dataclass(frozen=True)
class Candidate:
    query: str
    style: str
    importance: float


def parse_candidates(content: str) -> tuple[list[Candidate], int]:
    """(valid candidates, items in the reply) from a proposal reply.

    Tolerates code fences and prose around the JSON object; items without a non-empty query or
    with an importance that is not a number in [1, 10] are dropped; common style names are mapped
    onto QUERY_STYLES ("bullet points" -> bullets, "e-mail" -> email), others become "other".
    MalformedResponseError (retried by the client) when no JSON list of queries is found.
    """
    items = _queries_list(content)
    if items is None:
        raise MalformedResponseError(f"no JSON object with a list of queries in the reply: {content[:200]!r}")
    valid = []
    for item in items:
        if not isinstance(item, dict):
            continue
        query, importance = item.get("query"), item.get("importance")
        if isinstance(importance, str):
            match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", importance)
            importance = float(match.group(1)) if match else None
        if not isinstance(query, str) or not query.strip() or isinstance(importance, bool):
            continue
        if not isinstance(importance, (int, float)) or not 1 <= importance <= 10:
            continue
        style = str(item.get("style", "")).strip().lower().replace("-", "_").replace(" ", "_")
        style = STYLE_ALIASES.get(style, style)
        valid.append(Candidate(" ".join(query.split()), style if style in QUERY_STYLES else "other", float(importance)))
    return valid, len(items)


def _queries_list(content: str) -> list | None:
    """The "queries" list of the last JSON object that has one (or the first bare JSON list)."""
    decoder = json.JSONDecoder()
    position, found, bare = 0, None, None
    while (match := re.compile(r"[\[{]").search(content, position)) is not None:
        try:
            value, position = decoder.raw_decode(content, match.start())
        except ValueError:
            position = match.start() + 1
            continue
        if isinstance(value, dict) and isinstance(value.get("queries"), list):
            found = value["queries"]
        elif isinstance(value, list) and bare is None:
            bare = value
    return found if found is not None else bare


def choose(candidates: Sequence[Candidate], *, threshold: float, count: int, seed: int, recording_id: str
           ) -> tuple[list[Candidate], int]:
    """(chosen, kept): drop scores below `threshold` and repeats, then draw `count` at random.

    The generator is seeded by (seed, recording id) only: the same recording always gets the
    same queries, whatever the order or the concurrency of the run.
    """
    survivors, seen = [], set()
    for candidate in candidates:
        key = candidate.query.casefold()
        if candidate.importance >= threshold and key not in seen:
            seen.add(key)
            survivors.append(candidate)
    rng = random.Random(f"{seed}:{recording_id}")
    return rng.sample(survivors, min(count, len(survivors))), len(survivors)
