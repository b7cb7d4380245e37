"""Greedy decoding of benchmark items with one checkpoint: the outputs eval.run judges.

Greedy, as the Phi-4-multimodal report evaluates, the whole recording in one pass, as the paper
does; each output is cut at its first EOS and `hit_max_tokens` records outputs that never ended.
A checkpoint given as `text:DIR` reads the transcript through the teacher's prompt instead of
hearing the audio (the paper's "Text" rows). The model is loaded on first use, so a checkpoint
with nothing left to decode is never loaded.

Features: each item's log-mel features are computed alone (`ItemFeatures`) and padded into the
batch with `model.features.pad_features`, which is what `log_mel_batch` does, so they are
bit-identical to it. Items of a batch that share an audio segment (the toy benchmarks ask two
questions per recording) are computed once; with a feature cache (`--feature-cache`, a
data.dataset.FeatureCache folder, keyed as training's entries are) a file's features are also reused
across runs. Details: docs/evaluation.md.
"""
from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from .benchmarks import BenchmarkItem
from .run_cache import checkpoint_fingerprint, digest

logger = logging.getLogger(__name__)

TEXT_MODE = "text:"  # a checkpoint given as text:DIR reads the transcript (the paper's "Text" rows, the teacher)


class EvalError(ValueError):
    """A run that cannot proceed; the message says what to fix. The CLI prints it without a traceback."""


class ItemFeatures:
    """Log-mel features (frames, 80) of benchmark items, each computed alone as `log_mel_batch`
    computes a clip of a batch, optionally through a `FeatureCache` folder.

    Only audio read from files is cached (audio in memory has no identity to key on) and shared
    within a batch; a file that cannot be stat'ed skips the cache, and loading reports it. The
    counters say what the cache did: `read` entries, `computed` items (`written` of them saved).
    """

    FILTERBANK = "speechlib"  # log_mel_batch's default: what eval.run has always decoded with

    def __init__(self, cache_dir: str | Path | None = None):
        from data.dataset import FeatureCache

        self.cache = FeatureCache(cache_dir) if cache_dir is not None else None
        self.read = self.computed = self.written = 0

    def __call__(self, items: Sequence[BenchmarkItem]) -> list[torch.Tensor]:
        """[(frames, 80)] in item order; an audio segment shared by items is computed once."""
        shared: dict[str, torch.Tensor] = {}
        features = []
        for item in items:
            if item.audio_path is None:  # samples or bytes in memory: nothing to tell two of them apart
                features.append(self._one(item))
                continue
            segment = json.dumps(item.audio_key(), sort_keys=True)  # the files, offset and duration
            if segment not in shared:
                shared[segment] = self._one(item)
            features.append(shared[segment])
        return features

    def key(self, item: BenchmarkItem) -> str | None:
        """The item's FeatureCache key (data.dataset.feature_key, with the no-limit duration policy
        `load_waveform` reads with); None without a cache, for audio in memory or a missing file."""
        from data.audio import DurationPolicy
        from data.dataset import feature_key

        if self.cache is None or item.audio_path is None:
            return None
        try:
            return feature_key(item.audio_path, offset=item.offset, duration=item.duration,
                               policy=DurationPolicy(max_seconds=None), filterbank=self.FILTERBANK)
        except OSError:
            return None  # the file is gone: load_waveform reports it

    def _one(self, item: BenchmarkItem) -> torch.Tensor:
        from model.features import log_mel

        key = self.key(item)
        cached = self.cache.get(key) if key is not None else None  # an unreadable entry is a miss
        if cached is not None:
            self.read += 1
            return cached
        try:
            features = log_mel(item.load_waveform(), filterbank=self.FILTERBANK)  # (frames, 80)
        except ValueError as error:  # data.audio.AudioError, BenchmarkError, a clip under one frame
            raise EvalError(f"benchmark item {item.id!r}: {error}") from None
        self.computed += 1
        if key is not None:
            self.cache.put(key, features)
            self.written += 1
        return features

    def summary(self) -> str:
        return f"feature cache: {self.read} clips read, {self.computed} computed ({self.written} saved)"


class CheckpointDecoder:
    """Greedy decoding of benchmark items with one checkpoint, loaded on first use."""

    def __init__(self, directory: Path, *, max_new_tokens: int, device: str | torch.device, dtype=None,
                 text_mode: bool = False, encoder_cache: str | Path | None = None,
                 feature_cache: str | Path | None = None):
        self.directory = directory
        self.text_mode = text_mode  # read the transcript instead of hearing the audio (teacher prompt)
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.dtype = dtype
        self.encoder_cache = encoder_cache
        self.features = ItemFeatures(None if text_mode else feature_cache)  # text mode reads no audio
        self.fingerprint = checkpoint_fingerprint(directory)
        self.model = None
        self.tokenizer = None
        self.loads = 0

    def key(self, item: BenchmarkItem) -> str:
        if self.text_mode:
            return digest({"checkpoint": self.fingerprint, "max_new_tokens": self.max_new_tokens, "mode": "text",
                           "instruction": item.instruction, "transcript": item.transcript})
        return digest({"checkpoint": self.fingerprint, "max_new_tokens": self.max_new_tokens,
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
        if self.features.cache is not None:
            logger.info("%s: %s", self.directory, self.features.summary())
        if self.model is not None and self.model.encoder_cache is not None:
            logger.info("%s: %s", self.directory, self.model.encoder_cache.summary())
            self.model.encoder_cache.record_usage(f"eval.run {self.directory}")
        self.model = self.tokenizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def decode(self, items: Sequence[BenchmarkItem]) -> list[dict[str, Any]]:
        """Greedy outputs of a batch: [{"output", "num_tokens", "hit_max_tokens"}] in item order."""
        from model.features import audio_tokens_for_frames, pad_features

        if self.model is None:
            self._load()
        tokenizer = self.tokenizer
        if self.text_mode:
            from rollout.teachers import teacher_prompt_ids

            prompts = [torch.tensor(teacher_prompt_ids(tokenizer, item.transcript, item.instruction)) for item in items]
            return self._generate(prompts, None, None)
        clips = self.features(items)  # [(frames, 80)] per item
        features, lengths = pad_features(clips)  # (B, frames, 80), (B,): log_mel_batch's padding
        prompts = [torch.tensor(tokenizer.build_chat_prompt(
                       item.instruction, num_audio_tokens=[audio_tokens_for_frames(clip.shape[0])]).input_ids)
                   for item, clip in zip(items, clips)]
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
