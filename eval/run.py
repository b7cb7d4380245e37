"""Evaluate checkpoints on benchmarks with a judge: the paper's Table 1 (section 3.4) for your
own checkpoints, side by side, plus judge-free diagnostics.

    python -m eval.run --checkpoint sft=runs/sft kd=runs/kd dpo=runs/dpo \\
        --benchmark jsonl:data/golden3.jsonl ami:/data/ami 'floras:/data/floras?min_seconds=300&max_seconds=3600' \\
        --judge openai:gpt-4.1 --out runs/eval

    results = evaluate({"sft": "runs/sft"}, {"golden3": "jsonl:data/golden3.jsonl"}, judge, "runs/eval")
    print(results.table())

Checkpoints are `[NAME=]DIR` (default name: the directory's name) or `[NAME=]text:DIR`: the
model reads the transcript through the teacher's prompt instead of hearing the audio (the
paper's "Text" rows; the text teacher as the ceiling). Benchmarks are `[NAME=]SPEC`
(eval/benchmarks.py; default name: the manifest's stem, "ami", "floras"). `--judge`:
`openai:MODEL` (eval.judge.OpenAIJudge over `--judge-base-url`, key from the environment
variable `--judge-api-key-env`, its response cache in OUT/judge_cache), `oracle` (the toy
world's toy.oracle.OracleJudge) or `none` (diagnostics only, no judge calls).

What happens per (checkpoint, benchmark), reading the benchmark once, a window of items at a time:
1. Decode (greedy, as the Phi-4-multimodal report evaluates): items are sorted by audio length
   within the window (longest first) and batched (`batch_size`) through `rollout.generate`
   with SamplingParams(max_new_tokens, temperature=0, eos_token_ids=the model's). Prompt: the
   tokenizer's chat template with the clip's audio placeholders (`num_audio_tokens` of the
   loaded audio); features `model.features.log_mel`; the whole recording in one pass, as the
   paper does. The output is cut at its first EOS, decoded with special tokens skipped and
   stripped of surrounding whitespace; `hit_max_tokens` records outputs that never ended.
2. Judge: `judge.score(source, instruction, output)` with `source` = the item's judge_source
   (the transcript, or the toy world's record), through `score_many` when the judge has it
   (concurrent requests).
3. Diagnose: eval/diagnostics.py on every output.
Then OUT/samples/{checkpoint}/{benchmark}.jsonl gets one line per item (instruction, output,
reference, scores, explanation, diagnostics) and the table is aggregated (eval/report.py:
mean and seeded 95% bootstrap interval).

Resuming. Outputs and judgements are separate append-only JSON-lines caches,
OUT/outputs/{checkpoint}/{benchmark}.jsonl and OUT/judgements/{checkpoint}/{benchmark}.jsonl,
one line per finished sample, written line by line (one write each, fsync'ed per batch). A torn
last line (a killed run) is dropped when the file is next opened; other unreadable lines are
skipped with a warning. A record is reused only when its key matches:
- an output's key hashes the checkpoint's fingerprint (names, sizes and mtimes of config.json,
  *.safetensors* and tokenizer files: retraining in place invalidates it), max_new_tokens, the
  instruction and the audio's identity (path, offset, duration);
- a judgement's key hashes the judge's identity, the source, the instruction and the output.
  The identity of a judge with `config()` (OpenAIJudge) is its class and config without the
  endpoint, cache and transport settings (model, temperature, max_tokens, json mode) plus a
  hash of its prompt template; of any other judge (the toy world's oracle), its class and a
  hash of the file that defines it, so editing the oracle's formula re-judges.
So a second run decodes nothing and calls no judge, and a run with another judge re-judges
without re-decoding. A checkpoint with nothing left to decode is never loaded. Invalid judge
replies are kept as judged (with temperature 0 the judge would repeat them) and counted.

Outputs in OUT: results.json (checkpoint -> benchmark -> the cell fields of eval/report.py),
results.md (Table 1 and the diagnostics table), results.csv (Table 1, wide), diagnostics.csv
(every field, one row per cell), results.png (matplotlib only), run.json (the settings).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import inspect
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from model.errors import report_error
from model.safeio import atomic_write_text

from .benchmarks import Benchmark, BenchmarkError, BenchmarkItem, load_benchmark
from .diagnostics import diagnose
from .report import RESAMPLES, SEED, diagnostics_csv, diagnostics_table, plot, score_table, scores_csv, summarize

logger = logging.getLogger(__name__)

DEFAULT_JUDGE_URL = "https://api.openai.com/v1"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
WINDOW_BATCHES = 16  # items read ahead = batch_size * WINDOW_BATCHES (sorted by length within)
JUDGE_CHUNK = 16  # judgements saved after every chunk
_FINGERPRINT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "*.model")
_IDENTITY_DROPPED = ("cache_dir", "max_concurrency", "timeout_s", "retry", "api_key_env", "base_url")


TEXT_MODE = "text:"  # a checkpoint given as text:DIR reads the transcript (the paper's "Text" rows, the teacher)


class EvalError(ValueError):
    """A run that cannot proceed; the message says what to fix. The CLI prints it without a traceback."""


# ---------------------------------------------------------------------------------------------
# crash-safe JSON-lines caches


class JsonlLog:
    """An append-only JSON-lines file of finished records, tolerant of a torn last line."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        if not path.is_file():
            return
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            keep = raw.rfind(b"\n") + 1
            logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", path, len(raw) - keep)
            with open(path, "r+b") as handle:
                handle.truncate(keep)
            raw = raw[:keep]
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                logger.warning("%s:%d: unreadable line skipped", path, number)
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str) and isinstance(record.get("key"), str):
                self.records.append(record)

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for record in records:
                os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                self.records.append(record)
            os.fsync(fd)
        finally:
            os.close(fd)

    def index(self) -> dict[tuple[str, str], dict]:
        """(id, key) -> the last record with them."""
        return {(r["id"], r["key"]): r for r in self.records}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# checkpoints and judges


