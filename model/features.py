"""Log-mel features exactly as Phi-4-multimodal computes them, and audio-token counts.

Reference: the speechlib extractor in the remote code of microsoft/Phi-4-multimodal-instruct
(`processing_phi4mm.py`, `_extract_spectrogram` + `_extract_features`) and transformers'
`Phi4MultimodalFeatureExtractor._torch_extract_fbank_features`. Both compute, at 16 kHz:

    frames  = (N - 400) // 160 + 1 windows of 400 samples, hop 160, no centering, tail dropped
    emph    = (frame - 0.97 * prev) * 32768, prev = roll(frame, 1) with prev[0] = prev[1]
              (= frame[0]: pre-emphasis restarts in every frame; float32, as both references)
    spec    = rfft(hamming400(non-periodic, float64) * emph, n=512)   float64, as both
    power   = |spec|^2 in float32 (both cast the spectrum to complex64 first)
    log_mel = ln(max(power @ mel, 1)), mel: 80 triangles on the Kaldi mel scale, 0-7690 Hz

Computing the window product and the FFT in float64 is what makes the output match both
references to ~1e-6: their float32 pre-emphasis leaves bins whose power is ~1e-8 of the frame's
so ill-conditioned that a float32 FFT moves their log by up to ~2e-3. The float64 FFT costs
little next to the memory traffic, which we cut by working on blocks of frames that stay in
cache, by pre-emphasising the signal once instead of every frame (bit-identical: each sample
sees the same float32 operations), and by padding to 512 once per buffer.

Input: float audio in [-1, 1) or int16/int32 PCM (scaled to full scale), mono or
[samples, channels] (downmixed by the mean), any sample rate (resampled to 16 kHz with
torchaudio's windowed-sinc defaults); features are float32, without autograd, on the input's
device. What the references expect and our choices where they are silent: docs/features.md.

Filterbanks (`filterbank=`):
- "speechlib" (default): `speechlib_mel(16000, 512, 80, fmax=7690)` of the original remote code,
  the matrix the public checkpoint was trained with. It fills only FFT bins
  [f2bin(0) + 1, f2bin(7690)) = [1, 246), f2bin(f) = int(f * 512 / 16000 + 0.5).
- "transformers": `mel_filter_bank(257, 80, 0, 7690, 16000, triangularize_in_mel_space=True,
  mel_scale="kaldi")` as transformers >= 4.53 builds it: the same triangles over every bin, so
  bin 246 (7687.5 Hz, just under 7690 Hz) gets weight ~0.00972 in filter 79. That coefficient is
  the only difference; every other one is bit-identical in float32.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
WIN_LENGTH = 400
HOP_LENGTH = 160
N_FFT = 512
N_MELS = 80
MEL_MAX_HZ = 7690.0
PREEMPHASIS = 0.97
AUDIO_COMPRESSION_RATE = 8  # encoder subsampling: one audio token per 8 frames
FILTERBANKS = ("speechlib", "transformers")

_BLOCK_FRAMES = 2048  # frames per block: keeps the float64 FFT buffer (8 MiB) in cache
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_SCALES = {torch.int16: 32768.0, torch.int32: 2147483648.0}
_NUMPY_DTYPES = tuple(np.dtype(name) for name in ("float16", "float32", "float64", "int16", "int32"))
_ACCEPTED = "float16, bfloat16, float32, float64 (in [-1, 1)), int16 or int32 (PCM)"


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Feature frames for a clip of `num_samples` at `sample_rate`: (N16k - 400) // 160 + 1.

    N16k is the length after resampling to 16 kHz, ceil(N * 16000 / sample_rate).
    """
    num_samples_16k = _resampled_length(int(num_samples), _check_sample_rate(sample_rate))
    if num_samples_16k < WIN_LENGTH:
        raise ValueError(
            f"audio of {num_samples_16k} samples at 16 kHz is shorter than one 25 ms frame "
            f"({WIN_LENGTH} samples); pad or drop the clip"
        )
    return (num_samples_16k - WIN_LENGTH) // HOP_LENGTH + 1


