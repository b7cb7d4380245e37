"""Greedy decoding of benchmark items with one checkpoint: the outputs eval.run judges.

Greedy, as the Phi-4-multimodal report evaluates, the whole recording in one pass, as the paper
does; each output is cut at its first EOS and `hit_max_tokens` records outputs that never ended.
A checkpoint given as `text:DIR` reads the transcript through the teacher's prompt instead of
hearing the audio (the paper's "Text" rows). The model is loaded on first use, so a checkpoint
with nothing left to decode is never loaded. Details: docs/evaluation.md.
"""
from __future__ import annotations

import gc
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