def checkpoint_fingerprint(directory: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the files that define a checkpoint's outputs."""
    files = {p for pattern in _FINGERPRINT_PATTERNS for p in directory.glob(pattern) if p.is_file()}
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(files)]


def judge_identity(judge) -> dict[str, Any] | None:
    """What decides a judge's replies (module docstring); None for no judge."""
    if judge is None:
        return None
    identity: dict[str, Any] = {"type": f"{type(judge).__module__}.{type(judge).__qualname__}"}
    config = getattr(judge, "config", None)
    if callable(config):
        identity.update({k: v for k, v in config().items() if k not in _IDENTITY_DROPPED})
        template = getattr(judge, "score_template", None)
        if isinstance(template, str):
            identity["score_template"] = hashlib.sha256(template.encode()).hexdigest()[:16]
        return identity
    try:  # a local judge (the toy world's oracle): its code is its identity
        identity["source_sha"] = hashlib.sha256(Path(inspect.getfile(type(judge))).read_bytes()).hexdigest()[:16]
    except (TypeError, OSError):  # defined in a REPL or notebook: no file to hash; the class name identifies it
        return identity
    return identity


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


class CheckpointDecoder:
    """Greedy decoding of benchmark items with one checkpoint, loaded on first use."""

    def __init__(self, directory: Path, *, max_new_tokens: int, device: str | torch.device, dtype=None,
                 text_mode: bool = False, encoder_cache: str | Path | None = None):
        self.directory = directory
        self.text_mode = text_mode  # read the transcript instead of hearing the audio (teacher prompt)
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.dtype = dtype
        self.encoder_cache = encoder_cache
        self.fingerprint = checkpoint_fingerprint(directory)
        self.model = None
        self.tokenizer = None
        self.loads = 0

    def key(self, item: BenchmarkItem) -> str:
        if self.text_mode:
            return _digest({"checkpoint": self.fingerprint, "max_new_tokens": self.max_new_tokens, "mode": "text",
                            "instruction": item.instruction, "transcript": item.transcript})
        return _digest({"checkpoint": self.fingerprint, "max_new_tokens": self.max_new_tokens,
                        "instruction": item.instruction, "audio": item.audio_key()})

    def _load(self) -> None:
        from model import load_pretrained
        from model.tokenizer import load_tokenizer

        logger.info("loading %s", self.directory)
        model = load_pretrained(self.directory, dtype=self.dtype, device=self.device)
        if model.config.encoder is None and not self.text_mode:
            raise EvalError(f"{self.directory}: this checkpoint has no speech encoder (config.encoder is None); "
                            "the benchmarks need a speech model")
        tokenizer = load_tokenizer(self.directory)
        if not self.text_mode and tokenizer.audio_token_id != model.config.audio_token_id:
            raise EvalError(f"{self.directory}: the tokenizer's audio placeholder id {tokenizer.audio_token_id} is not "
                            f"the model's ({model.config.audio_token_id}); use the checkpoint's own tokenizer")
        if self.encoder_cache is not None and model.encoder is not None and not self.text_mode:
            from model.encoder_cache import EncoderOutputCache

            model.encoder.requires_grad_(False)
            model.encoder_cache = EncoderOutputCache(self.encoder_cache, model.encoder)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.loads += 1

    def close(self) -> None:
        if self.model is not None and self.model.encoder_cache is not None:
            logger.info("%s: %s", self.directory, self.model.encoder_cache.summary())
            self.model.encoder_cache.record_usage(f"eval.run {self.directory}")
        self.model = self.tokenizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def decode(self, items: Sequence[BenchmarkItem]) -> list[dict[str, Any]]:
        """Greedy outputs of a batch: [{"output", "num_tokens", "hit_max_tokens"}] in item order."""
        from model.features import log_mel_batch, num_audio_tokens

        if self.model is None:
            self._load()
        tokenizer = self.tokenizer
        if self.text_mode:
            from rollout.teachers import teacher_prompt_ids

            prompts = [torch.tensor(teacher_prompt_ids(tokenizer, item.transcript, item.instruction)) for item in items]
            return self._generate(prompts, None, None)
        waveforms = []
        for item in items:
            try:
                waveforms.append(item.load_waveform())
            except ValueError as error:  # data.audio.AudioError and BenchmarkError
                raise EvalError(f"benchmark item {item.id!r}: {error}") from None
        features, lengths = log_mel_batch(waveforms)  # (B, frames, 80), (B,)
        prompts = [torch.tensor(tokenizer.build_chat_prompt(item.instruction,
                                                            num_audio_tokens=[num_audio_tokens(len(w))]).input_ids)
                   for item, w in zip(items, waveforms)]
        return self._generate(prompts, features.to(self.device), lengths.to(self.device))

    def _generate(self, prompts, features, lengths) -> list[dict[str, Any]]:
        from rollout.sampler import SamplingParams, generate

        model, tokenizer = self.model, self.tokenizer
        limit = model.config.decoder.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest + self.max_new_tokens > limit:
            raise EvalError(f"a prompt of {longest} tokens + max_new_tokens {self.max_new_tokens} exceeds the context "
                            f"of {self.directory} ({limit} positions); lower --max-new-tokens or shorten the audio")
        eos = tuple(model.config.decoder.eos_token_ids)
        params = SamplingParams(self.max_new_tokens, temperature=0.0, eos_token_ids=eos, seed=0)
        rollout = generate(model, prompts, params, audio_features=features, audio_lengths=lengths)
        results = []
        for row in range(len(prompts)):
            ids = rollout.tokens[row, : int(rollout.lengths[row])].tolist()
            ended = next((i for i, token in enumerate(ids) if token in eos), None)
            kept = ids if ended is None else ids[:ended]
            results.append({"output": tokenizer.decode(kept, skip_special=True).strip(), "num_tokens": len(kept),
                            "hit_max_tokens": ended is None})
        return results


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Results:
    """Cells of the table: checkpoint -> benchmark -> the fields of eval.report.summarize."""

    checkpoints: list[str]
    benchmarks: list[str]
    cells: dict[str, dict[str, dict[str, Any]]]
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown: Table 1 (judge score, mean [95% CI]) then the diagnostics table."""
        judge = self.settings.get("judge") or {"type": "none"}
        label = " ".join(str(judge[k]) for k in ("type", "model") if k in judge)
        return (f"Judge score (1-7), mean [95% bootstrap CI] (judge: {label})\n\n"
                + score_table(self.cells, self.checkpoints, self.benchmarks)
                + "\n\nDiagnostics (judge-free except Halluc., Adherence)\n\n"
                + diagnostics_table(self.cells, self.checkpoints, self.benchmarks) + "\n")

    def to_json(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {name: {bench: dict(self.cells[name][bench]) for bench in self.benchmarks if bench in self.cells[name]}
                for name in self.checkpoints}

    def write(self, out_dir: Path, *, with_plot: bool = True) -> dict[str, Path]:
        """results.json / .md / .csv, diagnostics.csv, run.json and results.png (if matplotlib)."""
        files = {
            "json": out_dir / "results.json",
            "markdown": out_dir / "results.md",
            "csv": out_dir / "results.csv",
            "diagnostics_csv": out_dir / "diagnostics.csv",
            "settings": out_dir / "run.json",
        }
        atomic_write_text(files["json"], json.dumps(self.to_json(), indent=2) + "\n")
        atomic_write_text(files["markdown"], self.table())
        atomic_write_text(files["csv"], scores_csv(self.cells, self.checkpoints, self.benchmarks))
        atomic_write_text(files["diagnostics_csv"], diagnostics_csv(self.cells, self.checkpoints, self.benchmarks))
        atomic_write_text(files["settings"], json.dumps(self.settings, indent=2, default=str) + "\n")
        if with_plot:
            png = plot(self.cells, self.checkpoints, self.benchmarks, out_dir / "results.png")
            if png is not None:
                files["plot"] = png
        self.files = files
        return files


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
) -> Results:
    """Decode, judge and diagnose every (checkpoint, benchmark); resumable (module docstring).

    `checkpoints`: name -> directory; `benchmarks`: name -> spec or Benchmark; `judge`: a
    eval.judge.Judge or None (diagnostics only). Writes the files listed in the module
    docstring under `out_dir` and returns the Results. `encoder_cache`: a folder of frozen-encoder
    outputs (model/encoder_cache.py) shared by the audio checkpoints: a clip is encoded once per
    distinct encoder, whatever the number of checkpoints that share it.
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
    judge_key = None if identity is None else _digest(identity)
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for ckpt_name, directory in checkpoints.items():
        decoder = CheckpointDecoder(Path(directory.removeprefix(TEXT_MODE)), max_new_tokens=max_new_tokens,
                                    device=device, dtype=dtype, text_mode=directory.startswith(TEXT_MODE),
                                    encoder_cache=encoder_cache)
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
            verdict_keys = {item.id: _digest({"judge": judge_key, "source": item.judge_source,
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
                           encoder_cache=args.encoder_cache)
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
