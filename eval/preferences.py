"""DPO preference pairs from the student's own samples and a pairwise LLM judge (paper section 2.3).

    python -m eval.preferences --checkpoint DIR --manifest in.jsonl --judge gpt-4.1 --out pairs.jsonl \
        [--base-url URL] [--api-key-env NAME] [--batch-size 4] [--max-new-tokens 512] [--temperature 1.0] \
        [--judge-temperature 0|none] [--judge-max-tokens 512|none] [--judge-json-mode] \
        [--azure-api-version V] [--azure-deployment NAME]

For each manifest row (audio, instruction, transcript):
  1. the student (the KD checkpoint) samples two responses to (audio, instruction):
     `rollout.generate(..., SamplingParams(num_samples=2))`, in batches of `--batch-size`
     recordings taken in manifest order. A batch's sampling seed is --seed plus the manifest
     position of its first recording, so a resumed run that forms the same batch samples the
     same responses (and finds the judge's answers in the cache);
  2. identical responses are dropped ("identical") without asking the judge;
  3. the judge (`eval.judge.OpenAIJudge.prefer_many`, the transcript as the source) compares the
     two in both orders, (a, b) and (b, a), to cancel position bias. A pair is kept only when
     both orders name the same winner; a "tie" in either order drops it ("tie"), two different
     winners drop it ("disagreement"), an unusable reply drops it ("invalid").
Kept pairs go to `--out`: the recording's manifest fields (`audio_filepath` relative to the
output's folder, `duration`, `offset`, `id`, `lang`, `transcript`, `instruction`), then
`prompt` (see below), `chosen` / `rejected` (texts), `chosen_token_ids` / `rejected_token_ids`
(the sampled ids, EOS included when the sample stopped; what DPO should score), `chosen_finished` /
`rejected_finished` (the sample ended with an EOS rather than at --max-new-tokens), `judge`
(model, and per order the responses as shown, the verdict and the judge's explanation) and
`sampling`. The file is a manifest that `data.dataset.ManifestDataset(task="pairs")` trains on.

TRL's preference format. `prompt`, `chosen` and `rejected` are also the three fields of TRL's
standard (not conversational) preference rows, with an explicit prompt: without `prompt`, TRL
would silently take the common prefix of the two answers as the prompt. `prompt` is the
instruction text exactly as the student was given it: no chat template, no audio placeholder
tokens, no transcript (the student hears the audio, it does not read a transcript). The audio
stays in its own fields, `audio_filepath` (relative to the pairs file's folder), `offset` and
`duration`, for a trainer that feeds it; a text-only trainer that wants the transcript builds
its prompt from `transcript`. `chosen` / `rejected` are the completions alone, as TRL's
explicit-prompt rows have them; they and the token ids that this project's DPO reads are the
same as without the `prompt` field.

Dropped recordings go to `{out}.dropped.jsonl` with the reason, both texts and the verdicts.

The judge's requests: `--judge-temperature` (default 0; `none` sends none, as reasoning models
require), `--judge-max-tokens` (default 512, sent as max_completion_tokens; `none` sends no
limit), `--judge-json-mode` (eval/judge.py). `--temperature` is the student's sampling
temperature, not the judge's. A classic Azure OpenAI deployment is reached with
`--azure-api-version` / `--azure-deployment` or a base URL with `?api-version=`
(docs/api-client.md).

Resumable: both files are append-only, fsync'ed per batch and repaired on start (a torn last
line is removed); recordings in either file are skipped. Judge requests go through the shared
client (api.client): retries, the on-disk cache (`--cache-dir`, default `{out}.cache`),
bounded concurrency. Recordings whose audio cannot be used or that do not fit the context are
skipped and counted (data/dataset.py), not written, so a later run retries them.

Statistics over the whole output (printed, and returned by `run`): tie, disagreement, invalid
and identical counts and rates, and chosen vs rejected: words, tokens, repetition
(data.text.repetition, the share of word 4-grams that repeat an earlier one: "- How to Get
Away - How to Get Away" scores high),
the share that stopped with an EOS.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from api.client import ApiError
from api.options import add_client_arguments, client_options
from data.audio import DurationPolicy
from data.batching import collate
from data.dataset import ManifestDataset
from data.manifest import DataError, ManifestEntry, read_manifest
from data.jsonl_rows import append_rows, read_rows
from data.text import repetition
from eval.judge import add_judge_arguments, judge_request_options
from model.errors import report_error

logger = logging.getLogger(__name__)

DROP_REASONS = ("identical", "tie", "disagreement", "invalid")


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 4


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    finished: bool  # ended with an EOS id


def classify(first: str | None, second: str | None) -> str:
    """"a" or "b" when both orders agree; else "invalid", "tie" or "disagreement" (module docstring)."""
    if first is None or second is None:
        return "invalid"
    if "tie" in (first, second):
        return "tie"
    return first if first == second else "disagreement"


def sample_two(model, tokenizer, rows, params) -> list[tuple[Sample, Sample]]:
    """Two sampled responses per example of `rows` (one prompt and clip each)."""
    from rollout.sampler import generate

    device = next(model.parameters()).device
    batch = collate(rows, tokenizer.pad_token_id).to(device)
    rollout = generate(model, batch.prompts, params, audio_features=batch.audio_features,
                       audio_lengths=batch.audio_lengths, pad_token_id=tokenizer.pad_token_id)
    eos = set(params.eos_token_ids)
    samples = []
    for row in range(rollout.tokens.shape[0]):
        ids = rollout.tokens[row][rollout.mask[row]].tolist()
        samples.append(Sample(tokenizer.decode(ids, skip_special=True).strip(), ids, bool(ids) and ids[-1] in eos))
    return [(samples[2 * i], samples[2 * i + 1]) for i in range(len(rows))]  # row r = sample r % 2 of prompt r // 2


def pair_row(entry: ManifestEntry, chosen: Sample, rejected: Sample, winner: str, preference, judge_model: str,
             sampling: dict, out_dir: Path) -> dict[str, Any]:
    row = {"audio_filepath": os.path.relpath(entry.audio_path, out_dir), "duration": entry.duration}
    if entry.offset:
        row["offset"] = entry.offset
    row["id"] = entry.id
    for name in ("lang", "transcript", "instruction"):
        if getattr(entry, name) is not None:
            row[name] = getattr(entry, name)
    row.update({k: v for k, v in entry.extra.items() if k not in ("summary",)})
    shown = (["chosen", "rejected"], ["rejected", "chosen"]) if winner == "a" else (["rejected", "chosen"],
                                                                                    ["chosen", "rejected"])
    row.update({
        "prompt": entry.instruction,  # TRL's explicit prompt (module docstring)
        "chosen": chosen.text, "rejected": rejected.text,
        "chosen_token_ids": chosen.token_ids, "rejected_token_ids": rejected.token_ids,
        "chosen_finished": chosen.finished, "rejected_finished": rejected.finished,
        "judge": {"model": judge_model, "orders": [
            {"shown": shown[0], "verdict": "A" if shown[0][0] == "chosen" else "B",
             "explanation": preference.explanations[0]},
            {"shown": shown[1], "verdict": "A" if shown[1][0] == "chosen" else "B",
             "explanation": preference.explanations[1]},
        ]},
        "sampling": sampling,
    })
    return row


def judge_source(entry: ManifestEntry) -> str:
    """What the judge reads: the row's `judge_source` (the toy world's meeting record, for its
    oracle) when it has one, else the transcript (paper section 2.3)."""
    source = entry.extra.get("judge_source")
    return source if isinstance(source, str) and source else entry.transcript


def run(manifests: Sequence[str | Path], out: str | Path, model, tokenizer, judge, config: SamplingConfig, *,
        policy: DurationPolicy = DurationPolicy(), strict: bool = False, feature_cache: str | Path | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the pairs of `manifests` to `out` (resuming), print and return the statistics.

    `model`: the student SpeechLM (with `model.encoder_cache` set, its frozen encoder's outputs
    come from that cache); `judge`: `eval.judge.OpenAIJudge` or anything with its
    `prefer_many(items) -> [Preference]`, `model` and `usage`; `feature_cache`: a folder of log-mel
    features (data.dataset.FeatureCache), shared with training.
    """
    from rollout.sampler import SamplingParams

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dropped_path = out.with_name(out.name + ".dropped.jsonl")
    report = read_manifest(manifests, require=("instruction", "transcript"), max_duration=policy.max_seconds,
                           on_too_long=policy.on_too_long)
    for issue in report.issues:
        log(str(issue))
    if strict and report.errors:
        raise DataError(report.errors)
    done = {row["id"] for row in read_rows(out)} | {row["id"] for row in read_rows(dropped_path)}
    position = {entry.id: i for i, entry in enumerate(report.entries)}
    todo = [entry for entry in report.entries if entry.id not in done]
    dataset = ManifestDataset(todo, tokenizer, task="prompt", shuffle=False, strict=strict, policy=policy,
                              max_context=model.config.decoder.max_position_embeddings,
                              reserve_tokens=config.max_new_tokens, feature_cache=feature_cache)
    run_stats = Counter(recordings=len(report.entries), invalid_lines=len({(i.file, i.line) for i in report.errors}),
                        resumed=len(report.entries) - len(todo))
    by_id = {entry.id: entry for entry in dataset.entries}
    judge_model = getattr(judge, "model", type(judge).__name__)
    model.eval()
    for begin in range(0, len(dataset), config.batch_size):
        rows = dataset.examples(range(begin, min(begin + config.batch_size, len(dataset))))
        if not rows:
            continue
        seed = config.seed + position[rows[0].id]
        params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                top_k=config.top_k, top_p=config.top_p, eos_token_ids=tokenizer.eos_token_ids,
                                num_samples=2, seed=seed)
        samples = sample_two(model, tokenizer, rows, params)
        judged = [i for i, (a, b) in enumerate(samples) if a.text != b.text]
        preferences = judge.prefer_many([(judge_source(by_id[rows[i].id]), rows[i].instruction, samples[i][0].text,
                                          samples[i][1].text) for i in judged])
        verdicts = dict(zip(judged, preferences))
        pairs, dropped = [], []
        sampling = {"seed": seed, "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
                    "max_new_tokens": config.max_new_tokens}
        for i, (a, b) in enumerate(samples):
            entry = by_id[rows[i].id]
            preference = verdicts.get(i)
            outcome = "identical" if preference is None else classify(preference.first, preference.second)
            if outcome in ("a", "b"):
                chosen, rejected = (a, b) if outcome == "a" else (b, a)
                pairs.append(pair_row(entry, chosen, rejected, outcome, preference, judge_model, sampling, out.parent))
            else:
                dropped.append({"id": entry.id, "reason": outcome, "a": a.text, "b": b.text,
                                "a_finished": a.finished, "b_finished": b.finished,
                                "verdicts": None if preference is None else [preference.first, preference.second],
                                "explanations": None if preference is None else list(preference.explanations)})
        if pairs:
            append_rows(out, pairs)
        if dropped:
            append_rows(dropped_path, dropped)
        run_stats["processed"] += len(rows)
    run_stats.update({f"skipped_{reason}": count for reason, count in (dataset.rejected + dataset.skipped).items()})
    stats = statistics_of(out, dropped_path)
    stats["run"] = dict(run_stats)
    usage = getattr(judge, "usage", None)
    stats["judge_usage"] = usage.as_dict() if usage is not None else {}
    stats["judge_invalid_replies"] = getattr(judge, "invalid_replies", 0)
    log(format_statistics(stats))
    return stats


