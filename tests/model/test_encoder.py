"""Parity of model.encoder / model.projector with transformers' Phi-4-multimodal audio path.

The oracle is `Phi4MultimodalAudioModel` (eager attention, eval mode) with a tiny random config;
both models get the same random state dict (every parameter and buffer random, including the
zero-initialised GLU biases b1/b2 and the identity global mean / inverse std).
"""
from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from model.config import EncoderConfig
from model.encoder import ConformerEncoder
from model.projector import AudioProjector

transformers = pytest.importorskip("transformers")
from transformers import Phi4MultimodalAudioConfig, Phi4MultimodalConfig  # noqa: E402
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import (  # noqa: E402
    Phi4MultimodalAudioEmbedding,
    Phi4MultimodalAudioModel,
)

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_blocks=2,
    num_heads=4,
    nemo_conv_channels=16,
    ext_pw_out_channel=64,
    depthwise_separable_out_channel=64,
    bias_max_distance=20,
)
PARITY_ATOL = 1e-4  # measured: <= 4e-6 for every case below


def hf_audio_config(config: EncoderConfig) -> Phi4MultimodalAudioConfig:
    values = asdict(config)
    values["num_attention_heads"] = values.pop("num_heads")
    values.pop("max_window_frames")  # the reference hard-codes 500
    hf = Phi4MultimodalAudioConfig(**values)
    hf._attn_implementation = "eager"
    return hf


def random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.3 * torch.randn(t.shape, generator=generator) for name, t in module.state_dict().items()}


def make_pair(seed: int = 0, **overrides) -> tuple[Phi4MultimodalAudioModel, ConformerEncoder]:
    config = EncoderConfig(**{**TINY, **overrides})
    reference = Phi4MultimodalAudioModel(hf_audio_config(config)).eval()
    ours = ConformerEncoder(config).eval()
    state = random_state_dict(reference, seed)
    reference.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    return reference, ours


def random_features(lengths: list[int], seed: int) -> torch.Tensor:
    """(N, max(lengths), 80) log-mel-like features; the padding is random too (not zeros)."""
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(len(lengths), max(lengths), 80, generator=generator) - 5.0


def feature_mask(lengths: list[int]) -> torch.Tensor:
    """What transformers' feature extractor passes as audio_attention_mask for a batch."""
    return torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_state_dict_keys_and_shapes_equal_reference_tiny_and_real_size():
    reference, ours = make_pair()
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert "encoders.0.conv.glu.b1" in our_shapes and "encoder_embedding.global_invstd" in our_shapes

    real = EncoderConfig()  # Phi-4-multimodal-instruct sizes (bias_max_distance 500)
    with torch.device("meta"):
        ref_real = {k: tuple(v.shape) for k, v in Phi4MultimodalAudioModel(hf_audio_config(real)).state_dict().items()}
        our_real = {k: tuple(v.shape) for k, v in ConformerEncoder(real).state_dict().items()}
    assert our_real == ref_real
    assert our_real["embed.out.weight"] == (1024, 1024 * 10)
    assert our_real["relative_attention_bias_layer.bias_values.weight"] == (1000, 16)


def test_num_output_frames_is_ceil_over_8_and_matches_output_shape():
    _, ours = make_pair()
    for frames in (1, 2, 7, 8, 9, 15, 16, 17, 801, 4000, 4001):
        assert ours.num_output_frames(frames) == math.ceil(frames / 8)
    frames = torch.tensor([1, 8, 9, 4001])
    assert ours.num_output_frames(frames).tolist() == [1, 1, 2, 501]
    with torch.no_grad():
        hidden, out_lengths = ours(random_features([57, 41], seed=1), torch.tensor([57, 41]))
    assert hidden.shape == (2, 8, 64) and out_lengths.tolist() == [8, 6]


def test_single_short_clip_matches_reference():
    reference, ours = make_pair()
    features = random_features([333], seed=2)  # 42 encoder frames, one window
    with torch.no_grad():
        expected = reference(features, None)
        hidden, out_lengths = ours(features)
    assert hidden.shape == expected.shape == (1, 42, 64)
    assert out_lengths.tolist() == [42]
    assert max_diff(hidden, expected) < PARITY_ATOL


