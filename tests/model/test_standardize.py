"""`standardize_audio_embeddings` (model/projector.py `standardize_clips`), the toy world's option.

Hand-derived case: one channel, valid values [1, 3] then a padded 100: the time mean over the
valid tokens is 2, so the centred clip is [-1, 1, 0]; its mean square over the 2 valid entries
is 1, so the output is [-1, 1, 0] (padding comes out zero and does not move the statistics).
"""
import dataclasses

import torch

from model import SpeechLM, toy
from model.projector import standardize_clips


def test_hand_derived_values_and_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])  # (1 clip, 3 tokens, 1 channel), last token padding
    out = standardize_clips(x, torch.tensor([2]), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[[-1.0], [1.0], [0.0]]]))


def test_each_clip_has_zero_time_mean_and_unit_rms():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, generator=gen) * 4 + 9
    counts = torch.tensor([7, 4])
    out = standardize_clips(x, counts, eps=0.0)
    for clip, n in enumerate(counts.tolist()):
        valid = out[clip, :n]
        torch.testing.assert_close(valid.mean(dim=0), torch.zeros(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(valid.pow(2).mean(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert out[1, 4:].abs().max() == 0
    # a one-token clip has no variation: centred to zero, and the eps keeps it finite (zero)
    single = standardize_clips(x[:1], torch.tensor([1]))
    assert torch.equal(single, torch.zeros_like(single))


def test_speech_lm_option_padded_batch_equals_each_clip_alone():
    config = toy()
    config = dataclasses.replace(config, standardize_audio_embeddings=True,
                                 encoder=dataclasses.replace(config.encoder, mask_padding=True))
    torch.manual_seed(0)
    model = SpeechLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    lengths = [160, 96]
    clips = [torch.randn(n, 80, generator=gen) for n in lengths]
    padded = torch.zeros(2, max(lengths), 80)
    for i, clip in enumerate(clips):
        padded[i, : clip.shape[0]] = clip
    with torch.no_grad():
        tokens = model.encoder(padded, torch.tensor(lengths), mask_padding=True)[1].tolist()
    ids = torch.full((2, max(tokens) + 2), 7)
    for i, n in enumerate(tokens):
        ids[i, 1:1 + n] = config.audio_token_id
    with torch.no_grad():
        batch = model.embed(ids, padded, torch.tensor(lengths))
        for i, clip in enumerate(clips):
            alone = model.embed(ids[i:i + 1], clip[None], torch.tensor([lengths[i]]))
            torch.testing.assert_close(batch[i], alone[0], atol=1e-4, rtol=0)  # unit-RMS values; observed 4e-5
        audio = batch[0, 1:1 + tokens[0]]
        torch.testing.assert_close(audio.mean(dim=0), torch.zeros(audio.shape[1]), atol=1e-5, rtol=0)
        # RMS 1 up to eps: an untrained projector varies little in time (mean square ~1e-4), so
        # ms / (ms + 1e-6) sits about 1% below 1 here
        torch.testing.assert_close(audio.pow(2).mean(), torch.tensor(1.0), atol=2e-2, rtol=0)
