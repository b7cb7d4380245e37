"""Dialogue turns -> 16 kHz speech with espeak-ng: one voice per speaker, jitter, optional noise.

Each speaker gets a distinct espeak-ng voice, an accent + a variant (e.g. "en-us+f2"), with its
own base speed (words per minute), pitch and loudness; each turn jitters speed and pitch a little.
Turns are separated by 0.15-0.4 s of silence, the meeting is resampled from espeak-ng's 22.05 kHz
to 16 kHz (`model.features.resample`), and with probability 0.5 white noise is added at an SNR
of 20-35 dB.

Voice sets (`voice_pool`): every accent is in both, the variants are disjoint. "train" crosses
the 9 accents with `TRAIN_VARIANTS` (333 voices) and is used by every split but the two
unseen-voice tests; "unseen" crosses them with `UNSEEN_VARIANTS`, never heard in training, for
test_voices and test_shifted (the paper's out-of-domain benchmarks have other speakers). Base
speed 150-210 wpm and pitch 20-80 cover a wider range than any one variant, a cheap speed and
pitch perturbation; the variants themselves change formants and timbre. (A set of 8 training
voices did not generalize: word error 0.89 on 5 unseen ones, with the true turn boundaries.)

Deterministic: espeak-ng gives the same samples for the same text, voice, speed and pitch, and
every random choice here comes from the caller's `random.Random` (tests/toy check the bytes).
"""
from __future__ import annotations

import io
import random
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile
import torch

from model.features import SAMPLE_RATE, resample

from .dialogue import Turn

ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4", "adam", "Alex", "Andy", "annie",
                  "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "Gene", "grandma",
                  "grandpa", "iven", "john", "linda", "max", "michel", "norbert", "paul", "quincy", "rob",
                  "robert", "steph", "travis")
UNSEEN_VARIANTS = ("m7", "m8", "f5", "anika", "shelby", "marcelo", "pablo", "antonio", "gustave", "Mario",
                   "steph2", "iven2", "edward2", "Lee", "victor", "zac")
VOICE_SETS = ("train", "unseen")


def voice_pool(voice_set: str) -> tuple[str, ...]:
    """Every "accent+variant" voice of `voice_set` ("train" | "unseen"; module docstring)."""
    if voice_set not in VOICE_SETS:
        raise ValueError(f"unknown voice set {voice_set!r}; expected one of {VOICE_SETS}")
    variants = TRAIN_VARIANTS if voice_set == "train" else UNSEEN_VARIANTS
    return tuple(f"{accent}+{variant}" for accent in ACCENTS for variant in variants)


INSTALL_HINT = (
    "espeak-ng is needed to synthesize the toy world's audio and was not found on PATH. Install it with "
    "`sudo apt-get install espeak-ng` (Debian/Ubuntu), `sudo dnf install espeak-ng` (Fedora), "
    "`brew install espeak-ng` (macOS) or `conda install -c conda-forge espeak-ng`; "
    "`make demo` runs apt-get for you where it can."
)


class EspeakMissing(RuntimeError):
    """espeak-ng is not installed; the message says how to install it."""


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


@dataclass(frozen=True)
class Voice:
    name: str  # espeak-ng voice + variant, e.g. "en-us+f2"
    speed: int  # words per minute
    pitch: int  # 0-99
    gain: float


def assign_voices(speakers: tuple[str, ...], voice_set: str, rng: random.Random) -> dict[str, Voice]:
    """A distinct voice per speaker from `voice_pool(voice_set)`, with its base speed, pitch and loudness."""
    names = rng.sample(voice_pool(voice_set), len(speakers))
    return {speaker: Voice(name, rng.randint(150, 210), rng.randint(20, 80), round(rng.uniform(0.6, 1.0), 3))
            for speaker, name in zip(speakers, names)}


def espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """espeak-ng's waveform of `text`: (float32 samples, sample rate)."""
    if not espeak_available():
        raise EspeakMissing(INSTALL_HINT)
    result = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                            capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r} (exit {result.returncode}): "
                           f"{result.stderr.decode(errors='replace').strip()}")
    samples, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
    return samples, rate


@dataclass(frozen=True)
class Speech:
    waveform: np.ndarray  # float32 (samples,) at 16 kHz
    segments: list[tuple[float, float]]  # (start, end) seconds of each turn
    noise_snr_db: float | None


def render_speech(turns: list[Turn], voices: dict[str, Voice], rng: random.Random, *,
                  noise_probability: float = 0.5) -> Speech:
    """The meeting's audio at 16 kHz and where each turn lies in it (module docstring)."""
    pieces, segments, position, rate = [], [], 0, None
    for turn in turns:
        voice = voices[turn.speaker]
        speed = voice.speed + rng.randint(-8, 8)
        pitch = min(99, max(0, voice.pitch + rng.randint(-6, 6)))
        samples, turn_rate = espeak(turn.text, voice.name, speed, pitch)
        if rate is not None and turn_rate != rate:
            raise RuntimeError(f"espeak-ng voice {voice.name!r} wrote {turn_rate} Hz, the others {rate} Hz")
        rate = turn_rate
        gap = np.zeros(int(rng.uniform(0.15, 0.4) * rate), dtype=np.float32)
        pieces += [gap, samples * voice.gain]
        start = position + gap.shape[0]
        position = start + samples.shape[0]
        segments.append((start / rate, position / rate))
    pieces.append(np.zeros(int(0.3 * rate), dtype=np.float32))
    waveform = resample(torch.from_numpy(np.concatenate(pieces)), rate, SAMPLE_RATE).numpy()
    snr = None
    if rng.random() < noise_probability:
        snr = round(rng.uniform(20.0, 35.0), 2)
        signal_power = float(np.mean(waveform**2)) or 1e-8
        noise = np.random.default_rng(rng.getrandbits(63)).standard_normal(waveform.shape[0])
        waveform = waveform + (noise * np.sqrt(signal_power / 10 ** (snr / 10))).astype(np.float32)
    return Speech(np.clip(waveform, -1.0, 1.0).astype(np.float32), segments, snr)


def write_wav(path, waveform: np.ndarray) -> None:
    """16-bit PCM mono WAV at 16 kHz."""
    soundfile.write(str(path), waveform, SAMPLE_RATE, subtype="PCM_16", format="WAV")
