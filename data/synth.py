"""Synthetic SFT data from transcripts with a strong text LLM (paper section 2.1).

    python -m data.synth --manifest in.jsonl --out out.jsonl --llm gpt-4.1 [--base-url URL] \
        [--propose-temperature 1.0|none] [--summary-temperature 0.3|none] [--max-tokens 4096|none]

For each recording with a transcript:
  1. the LLM proposes `--candidates` (default 8) summarization queries as JSON, each with a
     style and an importance score 1-10 (`PROPOSE_TEMPLATE`);
  2. queries scored below `--threshold` are dropped (default 7: the LLM's "useful, natural and
     answerable" upper range; the paper says only that low-scoring queries are dropped), as are
     repeats of a query already kept for this recording (case and spacing ignored); then
     `--queries-per-recording` (default 1) of the survivors are drawn at random without
     replacement, from a generator seeded by (--seed, recording id), so the draw does not
     depend on the order, the concurrency or a resume;
  3. the LLM writes the reference summary of (transcript, query) (`SUMMARY_TEMPLATE`). It is
     asked to be thorough where the query sets no length: the paper's summaries are about 3x
     longer than the Phi-4MM baseline data.
Query styles: short, bullets, json, email, length_limit (a word / sentence / bullet limit),
part_question (a question about one part of the recording), other.

Output: one manifest row per chosen query (data/manifest.py, readable by the SFT dataset):
the recording's fields with `instruction` = the query and `summary` = the reference,
`audio_filepath` relative to the output's folder, `id` = the recording id (`{id}/q1`, `{id}/q2`,
... when more than one query was chosen for it), and a `synth` record: source_id, query_index, queries_chosen,
style, importance, and the recording's proposal counts (proposed, valid, kept). Recordings
without a surviving query go to `{out}.rejected.jsonl` with the same counts.

Resumable and crash-safe: rows are appended and fsync'ed one recording at a time; on start, a
torn last line and the rows of a recording with fewer rows than its `queries_chosen` are
removed, and recordings present in either file are skipped. Requests go through the shared
client (api.client.ApiClient): retries with backoff, an on-disk cache (`--cache-dir`,
default `{out}.cache`), so an interrupted recording re-asks nothing that was answered,
bounded concurrency (`--concurrency`). A recording whose requests exhaust their retries is
counted as failed and left for the next run; more than `--max-failures` stop the run; a
request the server refuses (HTTP 4xx, e.g. an unknown model) stops it at once.

At the end the statistics over the whole output (resumed rows included) are printed and
returned (`run`): acceptance rate of proposed queries, the style mix of the chosen queries,
summary lengths in words, and the client's usage.

Request parameters: the proposal is sampled at `--propose-temperature` (default 1.0: varied
queries), the summary at `--summary-temperature` (default 0.3: close to the transcript);
`none` sends no temperature, as reasoning models (o-series, GPT-5) require, which accept only
their default. `--max-tokens` (default 4096) is sent as `max_completion_tokens` (it bounds a
reasoning model's hidden reasoning too); `none` sends no limit. These parameters are part of
every request and so of its cache key: a changed value asks again instead of reusing a cached
reply. A classic Azure OpenAI deployment is reached with `--azure-api-version` /
`--azure-deployment` or a base URL with `?api-version=` (docs/api-client.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import statistics
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from api.client import ApiClient, ApiError, ApiRequest, EndpointError, MalformedResponseError
from api.options import (add_client_arguments, check_generation, client_options, generation_params,
                         optional_max_tokens, optional_temperature)
from model.errors import report_error

from .manifest import DataError, ManifestEntry, read_manifest

logger = logging.getLogger(__name__)

QUERY_STYLES = ("short", "bullets", "json", "email", "length_limit", "part_question", "other")
STYLE_ALIASES = {"bullet": "bullets", "bullet_points": "bullets", "list": "bullets", "e_mail": "email",
                 "mail": "email", "length": "length_limit", "limit": "length_limit", "question": "part_question",
                 "brief": "short", "structured": "json"}
DEFAULT_THRESHOLD = 7
DEFAULT_CANDIDATES = 8
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


@dataclass(frozen=True)
class SynthConfig:
    model: str
    threshold: float = DEFAULT_THRESHOLD
    candidates: int = DEFAULT_CANDIDATES
    queries_per_recording: int = 1
    seed: int = 0
    propose_temperature: float | None = 1.0  # None: not sent (reasoning models)
    summary_temperature: float | None = 0.3
    max_tokens: int | None = 4096  # sent as max_completion_tokens; None: not sent
    max_failures: int = 20

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.queries_per_recording < 1:
            raise ValueError("candidates and queries_per_recording must be >= 1")
        check_generation(self.propose_temperature, None, "the proposal's")
        check_generation(self.summary_temperature, self.max_tokens, "the summary's")
        if not 1 <= self.threshold <= 10:
            raise ValueError(f"threshold must lie in [1, 10] (importance scores are 1-10), got {self.threshold}")


@dataclass
class Proposal:
    """One recording's proposal: the valid candidates and the counts for the statistics."""

    candidates: list[Candidate]
    proposed: int  # items in the reply
    kept: int  # valid, at or above the threshold, not a repeat


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


