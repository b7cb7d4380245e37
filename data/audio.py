"""Audio files -> mono float32 waveforms at 16 kHz, with offsets, durations and a length policy.

Reading is soundfile (libsndfile): WAV (PCM 8/16/24/32-bit, float), FLAC, OGG/Vorbis, MP3
(libsndfile >= 1.1) and the other formats libsndfile knows. soundfile scales every PCM subtype
to float32 in [-1, 1) (8-bit WAV is unsigned, PCM_U8, and comes out centred as well), so
8-, 16- and 24-bit files need nothing special. Then:

- mono: channels are averaged (the downmix model/features.py uses), block by block while reading,
  so a 30-minute 44.1 kHz stereo file never exists as a float32 (frames, 2) array;
- 16 kHz: `model.features.resample` (windowed sinc, torchaudio's defaults);
- `offset` / `duration` in seconds select the segment [offset, offset + duration); a duration
  that runs past the end of the file by more than `DURATION_TOLERANCE_S` (manifests round
  durations; MP3 frame counts differ by the encoder delay) is an error, a smaller excess is
  clipped to the end of the file;
- `DurationPolicy`: a segment longer than `max_seconds` is an error (`on_too_long="error"`), or
  is cut to its first `max_seconds` with a logged warning (`"truncate"`). The paper trains on
  recordings of up to 30 minutes, hence the default 1800 s.

Problems raise `AudioError`, whose message says what is wrong with which file and what to do,
and whose `field` names the manifest field to blame ('audio_filepath', 'offset' or 'duration'),
so that data/dataset.py and data.check can report "FILE:LINE: field 'offset': ...".
NaN or infinite samples are an error: they would turn the loss NaN many steps later. So are
finite samples beyond `MAX_SAMPLE_MAGNITUDE` (1e6; a float WAV of 1e30 passes every NaN check,
but its log-mel is all NaN); a float file whose peak is merely above 1 is used with a warning
(`Audio.peak`, which `data.check --decode` reports).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch

from model.features import MAX_SAMPLE_MAGNITUDE, SAMPLE_RATE, WIN_LENGTH, resample

logger = logging.getLogger(__name__)

DURATION_TOLERANCE_S = 0.1
FLOAT_PEAK_TOLERANCE = 1e-3  # a float file's peak may pass 1 by this much before a warning
MAX_TRAIN_SECONDS = 1800.0  # the paper: training audio up to 30 minutes
ON_TOO_LONG = ("error", "truncate")
_READ_BLOCK_SECONDS = 60
_WAV_MAGIC = (b"RIFF", b"RIFX", b"RF64")
_CONVERT_HINT = "convert it, e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`"


class AudioError(ValueError):
    """An audio file that cannot be used.

    `field`: the manifest field the problem belongs to; `reason`: a short key for counters
    ("audio_file": unreadable or bad samples, "segment": offset/duration outside the file,
    "over_max_duration": longer than the duration policy allows).
    """

    def __init__(self, message: str, field: str = "audio_filepath", reason: str | None = None):
        super().__init__(message)
        self.field = field
        self.reason = reason or ("audio_file" if field == "audio_filepath" else "segment")


@dataclass(frozen=True)
class DurationPolicy:
    """The maximum-duration policy: `max_seconds` None means no limit."""

    max_seconds: float | None = MAX_TRAIN_SECONDS
    on_too_long: str = "error"  # "error" or "truncate"

    def __post_init__(self) -> None:
        if self.on_too_long not in ON_TOO_LONG:
            raise ValueError(f"DurationPolicy.on_too_long must be one of {ON_TOO_LONG}, got {self.on_too_long!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"DurationPolicy.max_seconds must be > 0 or None, got {self.max_seconds}")

    def apply(self, seconds: float, what: str) -> float:
        """The seconds to use of a `seconds`-long segment; raises AudioError under "error"."""
        if self.max_seconds is None or seconds <= self.max_seconds:
            return seconds
        if self.on_too_long == "error":
            raise AudioError(f"{what} is {seconds:.2f} s long, over the limit of {self.max_seconds:g} s; split it "
                             "(offset/duration) or raise the limit (max_duration)", field="duration",
                             reason="over_max_duration")
        logger.warning("%s is %.2f s long; truncated to the limit of %g s", what, seconds, self.max_seconds)
        return self.max_seconds


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says."""

    path: Path
    format: str  # "WAV", "FLAC", "OGG", "MP3", ...
    subtype: str  # "PCM_16", "PCM_U8", "PCM_24", "FLOAT", "VORBIS", ...
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


