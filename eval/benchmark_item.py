"""What a benchmark is made of: `BenchmarkItem` (one recording and one instruction, with what
the judge reads) and `Benchmark` (a named, re-iterable sequence of them), whatever the loader.

An item's audio is a file (or a tuple of files mixed by summing), samples in memory, or an
encoded file in memory; `load_waveform` turns each into the (samples,) float32 mono 16 kHz
signal data/audio.py's conventions give the model, and `seconds` measures it without decoding,
so the runner can sort a window by length. Loaders and specs: docs/benchmarks.md.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch


class BenchmarkError(ValueError):
    """A benchmark that cannot be read; the message names the file (and line or row) and what to do."""


@dataclass
class BenchmarkItem:
    """One (recording, instruction) to summarise and judge.

    The audio is one of: `audio_path` (a file, read from `offset` for `duration` seconds; a tuple
    of files is mixed by summing, see the AMI loader), `waveform` (samples at `sample_rate`), or
    `audio_bytes` (an encoded file in memory). The judge reads `judge_source`: `source` when set
    (e.g. the toy world's structured record), else `transcript`.
    """

    id: str
    audio_path: Path | tuple[Path, ...] | None = None
    waveform: torch.Tensor | np.ndarray | None = None
    offset: float = 0.0
    duration: float | None = None  # seconds; None: to the end of the file
    transcript: str = ""
    instruction: str = ""
    reference: str | None = None
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    sample_rate: int = 16000  # of `waveform`
    audio_bytes: bytes | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("audio_path", "waveform", "audio_bytes") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"BenchmarkItem {self.id!r}: give exactly one of audio_path, waveform or audio_bytes, "
                             f"got {given or 'none'}")
        if not self.instruction.strip():
            raise ValueError(f"BenchmarkItem {self.id!r}: the instruction is empty")
        if not self.judge_source.strip():
            raise ValueError(f"BenchmarkItem {self.id!r}: no transcript and no source for the judge")

    @property
    def judge_source(self) -> str:
        return self.source if self.source is not None else self.transcript

    def seconds(self) -> float:
        """Length of the audio in seconds, without decoding it (headers only): for sorting batches."""
        if self.waveform is not None:
            return len(self.waveform) / self.sample_rate
        if self.duration is not None:
            return self.duration
        if self.audio_bytes is not None:
            import soundfile

            try:
                info = soundfile.info(io.BytesIO(self.audio_bytes))
            except (soundfile.LibsndfileError, RuntimeError) as error:
                raise BenchmarkError(f"item {self.id!r}: the embedded audio cannot be read ({error})") from None
            return info.frames / info.samplerate
        from data.audio import probe

        paths = self.audio_path if isinstance(self.audio_path, tuple) else (self.audio_path,)
        return max(probe(path).duration for path in paths) - self.offset

    def audio_key(self) -> dict[str, Any]:
        """What identifies the audio, for the runner's cache keys (no samples are hashed)."""
        if self.audio_path is not None:
            paths = self.audio_path if isinstance(self.audio_path, tuple) else (self.audio_path,)
            return {"paths": [str(p) for p in paths], "offset": self.offset, "duration": self.duration}
        if self.waveform is not None:
            return {"waveform_samples": len(self.waveform), "sample_rate": self.sample_rate}
        return {"audio_bytes": len(self.audio_bytes)}

    def load_waveform(self) -> torch.Tensor:
        """The audio as (samples,) float32, mono, 16 kHz (data/audio.py's conventions)."""
        from data.audio import DurationPolicy, load_audio
        from model.features import resample

        no_limit = DurationPolicy(max_seconds=None)  # benchmarks run whole recordings in one pass
        if self.waveform is not None:
            signal = torch.as_tensor(np.asarray(self.waveform, dtype=np.float32))
            if signal.dim() == 2:  # soundfile layout (samples, channels)
                signal = signal.mean(-1)
            return resample(signal, self.sample_rate, 16000) if self.sample_rate != 16000 else signal
        if self.audio_bytes is not None:
            import soundfile

            try:
                samples, rate = soundfile.read(io.BytesIO(self.audio_bytes), dtype="float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError) as error:
                raise BenchmarkError(f"item {self.id!r}: the embedded audio cannot be decoded ({error})") from None
            signal = torch.from_numpy(samples.mean(axis=1))
            return resample(signal, rate, 16000) if rate != 16000 else signal
        if isinstance(self.audio_path, tuple):
            channels = [load_audio(p, offset=self.offset, duration=self.duration, policy=no_limit).waveform
                        for p in self.audio_path]
            mix = torch.zeros(max(len(c) for c in channels))
            for channel in channels:
                mix[: len(channel)] += channel
            peak = float(mix.abs().max())
            return mix / peak if peak > 1.0 else mix
        return load_audio(self.audio_path, offset=self.offset, duration=self.duration, policy=no_limit).waveform


@dataclass
class Benchmark:
    """A named benchmark; `items()` gives a fresh iterator over its items each time it is called."""

    name: str
    spec: str
    kind: str
    _items: Callable[[], Iterator[BenchmarkItem]]
    limit: int | None = None

    def items(self) -> Iterator[BenchmarkItem]:
        for count, item in enumerate(self._items()):
            if self.limit is not None and count >= self.limit:
                return
            yield item