def test_long_clip_is_windowed_like_reference_with_and_without_mask():
    """4100 frames -> 513 encoder frames -> two 500-frame windows, the second 487 zeros of padding.

    Without a mask the reference gives the window padding +1 like every key; with a full mask it
    gets +0. Both calls are reproduced, and they really differ.
    """
    reference, ours = make_pair()
    features = random_features([4100], seed=3)
    with torch.no_grad():
        expected_nomask = reference(features, None)
        expected_mask = reference(features, feature_mask([4100]))
        hidden_nomask, _ = ours(features)
        hidden_mask, out_lengths = ours(features, torch.tensor([4100]))
    assert hidden_nomask.shape == (1, 513, 64) and out_lengths.tolist() == [513]
    assert max_diff(hidden_nomask, expected_nomask) < PARITY_ATOL
    assert max_diff(hidden_mask, expected_mask) < PARITY_ATOL
    # The first window has no padding, so only the second one depends on how padding is weighted.
    assert max_diff(hidden_nomask[:, :500], hidden_mask[:, :500]) < 1e-5
    assert max_diff(hidden_nomask[:, 500:], hidden_mask[:, 500:]) > 1e-3


@pytest.mark.parametrize("lengths", [[333, 200, 57], [4100, 1500]], ids=["short", "windowed"])
def test_padded_batch_matches_reference_with_audio_attention_mask(lengths):
    """Same arithmetic as the reference, padded frames included (so all frames are compared).

    transformers' `unfold_tensor` calls .view() on a permuted tensor and raises for a batch of
    more than one clip longer than 500 encoder frames (the original remote code made it
    contiguous first). The reference treats clips independently, so a windowed batch is
    compared row by row: each clip, padded like the batch, with its row of the mask.
    """
    reference, ours = make_pair()
    features = random_features(lengths, seed=4)
    mask = feature_mask(lengths)
    with torch.no_grad():
        if max(lengths) > 8 * 500:
            with pytest.raises(RuntimeError, match="view size is not compatible"):
                reference(features, mask)
            expected = torch.cat([reference(features[i : i + 1], mask[i : i + 1]) for i in range(len(lengths))])
        else:
            expected = reference(features, mask)
        hidden, out_lengths = ours(features, torch.tensor(lengths))
    assert out_lengths.tolist() == [math.ceil(n / 8) for n in lengths]
    assert hidden.shape == expected.shape
    assert max_diff(hidden, expected) < PARITY_ATOL


def test_streaming_chunk_mask_matches_reference_in_eval_mode():
    reference, ours = make_pair(chunk_size=5, left_chunk=2)
    lengths = [333, 250]
    features = random_features(lengths, seed=5)
    with torch.no_grad():
        expected = reference(features, feature_mask(lengths))
        hidden, _ = ours(features, torch.tensor(lengths))
        unchunked, _ = make_pair()[1](features, torch.tensor(lengths))
    assert max_diff(hidden, expected) < PARITY_ATOL
    assert max_diff(hidden, unchunked) > 1e-3  # the chunk mask changed something


@pytest.mark.parametrize(
    "short, long",
    [(300, 450), (4100, 4300), (300, 4100)],
    ids=["short", "windowed", "all-padding-window"],
)
def test_mask_padding_makes_valid_frames_independent_of_padding(short, long):
    _, ours = make_pair()
    features = random_features([short, long], seed=6)
    lengths = torch.tensor([short, long])
    valid = math.ceil(short / 8)
    with torch.no_grad():
        alone, _ = ours(features[:1, :short], mask_padding=True)
        masked, _ = ours(features, lengths, mask_padding=True)
        quirk, _ = ours(features, lengths)
    assert torch.isfinite(masked).all()
    assert max_diff(masked[0, :valid], alone[0]) < 1e-5
    assert max_diff(masked[1], ours(features[1:], mask_padding=True)[0][0]) < 1e-5
    assert max_diff(quirk[0, :valid], alone[0]) > 1e-3  # the reference's +1/+0 mask lets padding in


def test_mask_padding_on_a_short_unpadded_clip_equals_reference():
    """Adding +1 to every key (reference, no mask) is a softmax no-op, so both modes agree."""
    reference, ours = make_pair()
    features = random_features([333], seed=7)
    with torch.no_grad():
        hidden, _ = ours(features, mask_padding=True)
        expected = reference(features, None)
    assert max_diff(hidden, expected) < PARITY_ATOL