class Synthesizer:
    """The two LLM calls of one recording, through the shared client."""

    def __init__(self, client: ApiClient, config: SynthConfig):
        self.client, self.config = client, config

    def propose(self, transcript: str) -> Proposal:
        prompt = PROPOSE_TEMPLATE.format(count=self.config.candidates, transcript=transcript)
        value = self.client.call(self._request(PROPOSE_SYSTEM, prompt, self.config.propose_temperature, "propose",
                                               _extract_candidates))
        candidates = [Candidate(**c) for c in value["candidates"]]
        return Proposal(candidates, value["proposed"], 0)

    def summarize(self, transcript: str, query: str) -> str:
        prompt = SUMMARY_TEMPLATE.format(transcript=transcript, query=query)
        return self.client.call(self._request(SUMMARY_SYSTEM, prompt, self.config.summary_temperature, "summary",
                                              _extract_summary))

    def process(self, entry: ManifestEntry) -> tuple[list[tuple[Candidate, str]], Proposal]:
        proposal = self.propose(entry.transcript)
        chosen, proposal.kept = choose(proposal.candidates, threshold=self.config.threshold,
                                       count=self.config.queries_per_recording, seed=self.config.seed,
                                       recording_id=entry.id)
        return [(candidate, self.summarize(entry.transcript, candidate.query)) for candidate in chosen], proposal

    def _request(self, system: str, user: str, temperature: float | None, kind: str, extract) -> ApiRequest:
        params = {"model": self.config.model, **generation_params(temperature, self.config.max_tokens),
                  "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        return ApiRequest("chat.completions", params, extract, cache_tag={"synth": kind, "version": PROMPT_VERSION})


def _content(body: dict) -> str:
    choices = body.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise MalformedResponseError(f"the chat completion has no message content: {str(body)[:200]}")
    return content


def _extract_candidates(body: dict) -> dict:
    candidates, proposed = parse_candidates(_content(body))
    return {"candidates": [c.__dict__ for c in candidates], "proposed": proposed}


def _extract_summary(body: dict) -> str:
    text = _content(body).strip()
    if not text:
        raise MalformedResponseError("the summary is empty")
    return text


# ---------------------------------------------------------------------------------------------
# output files, resume


def output_rows(entry: ManifestEntry, results: list[tuple[Candidate, str]], proposal: Proposal, out_dir: Path
                ) -> list[dict[str, Any]]:
    rows = []
    for index, (candidate, summary) in enumerate(results):
        row = entry.to_json()
        row["audio_filepath"] = os.path.relpath(entry.audio_path, out_dir)
        row["id"] = entry.id if len(results) == 1 else f"{entry.id}/q{index + 1}"
        row["instruction"], row["summary"] = candidate.query, summary
        row["synth"] = {"source_id": entry.id, "query_index": index, "queries_chosen": len(results),
                        "style": candidate.style, "importance": candidate.importance, **_counts(proposal)}
        rows.append(row)
    return rows


def _counts(proposal: Proposal) -> dict[str, int]:
    return {"proposed": proposal.proposed, "valid": len(proposal.candidates), "kept": proposal.kept}


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append JSON lines in one write, flushed and fsync'ed (a crash tears at most the last line)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def read_rows(path: Path, complete: Callable[[list[dict]], bool] | None = None, key: str = "id") -> list[dict]:
    """The rows of an append-only JSON-lines file, repairing what a crash can leave behind.

    A torn last line (no newline, or not JSON) is dropped; with `complete`, the rows are grouped
    by `key` and groups for which `complete(rows)` is False are dropped too. The file is
    rewritten (atomically) only when something was dropped.
    """
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    torn = lines[-1].strip() != b""  # an append cut short: the text after the last newline
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{path}:{number}: not valid JSON; the file was edited or written by something "
                             "else: fix or remove that line") from None
    kept = rows
    if complete is not None:
        groups: dict[Any, list[dict]] = {}
        for row in rows:
            groups.setdefault(_dig(row, key), []).append(row)
        kept = [row for row in rows if complete(groups[_dig(row, key)])]
    if torn or len(kept) != len(rows):
        logger.warning("%s: removed %d incomplete row(s) left by an interrupted run", path,
                       len(rows) - len(kept) + int(torn))
        from model.safeio import atomic_write_text

        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    return kept


