"""model.features against both references: transformers' Phi4MultimodalFeatureExtractor and the
original speechlib extractor of microsoft/Phi-4-multimodal-instruct (transcribed below from its
remote code, `processing_phi4mm.py`, as a numpy oracle).

Measured on these signals: max |ours - reference| <= 2e-6 on log-mel (the references' own
float32 power is the limit); PARITY_ATOL leaves room for other BLAS / FFT builds.
"""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from model import features
from model.features import log_mel, log_mel_batch, mel_filterbank, num_audio_tokens, num_frames, resample

transformers = pytest.importorskip("transformers")
from transformers import Phi4MultimodalFeatureExtractor  # noqa: E402
from transformers.audio_utils import mel_filter_bank  # noqa: E402

PARITY_ATOL = 1e-4


def speechlib_mel_loop() -> np.ndarray:
    """`speechlib_mel(16000, 512, 80, fmax=7690)` of the original remote code, loop for loop."""
    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    def bin2mel(fft_bin):
        return 1127.0 * np.log(1.0 + fft_bin * 16000 / (512 * 700.0))

    klo, khi = int(0 * 512 / 16000 + 0.5) + 1, int(7690 * 512 / 16000 + 0.5)
    m_centers = np.linspace(mel(0), mel(7690), 82)
    ms = (mel(7690) - mel(0)) / 81
    matrix = np.zeros((80, 257), dtype=np.float32)
    for m in range(80):
        left, center, right = m_centers[m], m_centers[m + 1], m_centers[m + 2]
        for fft_bin in range(klo, khi):
            mbin = bin2mel(fft_bin)
            if left < mbin < right:
                matrix[m, fft_bin] = 1.0 - abs(center - mbin) / ms
    return matrix.T


def speechlib_features(wav: np.ndarray) -> np.ndarray:
    """The original `_extract_spectrogram` + `_extract_features` at 16 kHz, in numpy."""
    n_batch = (wav.shape[0] - 400) // 160 + 1
    y_frames = np.array([wav[s : s + 400] for s in range(0, 160 * n_batch, 160)], dtype=np.float32)
    y_frames_prev = np.roll(y_frames, 1, axis=1)
    y_frames_prev[:, 0] = y_frames_prev[:, 1]
    y_frames = (y_frames - 0.97 * y_frames_prev) * 32768
    spectrum = np.fft.rfft(np.hamming(400) * y_frames, n=512, axis=1).astype(np.complex64)
    power = np.abs(spectrum).astype(np.float32) ** 2
    return np.log(np.clip(power.dot(speechlib_mel_loop()), 1.0, None)).astype(np.float32)


def extractor(filterbank: str = "transformers") -> Phi4MultimodalFeatureExtractor:
    fe = Phi4MultimodalFeatureExtractor()
    if filterbank == "speechlib":
        fe.mel_filters = speechlib_mel_loop()  # (257, 80), what _torch_extract_fbank_features uses
    return fe