def test_projector_and_encoder_match_phi4_audio_embedding():
    """Phi4MultimodalAudioEmbedding = encoder -> up_proj_for_speech -> erf GELU ->
    down_proj_for_speech, scattered into the placeholder positions; rebuild it from our modules."""
    config = EncoderConfig(**TINY)
    audio_token_id = 7
    hf_audio = hf_audio_config(config)
    hf_audio.audio_token_id = audio_token_id
    hf = Phi4MultimodalConfig(
        vocab_size=32, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, audio_config=hf_audio.to_dict(),
    )
    hf.audio_config._attn_implementation = "eager"
    reference = Phi4MultimodalAudioEmbedding(hf).eval()
    reference.load_state_dict(random_state_dict(reference, seed=8), strict=True)
    encoder, projector = ConformerEncoder(config).eval(), AudioProjector(config.hidden_size, 48).eval()
    encoder.load_state_dict(reference.encoder.state_dict(), strict=True)
    projector.load_state_dict(
        {
            "up_proj.weight": reference.up_proj_for_speech.weight,
            "up_proj.bias": reference.up_proj_for_speech.bias,
            "down_proj.weight": reference.down_proj_for_speech.weight,
            "down_proj.bias": reference.down_proj_for_speech.bias,
        },
        strict=True,
    )

    lengths = [120, 75]
    sizes = [math.ceil(n / 8) for n in lengths]  # 15 and 10 audio tokens
    features = random_features(lengths, seed=9)
    input_ids = torch.tensor([[1] + [audio_token_id] * sizes[0] + [2], [3] * 4 + [audio_token_id] * sizes[1] + [4] * 3])
    inputs_embeds = torch.randn(2, input_ids.shape[1], 48, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = reference(input_ids, inputs_embeds, features, torch.tensor(sizes), feature_mask(lengths))
        hidden, _ = encoder(features, torch.tensor(lengths))
        audio_embeds = projector(hidden)  # (2, 15, 48)
        ours = inputs_embeds.clone()
        ours[input_ids == audio_token_id] = torch.cat([audio_embeds[i, :n] for i, n in enumerate(sizes)])
        direct = reference.down_proj_for_speech(F.gelu(reference.up_proj_for_speech(hidden)))
    assert max_diff(projector(hidden), direct) < 1e-6
    assert max_diff(ours, expected) < PARITY_ATOL
    # exact GELU, not the tanh approximation
    with torch.no_grad():
        tanh_version = projector.down_proj(F.gelu(projector.up_proj(hidden), approximate="tanh"))
    assert max_diff(tanh_version, audio_embeds) > 1e-6


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours = make_pair()
    ours.train()
    lengths = torch.tensor([300, 220])
    features = random_features(lengths.tolist(), seed=11)
    weights = torch.randn(2, 38, 64, generator=torch.Generator().manual_seed(12))
    block_calls = []
    block_forward = ours.encoders[0].forward

    def counting_forward(*args):  # forward hooks do not fire during checkpoint recomputation
        block_calls.append(1)
        return block_forward(*args)

    ours.encoders[0].forward = counting_forward

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        ours.zero_grad(set_to_none=True)
        ours.gradient_checkpointing = checkpointing
        inputs = features.clone().requires_grad_(True)
        hidden, _ = ours(inputs, lengths, mask_padding=True)
        (hidden * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in ours.named_parameters()}
        grads["features"] = inputs.grad
        return grads

    plain = gradients(False)
    assert len(block_calls) == 1
    recomputed = gradients(True)
    assert len(block_calls) == 3  # forward + recomputation during backward
    assert plain.keys() == recomputed.keys()
    assert all(plain[k].abs().sum() > 0 for k in ("encoders.0.conv.glu.b1", "embed.conv.0.weight", "features"))
    for name in plain:
        assert max_diff(plain[name], recomputed[name]) <= 1e-6 * (1 + plain[name].abs().max().item()), name


def test_bad_inputs_raise_clear_errors():
    _, ours = make_pair()
    with pytest.raises(ValueError, match=r"\(N, T, 80\)"):
        ours(torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"lengths must be integers in \[1, 16\]"):
        ours(torch.zeros(2, 16, 80), torch.tensor([16, 17]))
    with pytest.raises(ValueError, match="ext_pw_out_channel"):
        ConformerEncoder(EncoderConfig(**{**TINY, "ext_pw_out_channel": 32}))


@pytest.mark.parametrize("num_frames", [7, 9, 100, 4097])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_subsampling_equals_one_pass(num_frames, padded):
    """Subsampling in time chunks (each starting one output frame early on a multiple of 8)
    equals the whole-sequence convolution, also with the padding-masking path, for chunk sizes
    that do and do not divide the length."""
    torch.manual_seed(0)
    config = EncoderConfig(hidden_size=64, intermediate_size=96, num_blocks=1, num_heads=4, nemo_conv_channels=16,
                           ext_pw_out_channel=64, depthwise_separable_out_channel=64)
    subsampling = ConformerEncoder(config).embed.eval()
    with torch.no_grad():
        for param in subsampling.parameters():
            param.normal_(0, 0.3)
        features = torch.randn(2, num_frames, 80)
        lengths = torch.tensor([num_frames, max(1, num_frames - 37)]) if padded else None
        whole = subsampling(features, lengths, chunk_frames=10**9)
        assert whole.shape[1] == -(-num_frames // 8)
        for chunk_frames in (8, 24, 1000):
            torch.testing.assert_close(subsampling(features, lengths, chunk_frames=chunk_frames), whole,
                                       rtol=0, atol=1e-5)