def _dig(row: dict, dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _complete_recording(rows: list[dict]) -> bool:
    return len(rows) == rows[0]["synth"]["queries_chosen"]


# ---------------------------------------------------------------------------------------------
# the run


def run(manifests: Sequence[str | Path], out: str | Path, client: ApiClient, config: SynthConfig, *,
        strict: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Synthesize `out` from `manifests` (resuming), print and return the statistics."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rejected_path = out.with_name(out.name + ".rejected.jsonl")
    report = read_manifest(manifests, require=("transcript",), max_duration=None)
    for issue in report.issues:
        log(str(issue))
    if strict and report.errors:
        raise DataError(report.errors)
    done = {row["synth"]["source_id"] for row in read_rows(out, _complete_recording, key="synth.source_id")}
    done |= {row["id"] for row in read_rows(rejected_path)}
    todo = [entry for entry in report.entries if entry.id not in done]
    run_stats = Counter(recordings=len(report.entries), invalid_lines=len({(i.file, i.line) for i in report.errors}),
                        resumed=len(report.entries) - len(todo))
    synthesizer = Synthesizer(client, config)
    workers = client.max_concurrency
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: dict = {}
        queue = iter(todo)
        try:
            while True:
                while len(pending) < 2 * workers and (entry := next(queue, None)) is not None:
                    pending[pool.submit(synthesizer.process, entry)] = entry
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    entry = pending.pop(future)
                    try:
                        results, proposal = future.result()
                    except EndpointError:
                        raise
                    except ApiError as error:
                        run_stats["failed"] += 1
                        log(f"{entry.where}: recording {entry.id!r} failed, left for the next run: {error}")
                        if run_stats["failed"] > config.max_failures:
                            raise ApiError(f"more than {config.max_failures} recordings failed; stopping "
                                           "(rerun to resume, or raise --max-failures)") from None
                        continue
                    run_stats["processed"] += 1
                    if results:
                        append_rows(out, output_rows(entry, results, proposal, out.parent))
                    else:
                        append_rows(rejected_path, [{"id": entry.id, "reason": "no query at or above the threshold",
                                                     **_counts(proposal)}])
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    stats = statistics_of(out, rejected_path, config.threshold)
    stats["run"] = dict(run_stats)
    stats["usage"] = client.usage.as_dict()
    log(format_statistics(stats))
    return stats


def statistics_of(out: Path, rejected_path: Path, threshold: float) -> dict[str, Any]:
    """Statistics over the whole output (see the module docstring)."""
    rows = read_rows(out)
    rejected = read_rows(rejected_path)
    firsts = [row["synth"] for row in rows if row["synth"]["query_index"] == 0] + rejected
    proposed = sum(r["proposed"] for r in firsts)
    kept = sum(r["kept"] for r in firsts)
    styles = Counter(row["synth"]["style"] for row in rows)
    words = [len(row["summary"].split()) for row in rows]
    return {
        "recordings_written": len(firsts) - len(rejected),
        "recordings_rejected": len(rejected),
        "rows": len(rows),
        "threshold": threshold,
        "queries_proposed": proposed,
        "queries_valid": sum(r["valid"] for r in firsts),
        "queries_kept": kept,
        "acceptance_rate": kept / proposed if proposed else 0.0,
        "style_mix": {style: styles[style] for style in QUERY_STYLES if styles[style]},
        "summary_words": {
            "mean": statistics.fmean(words) if words else 0.0,
            "median": statistics.median(words) if words else 0.0,
            "p90": sorted(words)[int(0.9 * (len(words) - 1))] if words else 0,
            "min": min(words, default=0),
            "max": max(words, default=0),
        },
    }


def format_statistics(stats: dict[str, Any]) -> str:
    run_stats, usage, words = stats.get("run", {}), stats.get("usage", {}), stats["summary_words"]
    rows = max(1, stats["rows"])
    mix = ", ".join(f"{style} {count} ({count / rows:.0%})" for style, count in stats["style_mix"].items())
    return "\n".join([
        f"recordings: {run_stats.get('recordings', 0)} in the manifest, {run_stats.get('resumed', 0)} done before, "
        f"{run_stats.get('processed', 0)} processed now, {run_stats.get('failed', 0)} failed, "
        f"{run_stats.get('invalid_lines', 0)} invalid lines",
        f"output: {stats['rows']} rows from {stats['recordings_written']} recordings; "
        f"{stats['recordings_rejected']} recordings without a query scoring >= {stats['threshold']:g}",
        f"queries: {stats['queries_proposed']} proposed, {stats['queries_valid']} valid, {stats['queries_kept']} kept: "
        f"acceptance rate {stats['acceptance_rate']:.1%}",
        f"query styles: {mix or 'none'}",
        f"summary words: mean {words['mean']:.1f}, median {words['median']:g}, p90 {words['p90']}, "
        f"min {words['min']}, max {words['max']}",
        f"requests: {usage.get('requests', 0)} sent, {usage.get('retries', 0)} retried, "
        f"{usage.get('cache_hits', 0)} cache hits; tokens {usage.get('prompt_tokens', 0)} in, "
        f"{usage.get('completion_tokens', 0)} out",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", nargs="+", required=True, help="manifests with transcripts")
    parser.add_argument("--out", required=True, help="output manifest (JSON lines), appended to and resumed")
    parser.add_argument("--llm", required=True, help="the LLM's model name, e.g. gpt-4.1")
    add_client_arguments(parser)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="lowest importance kept (1-10)")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="queries proposed per recording")
    parser.add_argument("--queries-per-recording", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-failures", type=int, default=20)
    parser.add_argument("--propose-temperature", type=optional_temperature, default=1.0, metavar="T|none",
                        help="temperature of the query proposals (default 1.0); none sends none (reasoning models)")
    parser.add_argument("--summary-temperature", type=optional_temperature, default=0.3, metavar="T|none",
                        help="temperature of the reference summaries (default 0.3); none sends none")
    parser.add_argument("--max-tokens", type=optional_max_tokens, default=4096, metavar="N|none",
                        help="reply limit of each request, sent as max_completion_tokens (default 4096); "
                             "none sends no limit")
    parser.add_argument("--strict", action="store_true", help="stop on an invalid manifest line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = SynthConfig(args.llm, threshold=args.threshold, candidates=args.candidates,
                             queries_per_recording=args.queries_per_recording, seed=args.seed,
                             max_failures=args.max_failures, propose_temperature=args.propose_temperature,
                             summary_temperature=args.summary_temperature, max_tokens=args.max_tokens)
        client = ApiClient(args.base_url, **client_options(args, f"{args.out}.cache"))
        stats = run(args.manifest, args.out, client, config, strict=args.strict)
    except (ApiError, ValueError, OSError) as error:
        return report_error("data.synth", error)
    return 1 if stats["run"].get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
