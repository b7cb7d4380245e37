"""Manifest rows -> tokenized `Example`s with log-mel features, in length-bucketed sharded batches.

`ManifestDataset` is the `BatchSource` train/loop.py consumes (`epoch_plans`, `load`,
`sample_ids`) for every stage of the paper, by `task`: "sft" (instruction -> reference, the loss
on the summary), "prompt" (KD and DPO pools: the student samples its own response) and "pairs"
(DPO: each pair loads as two consecutive rows, y+ then y-). One example is the Phi-4MM chat
prompt with the clip's audio placeholders (their count from the audio actually loaded), the
response and the clip's log-mel features; the loss is on the response only.

Construction reads no audio, so planning batches by token budget uses manifest durations only;
audio is decoded for the batch in hand (`load`), optionally through a feature cache. Bad
samples never stop a run: they are counted by reason and skipped (`strict=True` raises instead),
and a batch with none left gets a substitute so every DDP rank takes its step.

Details (each task, the example layout, laziness, batches, bad samples): docs/dataset.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import torch

from model.features import audio_tokens_for_frames, log_mel, num_audio_tokens
from model.safeio import TensorStore

from .audio import FLOAT_PEAK_TOLERANCE, AudioError, DurationPolicy, load_audio, peak_warning, seconds_to_samples_16k
from .batching import Batch, Example, bucketed_plans, collate
from .manifest import DataError, Issue, ManifestEntry, read_manifest

logger = logging.getLogger(__name__)

TASKS = {"sft": ("instruction", "summary"), "prompt": ("instruction",), "pairs": ("instruction",)}
FEATURE_CACHE_VERSION = 1


def feature_key(paths: Path | Sequence[Path], *, offset: float, duration: float | None, policy: DurationPolicy,
                filterbank: str) -> str:
    """The `FeatureCache` key of a segment's features: sha256 of each file's resolved path, mtime
    (ns) and size, the segment, the duration policy, the filterbank and FEATURE_CACHE_VERSION.

    One file (training's manifests, eval.run's jsonl items) hashes the same payload as it always
    has, so existing caches stay valid; a sequence of files, even of one, is a mix summed sample
    by sample and peak-normalised (eval's AMI headsets, `BenchmarkItem.load_waveform`), listed in
    order. OSError when a file is gone.
    """
    files = [paths] if isinstance(paths, (str, Path)) else list(paths)
    sources = []
    for path in files:
        stat = Path(path).stat()
        sources.append({"path": str(Path(path).resolve()), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size})
    payload = sources[0] if isinstance(paths, (str, Path)) else {"paths": sources, "mix": "sum"}
    payload.update({"offset": offset, "duration": duration, "max_seconds": policy.max_seconds,
                    "on_too_long": policy.on_too_long, "filterbank": filterbank, "version": FEATURE_CACHE_VERSION})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class FeatureCache:
    """Log-mel features on disk, content-addressed, crash-safe.

    Key (`feature_key`): sha256 of the resolved path, the file's mtime (ns) and size, the
    segment (offset, duration), the duration policy and the filterbank; editing or replacing the
    file changes the key. Entry: `{key[:2]}/{key}.safetensors` with the (frames, 80) tensor, written to a
    unique temporary file in the same folder, fsync'ed and renamed (atomic on POSIX), so a
    killed process leaves the full entry or none. An unreadable entry is a miss and is rewritten.
    """

    def __init__(self, directory: str | Path):
        self.store = TensorStore(directory, "features")
        self.directory = self.store.directory

    def key(self, entry: ManifestEntry, policy: DurationPolicy, filterbank: str) -> str:
        return feature_key(entry.audio_path, offset=entry.offset, duration=entry.duration, policy=policy,
                           filterbank=filterbank)

    def path(self, key: str) -> Path:
        return self.store.path(key)

    def get(self, key: str) -> torch.Tensor | None:
        return self.store.get(key)

    def put(self, key: str, features: torch.Tensor) -> None:
        self.store.put(key, features)


class ManifestDataset:
    """A `train.loop.BatchSource` over manifest entries (docs/dataset.md)."""

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        tokenizer,
        *,
        task: str = "sft",
        max_tokens: int = 32768,
        max_batch_size: int | None = None,
        max_context: int | None = None,
        reserve_tokens: int = 0,
        policy: DurationPolicy = DurationPolicy(),
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        window: int = 1000,
        strict: bool = False,
        feature_cache: str | Path | None = None,
        add_eos: bool = True,
        system: str | None = None,
        filterbank: str = "speechlib",
        device=None,
        manifest_issues: Iterable[Issue] = (),
    ):
        """`max_tokens`: padded tokens per batch (see data.batching.batch_cost); `max_batch_size`:
        entries per batch (a pair is one entry, two rows); `max_context`: the model's context
        (None: no check); `reserve_tokens`: tokens kept free after the prompt for generation
        (task "prompt": max_new_tokens); `manifest_issues`: problems found before
        (from_manifests), counted and logged here."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
        self.tokenizer, self.task = tokenizer, task
        self.max_tokens, self.max_batch_size = max_tokens, max_batch_size
        self.max_context, self.reserve_tokens = max_context, reserve_tokens
        self.policy, self.strict, self.add_eos, self.system = policy, strict, add_eos, system
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.window, self.filterbank, self.device = shuffle, window, filterbank, device
        self.cache = FeatureCache(feature_cache) if feature_cache is not None else None
        self.rejected: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.refills = 0
        self.bad: dict[int, Issue] = {}  # entry index -> why it was skipped
        self.issues: list[Issue] = []  # every rejection, and the first skip of each sample
        self.peak_warned: set = set()  # entries whose float peak above 1 was reported (once each)
        for issue in manifest_issues:
            self._reject(issue)
        self.entries: list[ManifestEntry] = []
        self.lengths: list[int] = []  # planning cost per entry: rows x (audio + text tokens)
        for entry in entries:
            estimate = self._estimate(entry)
            if estimate is not None:
                self.entries.append(entry)
                self.lengths.append(estimate)

    @classmethod
    def from_manifests(cls, paths, tokenizer, *, task: str = "sft", policy: DurationPolicy = DurationPolicy(),
                       strict: bool = False, **options) -> "ManifestDataset":
        """Read and validate manifests (the fields `task` needs are required), then build the dataset."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
        report = read_manifest(paths, require=TASKS[task], max_duration=policy.max_seconds,
                               on_too_long=policy.on_too_long)
        for warning in report.warnings:
            logger.warning("%s", warning)
        if strict and report.errors:
            raise DataError(report.errors)
        return cls(report.entries, tokenizer, task=task, policy=policy, strict=strict, manifest_issues=report.errors,
                   **options)

    def __len__(self) -> int:
        return len(self.entries)

    # -----------------------------------------------------------------------------------------
    # BatchSource

    def epoch_plans(self, epoch: int) -> list[list[int]]:
        return bucketed_plans(self.lengths, max_tokens=self.max_tokens, seed=self.seed, epoch=epoch, rank=self.rank,
                              world_size=self.world_size, max_batch_size=self.max_batch_size, window=self.window,
                              shuffle=self.shuffle)

    def load(self, plan: Sequence[int]) -> Batch:
        rows = self.examples(plan)
        if not rows:
            rows = self._refill(plan)
        batch = collate(rows, self.tokenizer.pad_token_id)
        return batch.to(self.device) if self.device is not None else batch

    def sample_ids(self, batch: Batch) -> list[str]:
        return batch.ids[0::2] if self.task == "pairs" else batch.ids

    # -----------------------------------------------------------------------------------------

    def examples(self, plan: Sequence[int]) -> list[Example]:
        """The rows of the plan's entries, bad ones skipped and counted (raised when strict), no refill."""
        return [row for index in plan for row in self._rows_or_skip(index)]

    def rows(self, index: int) -> list[Example]:
        """Entry `index` as batch rows (one; two for a pair: y+ then y-); DataError for a bad sample."""
        entry = self.entries[index]
        responses = self._responses(entry)
        features = self._features(entry)  # (frames, 80)
        audio_tokens = audio_tokens_for_frames(features.shape[0])
        prompt = self.tokenizer.build_chat_prompt(entry.instruction, [audio_tokens], system=self.system)
        self._check_context(entry, audio_tokens, len(prompt.input_ids) + max(map(len, responses)))
        return [Example(id=entry.id, prompt_ids=prompt.prompt_ids, response_ids=response, features=features,
                        instruction=entry.instruction, transcript=entry.transcript or "") for response in responses]

    def example(self, index: int) -> Example:
        """The first row of entry `index` (the only one unless task is "pairs")."""
        return self.rows(index)[0]

    def _rows_or_skip(self, index: int) -> list[Example]:
        if index in self.bad:
            issue = self.bad[index]
            self.skipped[issue.reason] += 1
            logger.debug("%s (skipped again)", issue)
            return []
        try:
            return self.rows(index)
        except DataError as error:
            if self.strict:
                raise
            issue = error.issues[0]
            self.bad[index] = issue
            self.issues.append(issue)
            self.skipped[issue.reason] += 1
            logger.warning("skipped sample %r: %s", self.entries[index].id, issue)
            return []

    def _refill(self, plan: Sequence[int]) -> list[Example]:
        count = len(self.entries)
        for step in range(1, count + 1):
            index = (plan[0] + step) % count
            if index in self.bad:
                continue
            rows = self._rows_or_skip(index)
            if rows:
                self.refills += 1
                logger.warning("every sample of the batch %s was bad; substituted %r so this rank still takes its "
                               "step", [self.entries[i].id for i in plan], rows[0].id)
                return rows
        manifests = ", ".join(dict.fromkeys(entry.file for entry in self.entries))
        raise DataError(Issue(manifests, None, None, f"no sample of the {count} could be loaded; skipped: "
                                                     f"{dict(self.skipped)}"))

    def _responses(self, entry: ManifestEntry) -> list[list[int]]:
        """Response ids of each row: the summary (sft), nothing (prompt), y+ and y- (pairs)."""
        if self.task == "sft":
            return [self.tokenizer.encode_response(entry.summary, add_eos=self.add_eos)]
        if self.task == "prompt":
            return [[]]
        return [self._pair_response(entry, "chosen"), self._pair_response(entry, "rejected")]

    def _pair_response(self, entry: ManifestEntry, side: str) -> list[int]:
        """The sampled ids (`{side}_token_ids`, what the student generated) when valid, else
        `{side}` text + <|end|>."""
        ids = entry.extra.get(f"{side}_token_ids")
        if (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
                and all(0 <= i < self.tokenizer.vocab_size for i in ids)):
            return ids
        text = entry.extra.get(side)
        if not isinstance(text, str) or not text.strip():
            raise DataError(entry.issue(side, "missing or empty; a preference pair needs the chosen and the "
                                              "rejected response (eval.preferences writes both)"))
        return self.tokenizer.encode_response(text)

    def _features(self, entry: ManifestEntry) -> torch.Tensor:
        key = None
        if self.cache is not None:
            try:
                key = self.cache.key(entry, self.policy, self.filterbank)
            except OSError:
                key = None  # the file is gone: load_audio reports it
            cached = self.cache.get(key) if key is not None else None
            if cached is not None:
                return cached
        try:
            audio = load_audio(entry.audio_path, offset=entry.offset, duration=entry.duration, policy=self.policy)
            features = log_mel(audio.waveform, filterbank=self.filterbank)  # (frames, 80)
        except AudioError as error:
            raise DataError(Issue(entry.file, entry.line, error.field, str(error), reason=error.reason)) from None
        if audio.peak > 1.0 + FLOAT_PEAK_TOLERANCE and (entry.file, entry.line) not in self.peak_warned:
            self.peak_warned.add((entry.file, entry.line))
            self.issues.append(Issue(entry.file, entry.line, "audio_filepath", peak_warning(audio.peak), "warning"))
        if key is not None:
            self.cache.put(key, features)
        return features

    def _estimate(self, entry: ManifestEntry) -> int | None:
        """Planning cost of the entry from the manifest alone; None (rejected) if it cannot fit."""
        seconds = entry.duration
        if self.policy.max_seconds is not None and seconds > self.policy.max_seconds:
            if self.policy.on_too_long == "error":
                self._reject(Issue(entry.file, entry.line, "duration", f"{seconds:g} s is over the limit of "
                                   f"{self.policy.max_seconds:g} s", reason="over_max_duration"))
                return None
            seconds = self.policy.max_seconds
        try:
            audio_tokens = num_audio_tokens(seconds_to_samples_16k(seconds))
            responses = self._responses(entry)
            prompt = self.tokenizer.build_chat_prompt(entry.instruction, [], system=self.system)
            length = audio_tokens + len(prompt.input_ids) + max(map(len, responses))
            self._check_context(entry, audio_tokens, length)
        except ValueError as error:  # model.features: shorter than one frame
            if not isinstance(error, DataError):
                error = DataError(Issue(entry.file, entry.line, "duration", f"{seconds:g} s: {error}",
                                        reason="segment"))
            self._reject(error.issues[0])
            return None
        return len(responses) * length

    def _check_context(self, entry: ManifestEntry, audio_tokens: int, total: int) -> None:
        """DataError naming the field that contributes most when a row exceeds the context."""
        if self.max_context is None or total + self.reserve_tokens <= self.max_context:
            return
        parts = {"duration": (audio_tokens, f"audio tokens for {entry.duration:g} s"),
                 "instruction": (len(self.tokenizer.encode(entry.instruction)), "in the instruction")}
        names = {"sft": ["summary"], "prompt": [], "pairs": ["chosen", "rejected"]}[self.task]
        for name, response in zip(names, self._responses(entry)):
            parts[name] = (len(response), f"in the {name}")
        field = max(parts, key=lambda name: parts[name][0])
        detail = ", ".join(f"{count} {what}" for count, what in parts.values())
        reserve = f" + {self.reserve_tokens} reserved for the response" if self.reserve_tokens else ""
        raise DataError(Issue(entry.file, entry.line, field,
                              f"the example needs {total} tokens{reserve} ({detail}), over the model's context of "
                              f"{self.max_context}; shorten the segment or the text", reason="over_context"))

    def _reject(self, issue: Issue) -> None:
        if self.strict:
            raise DataError(issue)
        self.rejected[issue.reason] += 1
        self.issues.append(issue)
        logger.warning("left out: %s", issue)