def num_audio_tokens(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Audio placeholder tokens for a clip: ceil(frames / 8), transformers' `audio_embed_sizes`."""
    return audio_tokens_for_frames(num_frames(num_samples, sample_rate))


def audio_tokens_for_frames(frames: int) -> int:
    """Audio placeholder tokens for `frames` feature frames: ceil(frames / 8)."""
    return -(-int(frames) // AUDIO_COMPRESSION_RATE)


def mel_filterbank(filterbank: str = "speechlib") -> np.ndarray:
    """The (257, 80) float32 mel matrix (FFT bin -> filter) of either reference.

    Both put 82 points evenly on the Kaldi mel scale m(f) = 1127 ln(1 + f / 700) from 0 to
    7690 Hz and give FFT bin k (at k * 31.25 Hz) the triangle weight of its mel value. speechlib
    only visits bins 1..245 and writes 1 - |center - m| / spacing; transformers visits all 257
    and writes max(0, min(rising, falling)) with per-side spacings from np.diff.
    """
    _check_filterbank(filterbank)
    mel_edges = np.linspace(0.0, 1127.0 * np.log(1.0 + MEL_MAX_HZ / 700.0), N_MELS + 2)
    left, center, right = mel_edges[:-2], mel_edges[1:-1], mel_edges[2:]  # (80,) each
    if filterbank == "speechlib":
        high_bin = int(MEL_MAX_HZ * N_FFT / SAMPLE_RATE + 0.5)  # 246, excluded
        bins = np.arange(1, high_bin)
        bin_mels = 1127.0 * np.log(1.0 + bins * SAMPLE_RATE / (N_FFT * 700.0))[:, None]  # (245, 1)
        spacing = (mel_edges[-1] - mel_edges[0]) / (N_MELS + 1)
        inside = (left < bin_mels) & (bin_mels < right)
        weights = np.zeros((N_FFT // 2 + 1, N_MELS), dtype=np.float32)
        weights[bins] = np.where(inside, 1.0 - np.abs(center - bin_mels) / spacing, 0.0)
        return weights
    bin_width = SAMPLE_RATE / N_FFT
    bin_mels = 1127.0 * np.log(1.0 + (bin_width * np.arange(N_FFT // 2 + 1)) / 700.0)[:, None]
    spacings = np.diff(mel_edges)
    rising = (bin_mels - left) / spacings[:-1]  # (257, 80)
    falling = (right - bin_mels) / spacings[1:]
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


@lru_cache(maxsize=None)
def _constants(filterbank: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """32768 x Hamming window (400,) float64 and mel matrix (257, 80) float32, per device."""
    window = torch.hamming_window(WIN_LENGTH, periodic=False, dtype=torch.float64, device=device)
    return window * 32768, torch.from_numpy(mel_filterbank(filterbank)).to(device)


def log_mel(waveform, sample_rate: int = SAMPLE_RATE, *, filterbank: str = "speechlib") -> torch.Tensor:
    """Log-mel features (frames, 80) float32 of one clip: the module docstring's computation.

    `waveform`: numpy array or torch tensor, 1-D mono or 2-D [samples, channels];
    `sample_rate`: its rate in Hz (resampled to 16 kHz when different).
    """
    _check_filterbank(filterbank)
    return _log_mel_16k(_prepare(waveform, sample_rate), filterbank)


def log_mel_batch(
    waveforms, sample_rate: int | list[int] = SAMPLE_RATE, *, filterbank: str = "speechlib"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, max_frames, 80) and valid frame counts (N,) int64 for a list of clips.

    Valid frames equal `log_mel` of each clip alone, and equal transformers' batched
    `audio_input_features`. Padded frames hold exactly 0.0, i.e. ln(1), the clamp floor and the
    value of a silent frame. transformers zero-pads the waveforms and zeroes the frames
    [valid, L // 160 - 1) of a clip of L samples, which leaves the one or two frames after them
    that start before sample L (computed from the clip's last samples and the zero padding)
    nonzero. Both mark every padded frame invalid in the attention mask
    (`arange(max_frames) < lengths`), so no consumer should read them. `sample_rate` is one
    rate for all clips or one per clip.
    """
    _check_filterbank(filterbank)
    if isinstance(waveforms, (np.ndarray, torch.Tensor)) or not hasattr(waveforms, "__len__"):
        raise TypeError(
            f"log_mel_batch expects a list of waveforms, got {type(waveforms).__name__}; "
            "for one clip call log_mel, for a [clips, samples] array pass list(array)"
        )
    if len(waveforms) == 0:
        raise ValueError("log_mel_batch got an empty list of waveforms; pass at least one clip")
    rates = list(sample_rate) if isinstance(sample_rate, (list, tuple)) else [sample_rate] * len(waveforms)
    if len(rates) != len(waveforms):
        raise ValueError(f"got {len(rates)} sample rates for {len(waveforms)} waveforms; pass one or one per clip")
    features = []
    for index, (waveform, rate) in enumerate(zip(waveforms, rates)):
        try:
            features.append(_log_mel_16k(_prepare(waveform, rate), filterbank))
        except (ValueError, TypeError) as error:
            raise type(error)(f"clip {index}: {error}") from None
    return pad_features(features)


def pad_features(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips' (frames, 80) features -> (N, max_frames, 80) and valid frame counts (N,) int64,
    padded with 0.0 on the first clip's device (the counts on the CPU): `log_mel_batch`'s batching, shared with callers
    that compute (or read from a cache) each clip's features alone, so their batches are
    bit-identical to `log_mel_batch`'s."""
    if len(features) == 0:
        raise ValueError("pad_features got an empty list of features; pass at least one clip")
    lengths = torch.tensor([clip.shape[0] for clip in features], dtype=torch.long)
    batch = features[0].new_zeros(len(features), int(lengths.max()), N_MELS)  # (N, max_frames, 80)
    for index, clip in enumerate(features):
        batch[index, : clip.shape[0]] = clip.to(batch.device)
    return batch, lengths


@torch.no_grad()
def _log_mel_16k(signal: torch.Tensor, filterbank: str) -> torch.Tensor:
    """(samples,) float32 at 16 kHz -> (frames, 80) float32, block by block of frames."""
    if signal.device.type == "mps":  # MPS has no float64: compute on the CPU, hand back
        return _log_mel_16k(signal.cpu(), filterbank).to(signal.device)
    window, mel = _constants(filterbank, signal.device)
    total = (signal.shape[0] - WIN_LENGTH) // HOP_LENGTH + 1
    out = torch.empty(total, N_MELS, dtype=torch.float32, device=signal.device)
    buffer = torch.zeros(min(total, _BLOCK_FRAMES), N_FFT, dtype=torch.float64, device=signal.device)
    for begin in range(0, total, _BLOCK_FRAMES):
        count = min(_BLOCK_FRAMES, total - begin)
        span = signal[begin * HOP_LENGTH : (begin + count - 1) * HOP_LENGTH + WIN_LENGTH]
        # Sample n >= 1 of a frame: x[n] - 0.97 x[n-1], the references' float32 operations, done
        # once per sample instead of per frame. Their x 32768 is exact, so it lives in `window`.
        scaled = PREEMPHASIS * span
        emphasized = span - scaled.roll(1)  # index 0 is column 0 of frame 0, overwritten below
        block = buffer[:count]  # (count, 512); columns 400.. stay zero: the n=512 padding
        block[:, :WIN_LENGTH].copy_(emphasized.unfold(0, WIN_LENGTH, HOP_LENGTH)).mul_(window)
        # Sample 0 of a frame uses prev[0] = frame[0]: x[s] - 0.97 x[s].
        starts = (span[::HOP_LENGTH] - scaled[::HOP_LENGTH])[:count]  # (count,)
        block[:, 0] = starts.to(torch.float64) * window[0]
        spectrum = torch.view_as_real(torch.fft.rfft(block).to(torch.complex64))  # (count, 257, 2)
        real, imag = spectrum[..., 0], spectrum[..., 1]
        power = torch.mul(real, real).addcmul_(imag, imag)  # (count, 257) float32
        torch.matmul(power, mel, out=out[begin : begin + count])  # (count, 80)
    return out.clamp_(min=1.0).log_()


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Windowed-sinc resampling of a float tensor along its last axis, returned as float32.

    Hann-windowed sinc, 6 zero crossings, roll-off 0.99 (torchaudio's `resample` defaults):
    `torchaudio.functional.resample` when torchaudio imports, else `_sinc_resample`.
    Output length is ceil(N * new_sr / orig_sr).
    """
    orig_sr, new_sr = _check_sample_rate(orig_sr), _check_sample_rate(new_sr)
    waveform = waveform.to(torch.float32)
    if orig_sr == new_sr:
        return waveform
    try:
        import torchaudio.functional as torchaudio_functional
    except Exception:  # not installed, or built for another torch (undefined symbols)
        return _sinc_resample(waveform, orig_sr, new_sr)
    return torchaudio_functional.resample(waveform, orig_sr, new_sr)


@lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Polyphase kernel (new, 1, 2 width + orig): row j yields output sample j of each block.

    Output sample j of a block sits j / new input blocks past its start; its taps are
    sinc(pi base t) * hann(t) * base / orig at the input offsets t (in units of 1 / base, cut at
    6 zero crossings), base = 0.99 min(orig, new) the anti-aliasing cutoff.
    """
    zero_crossings, base = 6, 0.99 * min(orig, new)
    width = math.ceil(zero_crossings * orig / base)
    offsets = torch.arange(-width, width + orig, dtype=torch.float64, device=device) / orig  # (taps,)
    phases = torch.arange(0, -new, -1, dtype=torch.float64, device=device)[:, None] / new  # (new, 1)
    t = ((phases + offsets) * base).clamp(-zero_crossings, zero_crossings)  # (new, taps)
    hann = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * hann * (base / orig)).to(torch.float32)[:, None, :], width


def _sinc_resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Pure-torch port of torchaudio's sinc_interp_hann resampling: one strided conv1d.

    Reducing orig_sr / new_sr to orig / new, each block of `orig` input samples yields `new`
    output samples, one per kernel row (the polyphase components), all in one conv1d call.
    """
    gcd = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // gcd, new_sr // gcd
    kernel, width = _sinc_kernel(orig, new, waveform.device)
    leading, length = waveform.shape[:-1], waveform.shape[-1]
    padded = F.pad(waveform.reshape(-1, 1, length), (width, width + orig))  # (B, 1, length + pad)
    blocks = F.conv1d(padded, kernel, stride=orig)  # (B, new, blocks)
    resampled = blocks.transpose(1, 2).reshape(blocks.shape[0], -1)  # (B, blocks * new)
    return resampled[:, : _resampled_length(length, orig_sr, new_sr)].reshape(*leading, -1)


def _resampled_length(num_samples: int, orig_sr: int, new_sr: int = SAMPLE_RATE) -> int:
    gcd = math.gcd(orig_sr, new_sr)
    return -(-num_samples * (new_sr // gcd) // (orig_sr // gcd))


def _prepare(waveform, sample_rate) -> torch.Tensor:
    """Validate any accepted input and return mono float32 (samples,) at 16 kHz (the input
    conventions of docs/features.md)."""
    sample_rate = _check_sample_rate(sample_rate)
    if isinstance(waveform, np.ndarray):
        if waveform.dtype not in _NUMPY_DTYPES:
            raise ValueError(f"unsupported audio dtype {waveform.dtype}; accepted: {_ACCEPTED}")
        waveform = torch.from_numpy(np.ascontiguousarray(waveform))
    elif not isinstance(waveform, torch.Tensor):
        raise TypeError(
            f"audio must be a numpy array or torch tensor, got {type(waveform).__name__}; "
            "wrap it with np.asarray(..., dtype=np.float32)"
        )
    if waveform.dtype in _INT_SCALES:
        signal = waveform.to(torch.float32) / _INT_SCALES[waveform.dtype]
    elif waveform.dtype in _FLOAT_DTYPES:
        signal = waveform.to(torch.float32)
        bad = ~torch.isfinite(signal) if not torch.isfinite(signal.sum()) else None  # one pass if clean
        if bad is not None and bad.any():
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"audio has {int(bad.sum())} NaN or inf samples (first at index {first}); "
                "the decoder or an earlier step produced them: fix it, or replace them, "
                "e.g. np.nan_to_num(audio)"
            )
        check_peak(signal)
    else:
        raise ValueError(f"unsupported audio dtype {str(waveform.dtype).replace('torch.', '')}; accepted: {_ACCEPTED}")
    if signal.dim() == 2:
        samples, channels = signal.shape
        if channels > samples:
            raise ValueError(
                f"2-D audio of shape {tuple(signal.shape)} looks like [channels, samples]; "
                "stereo must be [samples, channels] (soundfile's layout): pass audio.T"
            )
        signal = signal.mean(dim=1)
    elif signal.dim() != 1:
        raise ValueError(
            f"audio must be 1-D [samples] or 2-D [samples, channels], got {signal.dim()}-D of shape "
            f"{tuple(signal.shape)}; for a batch of clips call log_mel_batch with a list"
        )
    if signal.numel() == 0:
        raise ValueError("audio is empty (0 samples); drop the clip or check how it was loaded")
    num_samples = signal.shape[0]
    signal = resample(signal, sample_rate, SAMPLE_RATE)
    if signal.shape[0] < WIN_LENGTH:
        resampled = f" ({num_samples} at {sample_rate} Hz)" if sample_rate != SAMPLE_RATE else ""
        raise ValueError(
            f"audio has {signal.shape[0]} samples at 16 kHz{resampled}, fewer than one 25 ms frame "
            f"({WIN_LENGTH} samples at 16 kHz); pad it with zeros or drop the clip"
        )
    return signal.contiguous()


# Float samples beyond this magnitude are not audio (float WAVs lie in [-1, 1]); up to it the
# float32 power spectrum stays finite: (512 bins x 32768 scale x 1e6)^2 ~ 3e26 < 3.4e38.
MAX_SAMPLE_MAGNITUDE = 1e6


def check_peak(signal: torch.Tensor) -> float:
    """The clip's peak |sample|; ValueError above MAX_SAMPLE_MAGNITUDE, where the log-mel
    features would overflow to inf / NaN (a finite 1e30 passes the NaN check, not this one)."""
    peak = float(signal.abs().max()) if signal.numel() else 0.0
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise ValueError(
            f"audio samples reach {peak:.3g}, far outside [-1, 1]: its log-mel features would not be finite; "
            "the file is not scaled as audio: rescale it (x / max|x|) or re-export it"
        )
    return peak


def _check_sample_rate(sample_rate) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"sample_rate must be an integer number of Hz, got {type(sample_rate).__name__}")
    if not (sample_rate > 0 and float(sample_rate).is_integer()):
        raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate}")
    return int(sample_rate)


def _check_filterbank(filterbank: str) -> None:
    if filterbank not in FILTERBANKS:
        raise ValueError(f"filterbank must be one of {FILTERBANKS}, got {filterbank!r}")
