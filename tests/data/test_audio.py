"""Audio I/O: formats, mono downmix, 16 kHz, offsets and durations, the maximum-duration policy."""
import logging

import numpy as np
import pytest
import torch

import data.audio as audio_module
from data.audio import AudioError, DurationPolicy, load_audio, probe
from tests.data.helpers import RATE, tone, write_audio


@pytest.mark.parametrize("suffix,atol", [(".flac", 2**-15), (".ogg", 0.08), (".mp3", 0.08)])
def test_compressed_formats_decode_close_to_the_source(tmp_path, suffix, atol):
    """FLAC is lossless (16-bit); Vorbis and MP3 are lossy, so only close (and MP3 keeps its length
    up to the encoder delay, well inside DURATION_TOLERANCE_S)."""
    source = tone(1.0)
    path = write_audio(tmp_path / f"a{suffix}", source)
    info = probe(path)
    assert info.format == suffix[1:].upper() and info.sample_rate == RATE
    audio = load_audio(path, duration=0.9)
    assert audio.waveform.shape == (int(0.9 * RATE),)
    if suffix != ".mp3":  # MP3 decoders shift the signal by the encoder delay
        torch.testing.assert_close(audio.waveform, torch.from_numpy(source[: int(0.9 * RATE)]), atol=atol, rtol=0)
    else:
        assert abs(float(audio.waveform.pow(2).mean()) - float((source**2).mean())) < 0.01


def test_offset_and_duration_select_exact_samples_block_by_block(tmp_path, monkeypatch):
    """Reading 1-second blocks gives the same samples as one read; the segment is [offset, offset + duration)."""
    source = np.stack([tone(5.0), tone(5.0, frequency=330.0, seed=1)], axis=1)  # (samples, 2)
    path = write_audio(tmp_path / "s.wav", source, subtype="FLOAT")
    monkeypatch.setattr(audio_module, "_READ_BLOCK_SECONDS", 1)
    audio = load_audio(path, offset=1.25, duration=2.5)
    expected = source[int(1.25 * RATE) : int(3.75 * RATE)].mean(axis=1)
    torch.testing.assert_close(audio.waveform, torch.from_numpy(expected), atol=1e-7, rtol=0)
    assert audio.offset == 1.25 and audio.seconds == 2.5 and not audio.truncated
    whole = load_audio(path, offset=4.0)  # no duration: to the end of the file
    assert whole.num_samples == RATE


def test_resampling_44k1_and_8k_to_16k(tmp_path):
    for rate in (44100, 8000):
        path = write_audio(tmp_path / f"r{rate}.wav", tone(2.0, rate=rate, frequency=300.0, noise=0.0), rate=rate)
        audio = load_audio(path)
        assert audio.info.sample_rate == rate and audio.num_samples == 2 * RATE
        reference = torch.from_numpy(tone(2.0, frequency=300.0, noise=0.0))
        torch.testing.assert_close(audio.waveform[400:-400], reference[400:-400], atol=3e-3, rtol=0)


def test_duration_policy(tmp_path, caplog):
    path = write_audio(tmp_path / "long.wav", tone(3.0))
    too_long = r"the segment of long.wav at offset 0 s is 3.00 s long, over the limit of 2 s"
    with pytest.raises(AudioError, match=too_long) as e:
        load_audio(path, policy=DurationPolicy(2.0))
    assert e.value.field == "duration" and e.value.reason == "over_max_duration"
    with caplog.at_level(logging.WARNING, logger="data.audio"):
        cut = load_audio(path, policy=DurationPolicy(2.0, "truncate"))
    assert cut.truncated and cut.num_samples == 2 * RATE and cut.seconds == 2.0
    assert "long.wav at offset 0 s is 3.00 s long; truncated to the limit of 2 s" in caplog.text
    assert load_audio(path, policy=DurationPolicy(None)).num_samples == 3 * RATE
    with pytest.raises(ValueError, match="on_too_long must be one of"):
        DurationPolicy(10, "drop")


def test_duration_tolerance_and_too_short_segments(tmp_path):
    path = write_audio(tmp_path / "a.wav", tone(2.0))
    assert load_audio(path, duration=2.05).num_samples == 2 * RATE  # rounded manifest durations: clipped
    with pytest.raises(AudioError, match="runs past the end") as e:
        load_audio(path, duration=2.2)
    assert e.value.field == "duration" and e.value.reason == "segment"
    with pytest.raises(AudioError, match=r"is 12.5 ms long, shorter than one 25 ms feature frame"):
        load_audio(path, offset=1.0, duration=0.0125)
