"""Evaluate checkpoints on benchmarks with a judge: the paper's Table 1 (section 3.4) for your
own checkpoints, side by side, plus judge-free diagnostics.

    python -m eval.run --checkpoint sft=runs/sft kd=runs/kd dpo=runs/dpo \\
        --benchmark jsonl:data/golden3.jsonl ami:/data/ami 'floras:/data/floras?min_seconds=300&max_seconds=3600' \\
        --judge openai:gpt-4.1 --out runs/eval

    results = evaluate({"sft": "runs/sft"}, {"golden3": "jsonl:data/golden3.jsonl"}, judge, "runs/eval")
    print(results.table())

This module is the command line and the orchestration: per (checkpoint, benchmark) it decodes
greedily (eval/run_decode.py), judges and diagnoses (eval/diagnostics.py) a window of items at a
time, and aggregates the table with bootstrap intervals (eval/report.py). It is resumable:
outputs and judgements go to append-only caches keyed on what decides them (eval/run_cache.py),
so a rerun decodes and judges only what changed.

Details (checkpoint and judge specs, the per-item procedure, cache keys, output files):
docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from model.errors import report_error
from model.safeio import atomic_write_text

from .benchmarks import Benchmark, BenchmarkError, BenchmarkItem, load_benchmark
from .diagnostics import diagnose
from .report import RESAMPLES, SEED, Results, summarize
from .run_cache import JsonlLog, digest, judge_identity
from .run_decode import TEXT_MODE, CheckpointDecoder, EvalError

logger = logging.getLogger(__name__)

DEFAULT_JUDGE_URL = "https://api.openai.com/v1"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
WINDOW_BATCHES = 16  # items read ahead = batch_size * WINDOW_BATCHES (sorted by length within)
JUDGE_CHUNK = 16  # judgements saved after every chunk


def make_judge(spec: str, *, base_url: str = DEFAULT_JUDGE_URL, api_key_env: str | None = "OPENAI_API_KEY",
               cache_dir: str | Path | None = None, max_concurrency: int = 8):
    """`openai:MODEL` -> OpenAIJudge, `oracle` -> toy.oracle.OracleJudge(), `none` -> None."""
    if spec == "none":
        return None
    if spec == "oracle":
        try:
            from toy.oracle import OracleJudge
        except ImportError as error:
            raise EvalError(f"--judge oracle needs toy.oracle.OracleJudge (the toy world's oracle judge), which "
                            f"cannot be imported ({error}); use --judge openai:MODEL or --judge none") from None
        return OracleJudge()
    kind, _, model = spec.partition(":")
    if kind == "openai" and model:
        from .judge import OpenAIJudge

        return OpenAIJudge(base_url, model, api_key_env=api_key_env or None, cache_dir=cache_dir,
                           max_concurrency=max_concurrency)
    raise EvalError(f"--judge {spec!r}: expected openai:MODEL (e.g. openai:gpt-4.1), oracle or none")


def _score_all(judge, triples: list[tuple[str, str, str]]):
    score_many = getattr(judge, "score_many", None)
    if callable(score_many):
        return list(score_many(triples))
    return [judge.score(*triple) for triple in triples]


# ---------------------------------------------------------------------------------------------
# the run


def _windows(items: Iterator[BenchmarkItem], size: int) -> Iterator[list[BenchmarkItem]]:
    window: list[BenchmarkItem] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _check_name(name: str, what: str) -> str:
    if not NAME_PATTERN.match(name):
        raise EvalError(f"{what} name {name!r}: use letters, digits, '.', '_' or '-' (it names files); "
                        f"give one as NAME=...")
    return name


def evaluate(
    checkpoints: Mapping[str, str | Path],
    benchmarks: Mapping[str, str | Benchmark],
    judge,
    out_dir: str | Path,
    *,
    max_new_tokens: int = 1024,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    with_plot: bool = True,
    encoder_cache: str | Path | None = None,
    feature_cache: str | Path | None = None,
) -> Results:
    """Decode, judge and diagnose every (checkpoint, benchmark); resumable (docs/evaluation.md).

    `checkpoints`: name -> directory; `benchmarks`: name -> spec or Benchmark; `judge`: a
    eval.judge.Judge or None (diagnostics only). Writes the files listed in docs/evaluation.md
    under `out_dir` and returns the Results. `encoder_cache`: a folder of frozen-encoder
    outputs (model/encoder_cache.py) shared by the audio checkpoints: a clip is encoded once per
    distinct encoder, whatever the number of checkpoints that share it. `feature_cache`: a folder
    of log-mel features (data.dataset.FeatureCache, keyed as training's entries are) reused across runs and
    checkpoints; the features, and so the outputs, are bit-identical to computing them.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise EvalError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    if not checkpoints or not benchmarks:
        raise EvalError("evaluate needs at least one checkpoint and one benchmark")
    out = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = {name: str(target) for name, target in checkpoints.items()}
    for name, target in checkpoints.items():
        _check_name(name, "checkpoint")
        directory = target.removeprefix(TEXT_MODE)
        if not Path(directory, "config.json").is_file():
            raise EvalError(f"checkpoint {name!r}: {directory} has no config.json; pass a checkpoint directory")
    loaded = {}
    for name, spec in benchmarks.items():
        _check_name(name, "benchmark")
        loaded[name] = spec if isinstance(spec, Benchmark) else load_benchmark(spec, name=name)
    identity = judge_identity(judge)
    judge_key = None if identity is None else digest(identity)
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for ckpt_name, directory in checkpoints.items():
        decoder = CheckpointDecoder(Path(directory.removeprefix(TEXT_MODE)), max_new_tokens=max_new_tokens,
                                    device=device, dtype=dtype, text_mode=directory.startswith(TEXT_MODE),
                                    encoder_cache=encoder_cache, feature_cache=feature_cache)
        try:
            for bench_name, benchmark in loaded.items():
                samples = _run_pair(ckpt_name, bench_name, benchmark, decoder, judge, judge_key, out, batch_size)
                atomic_write_text(out / "samples" / ckpt_name / f"{bench_name}.jsonl",
                                  "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
                cells.setdefault(ckpt_name, {})[bench_name] = summarize(samples, resamples=resamples, seed=seed)
        finally:
            decoder.close()
    settings = {
        "checkpoints": {name: str(d) for name, d in checkpoints.items()},
        "benchmarks": {name: b.spec for name, b in loaded.items()},
        "judge": identity,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95, "interval": "percentile"},
    }
    usage = getattr(judge, "usage", None)
    if dataclasses.is_dataclass(usage):
        settings["judge_usage"] = dataclasses.asdict(usage)  # this run's requests, cache hits, tokens
    results = Results(list(checkpoints), list(loaded), cells, settings)
    results.write(out, with_plot=with_plot)
    return results


def _run_pair(ckpt_name: str, bench_name: str, benchmark: Benchmark, decoder: CheckpointDecoder, judge,
              judge_key: str | None, out: Path, batch_size: int) -> list[dict[str, Any]]:
    """Decode, judge and diagnose one (checkpoint, benchmark); the per-sample records in item order."""
    outputs_log = JsonlLog(out / "outputs" / ckpt_name / f"{bench_name}.jsonl")
    judgements_log = JsonlLog(out / "judgements" / ckpt_name / f"{bench_name}.jsonl")
    outputs, judgements = outputs_log.index(), judgements_log.index()
    samples: list[dict[str, Any]] = []
    seen: set[str] = set()
    decoded = judged = 0
    for window in _windows(benchmark.items(), batch_size * WINDOW_BATCHES):
        for item in window:
            if item.id in seen:
                raise EvalError(f"benchmark {bench_name!r}: duplicate item id {item.id!r}; ids must be unique")
            seen.add(item.id)
        keys = {item.id: decoder.key(item) for item in window}
        todo = sorted((item for item in window if (item.id, keys[item.id]) not in outputs),
                      key=lambda item: -item.seconds())
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            records = [{"id": item.id, "key": keys[item.id], "instruction": item.instruction, **result}
                       for item, result in zip(batch, decoder.decode(batch))]
            outputs_log.append(records)
            outputs.update({(r["id"], r["key"]): r for r in records})
            decoded += len(batch)
            logger.info("%s / %s: decoded %d", ckpt_name, bench_name, decoded)
        texts = {item.id: outputs[(item.id, keys[item.id])]["output"] for item in window}
        if judge is not None:
            verdict_keys = {item.id: digest({"judge": judge_key, "source": item.judge_source,
                                             "instruction": item.instruction, "output": texts[item.id]})
                            for item in window}
            pending = [item for item in window if (item.id, verdict_keys[item.id]) not in judgements]
            for start in range(0, len(pending), JUDGE_CHUNK):
                chunk = pending[start : start + JUDGE_CHUNK]
                scores = _score_all(judge, [(item.judge_source, item.instruction, texts[item.id]) for item in chunk])
                records = [{"id": item.id, "key": verdict_keys[item.id], "overall": score.overall,
                            "hallucination": score.hallucination, "adherence": score.adherence,
                            "explanation": score.explanation} for item, score in zip(chunk, scores)]
                judgements_log.append(records)
                judgements.update({(r["id"], r["key"]): r for r in records})
                judged += len(chunk)
                logger.info("%s / %s: judged %d", ckpt_name, bench_name, judged)
        for item in window:
            output = outputs[(item.id, keys[item.id])]
            sample = {"id": item.id, "instruction": item.instruction, "output": output["output"],
                      "reference": item.reference, "num_tokens": output["num_tokens"],
                      "hit_max_tokens": output["hit_max_tokens"], "judged": judge is not None}
            if judge is not None:
                verdict = judgements[(item.id, verdict_keys[item.id])]
                sample.update({k: verdict[k] for k in ("overall", "hallucination", "adherence", "explanation")})
            sample["diagnostics"] = diagnose(output["output"], item.instruction, item.metadata).to_json()
            sample["metadata"] = item.metadata
            samples.append(sample)
    if not samples:
        raise EvalError(f"benchmark {bench_name!r} ({benchmark.spec}) has no items")
    logger.info("%s / %s: %d items, %d decoded now, %d judged now", ckpt_name, bench_name, len(samples), decoded,
                judged)
    return samples


# ---------------------------------------------------------------------------------------------
# command line


def _named(values: Sequence[str], what: str, default_name) -> dict[str, str]:
    named: dict[str, str] = {}
    for value in values:
        prefix, equals, rest = value.partition("=")
        name, target = (prefix, rest) if equals and NAME_PATTERN.match(prefix) else (default_name(value), value)
        if name in named:
            raise EvalError(f"two {what}s are named {name!r}; name them as NAME=... (e.g. sft={target})")
        named[name] = target
    return named


def _benchmark_default_name(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    return Path(rest.partition("?")[0]).stem if kind == "jsonl" else kind


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.run", description="Judge scores of checkpoints on "
                                     "benchmarks (the paper's Table 1) with bootstrap intervals and judge-free "
                                     "diagnostics; rerun with the same --out to resume.")
    parser.add_argument("--checkpoint", nargs="+", action="extend", required=True, metavar="[NAME=][text:]DIR")
    parser.add_argument("--benchmark", nargs="+", action="extend", required=True, metavar="[NAME=]SPEC",
                        help="jsonl:PATH, ami:DIR[?instructions=PATH&meetings=...], floras:PATH[?min_seconds=...]")
    parser.add_argument("--judge", required=True, help="openai:MODEL, oracle or none")
    parser.add_argument("--judge-base-url", default=DEFAULT_JUDGE_URL)
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the judge's API key ('' for none)")
    parser.add_argument("--judge-concurrency", type=int, default=8)
    parser.add_argument("--judge-azure-api-version", default=None,
                        help="a classic Azure OpenAI deployment's api-version (e.g. 2024-10-21), with --judge-base-url "
                             "https://X.openai.azure.com; or put ?api-version= in --judge-base-url")
    parser.add_argument("--judge-azure-deployment", default=None,
                        help="the classic Azure deployment's name (default: the judge's model name)")
    from .judge import add_judge_arguments, judge_request_options

    add_judge_arguments(parser)  # --judge-temperature, --judge-max-tokens, --judge-json-mode
    parser.add_argument("--out", required=True, help="output folder (caches, samples, tables); reused to resume")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: the checkpoint's")
    parser.add_argument("--bootstrap-resamples", type=int, default=RESAMPLES)
    parser.add_argument("--seed", type=int, default=SEED, help="bootstrap seed")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--encoder-cache", default=None, metavar="DIR",
                        help="cache frozen-encoder outputs per clip here (model/encoder_cache.py)")
    parser.add_argument("--feature-cache", default=None, metavar="DIR",
                        help="cache log-mel features per audio file here (data.dataset.FeatureCache, as training's "
                             "data.feature_cache); same outputs, no recomputation on a rerun")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from data.manifest import DataError
    from model.checkpoint import CheckpointError
    from api.client import ApiError

    try:
        checkpoints = _named(args.checkpoint, "checkpoint", lambda d: Path(d.removeprefix(TEXT_MODE)).resolve().name)
        benchmarks = _named(args.benchmark, "benchmark", _benchmark_default_name)
        judge_kind, _, judge_model = args.judge.partition(":")
        if judge_kind == "openai" and judge_model:  # built here: make_judge takes no request or Azure options
            from .judge import OpenAIJudge

            try:
                judge = OpenAIJudge(args.judge_base_url, judge_model, api_key_env=args.judge_api_key_env or None,
                                    cache_dir=Path(args.out) / "judge_cache", max_concurrency=args.judge_concurrency,
                                    azure_api_version=args.judge_azure_api_version or None,
                                    azure_deployment=args.judge_azure_deployment or None,
                                    **judge_request_options(args))
            except ValueError as error:  # no key in the environment, a malformed Azure URL: one line, no traceback
                raise EvalError(f"--judge {args.judge}: {error}") from None
        else:
            judge = make_judge(args.judge, base_url=args.judge_base_url, api_key_env=args.judge_api_key_env,
                               cache_dir=Path(args.out) / "judge_cache", max_concurrency=args.judge_concurrency)
        results = evaluate(checkpoints, benchmarks, judge, args.out, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, device=args.device,
                           dtype=getattr(torch, args.dtype) if args.dtype else None,
                           resamples=args.bootstrap_resamples, seed=args.seed, with_plot=not args.no_plot,
                           encoder_cache=args.encoder_cache, feature_cache=args.feature_cache)
    except (EvalError, BenchmarkError, DataError, CheckpointError, OSError) as error:
        return report_error("eval.run", error)
    except ApiError as error:  # status 1: what finished is kept, a rerun continues
        return report_error("eval.run", ApiError(f"the judge failed: {error}\nfinished samples are saved in "
                                                 f"{args.out}; rerun to continue"), status=1)
    print(results.table())
    for kind, path in results.files.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
