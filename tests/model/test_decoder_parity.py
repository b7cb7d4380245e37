"""Text-only parity of our decoder with transformers' Phi4MultimodalForCausalLM (float32, eager).

Three tiny random configurations differ in head count, GQA ratio, partial rotary factor and
tying; each is run on a sequence shorter and one longer than original_max_position_embeddings,
so both LongRoPE factor sets are exercised. Tolerance: max |logits difference| <= 1e-5.
"""
import pytest
import torch

from model import load_pretrained
from rollout.kv_cache import StaticKVCache
from tests.model.hf_tiny import VOCAB, hf_logits, random_ids, random_model, tiny_config, write_original_checkpoint

CONFIGS = {
    "gqa2-partial0.75-longrope": dict(hidden=64, heads=4, kv_heads=2, partial=0.75),
    "mqa-partial0.5-untied": dict(hidden=96, heads=6, kv_heads=1, partial=0.5, tie=False, layers=3),
    "mha-full-rotary": dict(hidden=64, heads=2, kv_heads=2, partial=1.0, original_max=16),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained directory)."""
    reference = random_model(tiny_config(**CONFIGS[request.param], seed=3), seed=1)
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory)
    ours = load_pretrained(directory).eval()
    return reference, ours


@pytest.mark.parametrize("length", [12, 40])  # below and above original_max_position_embeddings
def test_logits_match_transformers(pair, length):
    reference, ours = pair
    assert length != reference.config.original_max_position_embeddings
    input_ids = random_ids(2, length)
    with torch.no_grad():
        logits = ours(input_ids)
    expected = hf_logits(reference, input_ids)
    assert logits.shape == expected.shape == (2, length, VOCAB)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_left_padded_batch_matches_transformers(pair):
    """Left padding: our default positions (real tokens before each slot) equal what
    transformers' generate would pass as position_ids; padded positions are not compared."""
    reference, ours = pair
    input_ids = random_ids(2, 14, seed=1)
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = ours(input_ids, attention_mask=mask)
    expected = hf_logits(reference, input_ids, attention_mask=mask, position_ids=positions)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], rtol=0, atol=1e-5)
    assert torch.isfinite(logits).all()


def test_right_padded_batch_matches_transformers_and_takes_the_causal_path(pair):
    """Right padding (how training batches are collated): real positions equal transformers'
    logits with the mask, though our forward builds no mask (plain causal attention); a left-
    padded mask is not mistaken for right padding."""
    from model.decoder import build_attention_mask

    reference, ours = pair
    input_ids = random_ids(2, 14, seed=2)
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0
    assert build_attention_mask(mask, 0, 14, "cpu") is None
    assert build_attention_mask(mask.flip(-1), 0, 14, "cpu") is not None
    assert build_attention_mask(mask, 3, 11, "cpu") is not None  # after a cache offset: masked as before
    with torch.no_grad():
        logits = ours(input_ids, attention_mask=mask)
    expected = hf_logits(reference, input_ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], rtol=0, atol=1e-5)


def test_kv_cache_prefill_then_decode_equals_full_forward(pair):
    """Prefill 9 tokens, then decode 3 one at a time, through the same forward."""
    _, ours = pair
    input_ids = random_ids(2, 12, seed=2)
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    cfg = ours.config.decoder
    cache = StaticKVCache.for_model(cfg, batch_size=2, max_length=16)
    with torch.no_grad():
        full = ours(input_ids, attention_mask=mask)
        steps = [ours(input_ids[:, :9], attention_mask=mask[:, :9], kv_cache=cache)]
        for t in range(9, 12):
            steps.append(ours(input_ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache))
    incremental = torch.cat(steps, dim=1)
    valid = mask.bool()
    torch.testing.assert_close(incremental[valid], full[valid], rtol=0, atol=1e-5)
    assert cache.offset == 12


def test_original_layout_with_speech_lora_merged(tmp_path):
    """Original remote-code keys (base_layer, lora_A/B.speech and .vision, old encoder names):
    our logits equal the transformers model whose weights have the speech LoRA merged."""
    reference = random_model(tiny_config(hidden=64, heads=4, kv_heads=2, seed=5), seed=2)
    merged_state = write_original_checkpoint(reference, tmp_path / "original", seed=7)
    ours = load_pretrained(tmp_path / "original").eval()
    before = hf_logits(reference, random_ids(1, 40, seed=3))
    reference.load_state_dict(merged_state, strict=False)
    input_ids = random_ids(1, 40, seed=3)
    with torch.no_grad():
        logits = ours(input_ids)
    expected = hf_logits(reference, input_ids)
    assert (expected - before).abs().max() > 1e-2  # the LoRA is not a no-op
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_original_layout_keep_speech_lora_separate(tmp_path):
    """merge_speech_lora=False keeps the adapters (rank 4 here) and gives the same logits."""
    from model.lora import lora_disabled, lora_modules

    reference = random_model(tiny_config(seed=5), seed=2)
    write_original_checkpoint(reference, tmp_path / "original", seed=7)
    merged = load_pretrained(tmp_path / "original").eval()
    separate = load_pretrained(tmp_path / "original", merge_speech_lora=False).eval()
    adapters = lora_modules(separate)
    assert len(adapters) == 4 * reference.config.num_hidden_layers
    assert {m.rank for m in adapters.values()} == {4}
    input_ids = random_ids(1, 20, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(separate(input_ids), merged(input_ids), rtol=0, atol=1e-5)
        with lora_disabled(separate):
            base = separate(input_ids)
    expected_base = hf_logits(reference, input_ids)  # reference still holds the un-merged base
    torch.testing.assert_close(base, expected_base, rtol=0, atol=1e-5)


def test_kv_cache_without_padding_uses_the_fast_paths_correctly(pair):
    """No attention mask: prefill (T == S, causal), a chunk at an offset (explicit causal mask)
    and single-token decode (one query over every key) equal the full forward."""
    _, ours = pair
    input_ids = random_ids(1, 12, seed=6)
    cache = StaticKVCache.for_model(ours.config.decoder, batch_size=1, max_length=16)
    with torch.no_grad():
        full = ours(input_ids)
        pieces = [ours(input_ids[:, :5], kv_cache=cache), ours(input_ids[:, 5:9], kv_cache=cache)]
        pieces += [ours(input_ids[:, t : t + 1], kv_cache=cache) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_expanded_kv_heads_equal_grouped_attention():
    """The CUDA masked path (key/value heads repeated) computes the same attention as GQA."""
    from model.decoder import attend

    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, h, 5, 8, generator=gen) for h in (6, 2, 2))
    mask = torch.rand(2, 1, 5, 5, generator=gen) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(attend(query, key, value, mask, expand_kv=True),
                               attend(query, key, value, mask), rtol=0, atol=1e-6)


def test_rotary_frequencies_stay_float32_when_the_model_is_cast(pair):
    _, ours = pair
    copy = type(ours)(ours.config)
    expected = copy.decoder.rotary.long_inv_freq.clone()
    copy.to(torch.bfloat16)
    assert copy.decoder.rotary.long_inv_freq.dtype == torch.float32
    torch.testing.assert_close(copy.decoder.rotary.long_inv_freq, expected, rtol=0, atol=0)