def statistics_of(out: Path, dropped_path: Path) -> dict[str, Any]:
    pairs, dropped = read_rows(out), read_rows(dropped_path)
    reasons = Counter(row["reason"] for row in dropped)
    judged = len(pairs) + sum(reasons[r] for r in ("tie", "disagreement", "invalid"))

    def side(name: str) -> dict[str, float]:
        texts = [row[name] for row in pairs]
        return {
            "words": statistics.fmean(len(t.split()) for t in texts) if texts else 0.0,
            "tokens": statistics.fmean(len(row[f"{name}_token_ids"]) for row in pairs) if pairs else 0.0,
            "repetition": statistics.fmean(repetition(t) for t in texts) if texts else 0.0,
            "finished": statistics.fmean(row[f"{name}_finished"] for row in pairs) if pairs else 0.0,
        }

    return {
        "recordings": len(pairs) + len(dropped),
        "pairs": len(pairs),
        "dropped": {reason: reasons[reason] for reason in DROP_REASONS},
        "judged": judged,
        "tie_rate": reasons["tie"] / judged if judged else 0.0,
        "disagreement_rate": reasons["disagreement"] / judged if judged else 0.0,
        "invalid_rate": reasons["invalid"] / judged if judged else 0.0,
        "chosen": side("chosen"),
        "rejected": side("rejected"),
    }


