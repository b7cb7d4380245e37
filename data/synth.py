"""Synthetic SFT data from transcripts with a strong text LLM (paper section 2.1).

    python -m data.synth --manifest in.jsonl --out out.jsonl --llm gpt-4.1 [--base-url URL] \
        [--propose-temperature 1.0|none] [--summary-temperature 0.3|none] [--max-tokens 4096|none]

For each recording with a transcript:
  1. the LLM proposes `--candidates` (default 8) summarization queries as JSON, each with a
     style and an importance score 1-10 (data/synth_prompts.py `PROPOSE_TEMPLATE`);
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

Output rows, the rejected file, resuming, the statistics and the request parameters:
docs/synth.md. The prompts and the parsing of the replies: data/synth_prompts.py; the
crash-safe JSON-lines rows: data/jsonl_rows.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from api.client import ApiClient, ApiError, ApiRequest, EndpointError, MalformedResponseError
from api.options import (add_client_arguments, check_generation, client_options, generation_params,
                         optional_max_tokens, optional_temperature)
from model.errors import report_error

from .jsonl_rows import append_rows, read_rows
from .manifest import DataError, ManifestEntry, read_manifest
from .synth_prompts import (PROMPT_VERSION, PROPOSE_SYSTEM, PROPOSE_TEMPLATE, QUERY_STYLES, SUMMARY_SYSTEM,
                            SUMMARY_TEMPLATE, Candidate, choose, parse_candidates)

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 7
DEFAULT_CANDIDATES = 8


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