@dataclass
class Audio:
    """A loaded segment: `waveform` (samples,) float32 mono at 16 kHz."""

    waveform: torch.Tensor
    info: AudioInfo
    offset: float  # seconds into the file where the segment starts
    seconds: float  # seconds read from the file (after any truncation)
    truncated: bool  # the duration policy cut the segment
    peak: float = 0.0  # max |sample| read from the file (above 1 only in float files)

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[0])


def probe(path: str | Path) -> AudioInfo:
    """Read the header of `path`; AudioError when it is missing, empty, damaged or not audio."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path} does not exist; check the path (relative paths are resolved against the "
                         "manifest's folder)")
    if not path.is_file():
        raise AudioError(f"{path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise AudioError(f"{path} is empty (0 bytes); re-export or drop the recording")
    try:
        info = soundfile.info(str(path))
    except soundfile.LibsndfileError as error:
        raise AudioError(_unreadable(path, size, error)) from None
    except (RuntimeError, OSError) as error:
        raise AudioError(f"{path} cannot be opened: {error}") from None
    if info.frames <= 0:
        raise AudioError(f"{path} has a valid {info.format} header but holds no audio samples (0 frames); "
                         "re-export or drop the recording")
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(f"{path} has an invalid header ({info.samplerate} Hz, {info.channels} channels); "
                         f"{_CONVERT_HINT}")
    return AudioInfo(path, info.format, info.subtype, int(info.samplerate), int(info.channels), int(info.frames))


def segment_frames(info: AudioInfo, offset: float = 0.0, duration: float | None = None,
                   policy: DurationPolicy = DurationPolicy()) -> tuple[int, int, bool]:
    """(start, stop, truncated) frame indices of [offset, offset + duration) in the file.

    Checks the offset and duration against the file's length (see the module docstring) and
    applies `policy`. Needs only the header, so data.check calls it without reading samples.
    """
    rate = info.sample_rate
    start = int(round(offset * rate))
    if offset < 0 or start >= info.frames:
        raise AudioError(f"offset {offset:g} s is past the end of {info.path.name} ({info.duration:.2f} s long); "
                         "fix the offset", field="offset")
    available = (info.frames - start) / rate
    if duration is None:
        seconds = available
    elif duration > available + DURATION_TOLERANCE_S:
        raise AudioError(f"offset {offset:g} s + duration {duration:g} s runs past the end of {info.path.name} "
                         f"({info.duration:.2f} s long); fix the duration", field="duration")
    else:
        seconds = min(duration, available)
    kept = policy.apply(seconds, f"the segment of {info.path.name} at offset {offset:g} s")
    stop = min(info.frames, start + int(round(kept * rate)))
    return start, stop, kept < seconds


def load_audio(path: str | Path, *, offset: float = 0.0, duration: float | None = None,
               policy: DurationPolicy = DurationPolicy()) -> Audio:
    """Mono float32 16 kHz samples of [offset, offset + duration) of `path` (see the module docstring)."""
    info = probe(path)
    start, stop, truncated = segment_frames(info, offset, duration, policy)
    mono = _read_mono(info, start, stop)  # (stop - start,) float32 at the file's rate
    bad = ~np.isfinite(mono)
    if bad.any():
        first = int(np.argmax(bad))
        raise AudioError(f"{info.path} has {int(bad.sum())} NaN or infinite samples (first at "
                         f"{(start + first) / info.sample_rate:.3f} s); re-export the recording or replace them, "
                         "e.g. with np.nan_to_num")
    peak = float(np.abs(mono).max()) if mono.size else 0.0
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise AudioError(f"{info.path} has samples up to {peak:.3g}, far outside [-1, 1]: its log-mel features would "
                         "not be finite; the file is not scaled as audio: rescale it (x / max|x|) or re-export it")
    if peak > 1.0 + FLOAT_PEAK_TOLERANCE:  # only float files can hold these
        logger.warning("%s: %s", info.path, peak_warning(peak))
    waveform = resample(torch.from_numpy(mono), info.sample_rate, SAMPLE_RATE)  # (samples,) at 16 kHz
    if waveform.shape[0] < WIN_LENGTH:
        milliseconds = 1000 * waveform.shape[0] / SAMPLE_RATE
        raise AudioError(f"the segment of {info.path.name} at offset {offset:g} s is {milliseconds:.1f} ms long, "
                         "shorter than one 25 ms feature frame; drop it or give a longer duration",
                         field="duration")
    return Audio(waveform, info, offset=start / info.sample_rate, seconds=mono.shape[0] / info.sample_rate,
                 truncated=truncated, peak=peak)


def peak_warning(peak: float) -> str:
    return (f"peak amplitude {peak:.3g} is outside [-1, 1] (float samples that clip or are mis-scaled); "
            "it is used as it is: normalize the file if that is not meant")


def _read_mono(info: AudioInfo, start: int, stop: int) -> np.ndarray:
    """Frames [start, stop) averaged over channels, read a block at a time. (stop - start,) float32"""
    total = stop - start
    mono = np.empty(total, dtype=np.float32)
    block = max(1, _READ_BLOCK_SECONDS * info.sample_rate)
    done = 0
    try:
        with soundfile.SoundFile(str(info.path)) as handle:
            if start:
                handle.seek(start)
            while done < total:
                chunk = handle.read(min(block, total - done), dtype="float32", always_2d=True)  # (n, channels)
                if chunk.shape[0] == 0:
                    break
                mono[done : done + chunk.shape[0]] = chunk[:, 0] if chunk.shape[1] == 1 else chunk.mean(axis=1)
                done += chunk.shape[0]
    except soundfile.LibsndfileError as error:
        raise AudioError(f"{info.path}: decoding failed after {done / info.sample_rate:.2f} s "
                         f"({getattr(error, 'error_string', error)}); the file is damaged, {_CONVERT_HINT}") from None
    short = total - done
    if short > DURATION_TOLERANCE_S * info.sample_rate:
        raise AudioError(f"{info.path} ends after {(start + done) / info.sample_rate:.2f} s although its header "
                         f"says {info.duration:.2f} s; the file is truncated, re-export it")
    return mono[:done]


def _unreadable(path: Path, size: int, error: Exception) -> str:
    reason = getattr(error, "error_string", None) or str(error)
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head[:4] in _WAV_MAGIC:
        return (f"{path} has a truncated or damaged WAV header ({size} bytes; libsndfile: {reason}); "
                f"re-export the recording")
    text = _as_text(head)
    if text is not None:
        shown = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"{path} is a text file, not audio (it starts with {shown!r}); point audio_filepath at the recording"
    return f"{path} is not in an audio format soundfile can read (libsndfile: {reason}); {_CONVERT_HINT}"


def _as_text(head: bytes) -> str | None:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # a multi-byte character cut at byte 64
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return None
    if any(ord(c) < 32 and c not in "\t\r\n" for c in text):
        return None
    return text


def seconds_to_samples_16k(seconds: float) -> int:
    """Samples at 16 kHz of `seconds` of audio (what planning uses from manifest durations)."""
    return int(math.floor(seconds * SAMPLE_RATE + 0.5))