def format_statistics(stats: dict[str, Any]) -> str:
    run_stats, usage = stats.get("run", {}), stats.get("judge_usage", {})
    skipped = {k[len("skipped_"):]: v for k, v in run_stats.items() if k.startswith("skipped_")}
    dropped = stats["dropped"]
    lines = [
        f"recordings: {run_stats.get('recordings', 0)} in the manifest, {run_stats.get('resumed', 0)} done before, "
        f"{run_stats.get('processed', 0)} sampled now, {run_stats.get('invalid_lines', 0)} invalid lines"
        + (f", skipped {skipped}" if skipped else ""),
        f"pairs: {stats['pairs']} kept of {stats['recordings']}; dropped: "
        + ", ".join(f"{reason} {dropped[reason]}" for reason in DROP_REASONS),
        f"of {stats['judged']} judged: tie rate {stats['tie_rate']:.1%}, disagreement rate "
        f"{stats['disagreement_rate']:.1%}, invalid {stats['invalid_rate']:.1%}",
        f"{'':10} {'words':>8} {'tokens':>8} {'repetition':>11} {'stopped':>8}",
    ]
    for name in ("chosen", "rejected"):
        s = stats[name]
        lines.append(f"{name:10} {s['words']:8.1f} {s['tokens']:8.1f} {s['repetition']:11.3f} {s['finished']:8.0%}")
    lines.append(f"judge requests: {usage.get('requests', 0)} sent, {usage.get('retries', 0)} retried, "
                 f"{usage.get('cache_hits', 0)} cache hits; invalid replies {stats.get('judge_invalid_replies', 0)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.preferences", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the student (KD checkpoint) directory")
    parser.add_argument("--manifest", nargs="+", required=True, help="manifests with instruction and transcript")
    parser.add_argument("--judge", required=True,
                        help="the judge's model name, e.g. gpt-4.1, or 'oracle' (the toy world's judge)")
    parser.add_argument("--out", required=True, help="pairs file (JSON lines), appended to and resumed")
    add_client_arguments(parser)
    add_judge_arguments(parser)
    parser.add_argument("--tokenizer", help="tokenizer file or directory (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=4, help="recordings sampled together")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-duration", type=float, default=1800.0, help="seconds; 0 = no limit")
    parser.add_argument("--on-too-long", choices=("error", "truncate"), default="error")
    parser.add_argument("--device", default="", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--strict", action="store_true", help="stop on the first bad line or sample")
    parser.add_argument("--feature-cache", default=None, help="log-mel features cached here (shared with training)")
    parser.add_argument("--encoder-cache", default=None,
                        help="frozen-encoder outputs cached here per clip (model/encoder_cache.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from eval.judge import OpenAIJudge
        from model import load_pretrained
        from model.tokenizer import load_tokenizer

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype), device=device)
        tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
        if args.encoder_cache and model.encoder is not None:
            from model.encoder_cache import EncoderOutputCache

            model.encoder.requires_grad_(False)
            model.encoder_cache = EncoderOutputCache(args.encoder_cache, model.encoder)
        if args.judge == "oracle":  # the toy world's judge: scores from each row's judge_source record
            from toy.oracle import OracleJudge

            judge = OracleJudge()
        else:
            judge = OpenAIJudge(args.base_url, args.judge, **client_options(args, f"{args.out}.cache"),
                                **judge_request_options(args))
        config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
        run(args.manifest, args.out, model, tokenizer, judge, config, strict=args.strict,
            policy=DurationPolicy(args.max_duration or None, args.on_too_long), feature_cache=args.feature_cache)
        encoder_cache = getattr(model, "encoder_cache", None)
        if encoder_cache is not None:
            encoder_cache.record_usage(f"eval.preferences {args.out}")
    except (ApiError, ValueError, OSError) as error:
        return report_error("eval.preferences", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