def speechlike(num_samples: int, seed: int, sample_rate: int = 16000) -> np.ndarray:
    """Harmonics of a gliding pitch, syllable-rate envelope and a noise floor, peak ~0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / sample_rate
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    wav = 0.15 * envelope * voiced + 0.01 * rng.standard_normal(num_samples)
    return wav.astype(np.float32)


def noise(num_samples: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(num_samples)).astype(np.float32)


def reference(fe, wav, **kwargs) -> torch.Tensor:
    return fe(wav, sampling_rate=16000, return_tensors="pt", **kwargs)["audio_input_features"]


# --- mel filterbanks ---------------------------------------------------------------------------


def test_filterbanks_match_their_references_and_differ_in_one_coefficient():
    """transformers' matrix equals mel_filter_bank(...) bit for bit, speechlib's the original loop.

    The one difference: bin 246 (7687.5 Hz) in filter 79. speechlib never visits bins >=
    int(7690 * 512 / 16000 + 0.5) = 246; transformers gives it the falling slope of filter 79,
    (mel(7690) - mel(7687.5)) / spacing with spacing = mel(7690) / 81, = 0.0097191.
    """
    ours_hf, ours_sl = mel_filterbank("transformers"), mel_filterbank("speechlib")
    hf = mel_filter_bank(num_frequency_bins=257, num_mel_filters=80, min_frequency=0, max_frequency=7690,
                         sampling_rate=16000, triangularize_in_mel_space=True, mel_scale="kaldi")
    assert ours_hf.dtype == ours_sl.dtype == np.float32 and ours_hf.shape == (257, 80)
    np.testing.assert_array_equal(ours_hf, hf.astype(np.float32))
    np.testing.assert_array_equal(ours_sl, speechlib_mel_loop())
    differ = np.argwhere(ours_hf != ours_sl)
    assert differ.tolist() == [[246, 79]]
    mel_top = 1127.0 * math.log(1 + 7690 / 700)
    expected = (mel_top - 1127.0 * math.log(1 + 7687.5 / 700)) / (mel_top / 81)
    assert ours_sl[246, 79] == 0.0
    assert ours_hf[246, 79] == pytest.approx(expected, rel=1e-6) and expected == pytest.approx(0.0097191, rel=1e-4)


def test_filterbank_name_is_checked():
    with pytest.raises(ValueError, match=r"filterbank must be one of \('speechlib', 'transformers'\)"):
        log_mel(noise(1600, 0), filterbank="kaldi")


# --- parity: single clips ----------------------------------------------------------------------


@pytest.mark.parametrize("make, num_samples", [(noise, 16_000), (speechlike, 37_123), (speechlike, 400)])
def test_single_clip_matches_transformers(make, num_samples):
    wav = make(num_samples, seed=1)
    expected = reference(extractor(), wav)[0]
    ours = log_mel(wav, filterbank="transformers")
    assert ours.dtype == torch.float32 and ours.shape == expected.shape == (num_frames(num_samples), 80)
    torch.testing.assert_close(ours, expected, atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("make, num_samples", [(noise, 16_000), (speechlike, 37_123)])
def test_single_clip_speechlib_matches_original_and_patched_transformers(make, num_samples):
    wav = make(num_samples, seed=2)
    ours = log_mel(wav)  # default filterbank: speechlib
    torch.testing.assert_close(ours, torch.from_numpy(speechlib_features(wav)), atol=PARITY_ATOL, rtol=0)
    torch.testing.assert_close(ours, reference(extractor("speechlib"), wav)[0], atol=PARITY_ATOL, rtol=0)


def test_ten_seconds_of_noise_match_to_float_rounding():
    """The float64 window product and FFT are what the references do, and they matter here.

    On 10 s of noise, a float32 FFT lands 2.8e-4 from transformers (the bins whose power
    is ~1e-8 of the frame's, after pre-emphasis); ours measured 1.9e-6, one float32 ulp at ~16.
    """
    wav = noise(160_000, 18)
    ours = log_mel(wav, filterbank="transformers")
    torch.testing.assert_close(ours, reference(extractor(), wav)[0], atol=2e-5, rtol=0)


def test_the_two_filterbanks_differ_only_in_the_top_filter():
    """Filter 79 gains 0.0097 x power(bin 246): visible, but only there."""
    wav = noise(16_000, 3)
    speechlib, hf = log_mel(wav), log_mel(wav, filterbank="transformers")
    torch.testing.assert_close(speechlib[:, :79], hf[:, :79], atol=0, rtol=0)
    assert (hf[:, 79] > speechlib[:, 79]).all()


# --- parity: padded batches --------------------------------------------------------------------


@pytest.mark.parametrize("filterbank", ["transformers", "speechlib"])
def test_batch_matches_transformers_on_valid_frames(filterbank):
    """Lengths 16000 (98 frames), 9_999 (60), 24_321 (150): mask, embed sizes and features agree.

    transformers' padded frames are zero except at most two right after the valid ones (they
    see the clip's last samples); ours are exactly zero.
    """
    clips = [speechlike(16_000, 4), noise(9_999, 5), speechlike(24_321, 6)]
    out = extractor(filterbank)(clips, sampling_rate=16000, return_tensors="pt")
    features_, lengths = log_mel_batch(clips, filterbank=filterbank)
    assert features_.shape == out["audio_input_features"].shape == (3, 150, 80)
    assert lengths.tolist() == [98, 60, 150] == out["audio_attention_mask"].sum(1).tolist()
    assert out["audio_embed_sizes"].tolist() == [num_audio_tokens(len(c)) for c in clips] == [13, 8, 19]
    mask = torch.arange(150)[None, :] < lengths[:, None]
    torch.testing.assert_close(features_[mask], out["audio_input_features"][mask], atol=PARITY_ATOL, rtol=0)
    assert (features_[~mask] == 0).all()
    for index, clip in enumerate(clips):
        torch.testing.assert_close(features_[index, : lengths[index]], log_mel(clip, filterbank=filterbank),
                                   atol=0, rtol=0)
    leaked = (out["audio_input_features"][~mask] != 0).any(-1).sum()
    assert 0 < leaked <= 2 * 2


def test_batch_accepts_one_rate_per_clip_and_reports_the_bad_clip():
    clips = [noise(16_000, 7), noise(44_100, 8)]
    features_, lengths = log_mel_batch(clips, [16_000, 44_100])
    assert lengths.tolist() == [98, 98]
    torch.testing.assert_close(features_[1], log_mel(clips[1], 44_100), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"^clip 1: audio is empty"):
        log_mel_batch([noise(800, 0), np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match="2 sample rates for 3 waveforms"):
        log_mel_batch([noise(800, 0)] * 3, [16_000, 16_000])
    with pytest.raises(ValueError, match="empty list"):
        log_mel_batch([])
    with pytest.raises(TypeError, match="expects a list of waveforms"):
        log_mel_batch(noise(800, 0))


# --- resampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_rate", [22_050, 44_100])
def test_resampled_clip_matches_transformers_fed_the_same_resampled_signal(sample_rate):
    wav = speechlike(int(1.3 * sample_rate), 9, sample_rate)
    at_16k = resample(torch.from_numpy(wav), sample_rate)
    assert at_16k.shape == (math.ceil(len(wav) * 16_000 / sample_rate),)
    for filterbank in features.FILTERBANKS:
        expected = reference(extractor(filterbank), at_16k.numpy())[0]
        torch.testing.assert_close(log_mel(wav, sample_rate, filterbank=filterbank), expected,
                                   atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("sample_rate", [44_100, 22_050, 48_000, 8_000])
def test_resampler_keeps_a_sine_frequency_and_amplitude(sample_rate):
    """0.5 sin(2 pi 1 kHz t) stays that sine at 16 kHz: rms error < 1e-3 away from the edges."""
    t = np.arange(sample_rate) / sample_rate
    resampled = resample(torch.from_numpy(0.5 * np.sin(2 * np.pi * 1000 * t)), sample_rate)
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(16_000) / 16_000)
    error = resampled.numpy()[200:-200] - expected[200:-200]
    assert resampled.dtype == torch.float32 and resampled.shape == (16_000,)
    assert np.sqrt(np.mean(error**2)) < 1e-3


def test_resampler_removes_what_the_new_rate_cannot_hold():
    """A 10 kHz tone at 44.1 kHz lies above the 8 kHz Nyquist: it must not alias back (to 6 kHz).

    Hann-windowed sinc with 6 zero crossings (torchaudio's default) stops it by ~45 dB
    (measured 0.0027 left of 0.5); without the low-pass the alias would keep all 0.5.
    """
    t = np.arange(44_100) / 44_100
    resampled = resample(torch.from_numpy(0.5 * np.sin(2 * np.pi * 10_000 * t)), 44_100)
    assert resampled[200:-200].abs().max() < 0.5 * 10 ** (-40 / 20)


def _spy_pure_torch_path(monkeypatch) -> list:
    calls = []
    original = features._sinc_resample

    def spy(*args):
        calls.append(args[1:])
        return original(*args)

    monkeypatch.setattr(features, "_sinc_resample", spy)
    return calls


def test_resampler_falls_back_to_pure_torch_when_torchaudio_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchaudio", None)  # `import torchaudio...` raises ImportError
    monkeypatch.setitem(sys.modules, "torchaudio.functional", None)
    calls = _spy_pure_torch_path(monkeypatch)
    out = log_mel(noise(22_050, 10), 22_050)
    assert calls == [(22_050, 16_000)] and out.shape == (98, 80)


def test_resampler_uses_torchaudio_when_it_imports(monkeypatch):
    seen = []
    fake_functional = types.ModuleType("torchaudio.functional")
    fake_functional.resample = lambda waveform, orig, new: seen.append((orig, new)) or waveform[::2]
    fake = types.ModuleType("torchaudio")
    fake.functional = fake_functional
    monkeypatch.setitem(sys.modules, "torchaudio", fake)
    monkeypatch.setitem(sys.modules, "torchaudio.functional", fake_functional)
    calls = _spy_pure_torch_path(monkeypatch)
    resample(torch.zeros(3_200), 32_000)
    assert seen == [(32_000, 16_000)] and calls == []


def test_pure_torch_resampler_matches_real_torchaudio():
    torchaudio_functional = pytest.importorskip("torchaudio.functional")
    wav = torch.from_numpy(speechlike(44_100, 11, 44_100))
    torch.testing.assert_close(features._sinc_resample(wav, 44_100, 16_000),
                               torchaudio_functional.resample(wav, 44_100, 16_000), atol=1e-6, rtol=0)


# --- input conventions -------------------------------------------------------------------------


def test_integer_pcm_is_scaled_to_unit_range():
    """int16 / 32768 and int32 / 2**31 give bit-identical features to the float input."""
    pcm16 = (np.random.default_rng(12).integers(-32768, 32768, 4_000)).astype(np.int16)
    as_float = pcm16.astype(np.float32) / 32768
    torch.testing.assert_close(log_mel(pcm16), log_mel(as_float), atol=0, rtol=0)
    pcm32 = pcm16.astype(np.int32) << 16
    torch.testing.assert_close(log_mel(torch.from_numpy(pcm32)), log_mel(as_float), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes_are_cast_to_float32(dtype):
    wav = noise(4_000, 13).astype(dtype)
    torch.testing.assert_close(log_mel(wav), log_mel(wav.astype(np.float32)), atol=0, rtol=0)
    bfloat = torch.from_numpy(noise(4_000, 13)).to(torch.bfloat16)
    torch.testing.assert_close(log_mel(bfloat), log_mel(bfloat.float()), atol=0, rtol=0)


def test_stereo_samples_by_channels_is_downmixed_by_mean():
    stereo = np.stack([noise(4_000, 14), speechlike(4_000, 15)], axis=1)  # (samples, 2)
    torch.testing.assert_close(log_mel(stereo), log_mel(stereo.mean(1)), atol=1e-6, rtol=0)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "waveform, sample_rate, error, message",
    [
        (np.zeros(0, np.float32), 16_000, ValueError, r"audio is empty \(0 samples\)"),
        (np.zeros(399, np.float32), 16_000, ValueError, r"399 samples at 16 kHz, fewer than one 25 ms frame"),
        (np.zeros(1_000, np.float32), 44_100, ValueError, r"363 samples at 16 kHz \(1000 at 44100 Hz\)"),
        (np.array([0.1] * 500 + [np.nan] * 3, np.float32), 16_000, ValueError,
         r"3 NaN or inf samples \(first at index 500\)"),
        (np.array([0.1] * 500 + [np.inf], np.float64), 16_000, ValueError, r"1 NaN or inf samples"),
        (np.zeros(800, np.complex64), 16_000, ValueError, r"unsupported audio dtype complex64; accepted: float16"),
        (np.zeros(800, bool), 16_000, ValueError, r"unsupported audio dtype bool; accepted"),
        (np.zeros(800, np.int64), 16_000, ValueError, r"unsupported audio dtype int64; accepted: .*int16 or int32"),
        (torch.zeros(800, dtype=torch.uint8), 16_000, ValueError, r"unsupported audio dtype uint8"),
        (np.zeros((2, 800, 1), np.float32), 16_000, ValueError, r"got 3-D of shape \(2, 800, 1\)"),
        (np.zeros((2, 800), np.float32), 16_000, ValueError, r"looks like \[channels, samples\].*pass audio.T"),
        ([0.0] * 800, 16_000, TypeError, r"numpy array or torch tensor, got list"),
        (np.zeros(800, np.float32), 0, ValueError, r"positive whole number of Hz, got 0"),
        (np.zeros(800, np.float32), 16_000.5, ValueError, r"positive whole number of Hz, got 16000.5"),
        (np.zeros(800, np.float32), "16k", TypeError, r"sample_rate must be an integer number of Hz, got str"),
    ],
)
def test_bad_input_is_a_clear_error(waveform, sample_rate, error, message):
    with pytest.raises(error, match=message):
        log_mel(waveform, sample_rate)


def test_shortest_valid_clip_and_whole_float_rate():
    assert log_mel(np.zeros(400, np.float32), 16_000.0).tolist() == [[0.0] * 80]  # silence: ln(1)


# --- counts ------------------------------------------------------------------------------------


def test_frame_and_token_counts_by_hand():
    """frames = (N - 400) // 160 + 1, tokens = ceil(frames / 8).

    16000 -> 15600 // 160 + 1 = 98 frames -> 13 tokens; 400 -> 1 -> 1; 559 -> 1, 560 -> 2;
    30 min = 28,800,000 -> 179,998 frames -> 22,500 tokens; 1 s at 44.1 kHz is 16000 at 16 kHz.
    """
    assert (num_frames(16_000), num_audio_tokens(16_000)) == (98, 13)
    assert (num_frames(400), num_audio_tokens(400)) == (1, 1)
    assert (num_frames(559), num_frames(560)) == (1, 2)
    assert (num_frames(28_800_000), num_audio_tokens(28_800_000)) == (179_998, 22_500)
    assert (num_frames(44_100, 44_100), num_audio_tokens(44_100, 44_100)) == (98, 13)
    with pytest.raises(ValueError, match="shorter than one 25 ms frame"):
        num_audio_tokens(399)
    for length in (400, 559, 560, 16_159, 16_160):
        assert log_mel(noise(length, 16)).shape[0] == num_frames(length)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    wav = torch.from_numpy(speechlike(44_100, 17, 44_100))
    on_gpu = log_mel(wav.cuda(), 44_100)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), log_mel(wav, 44_100), atol=1e-4, rtol=0)
