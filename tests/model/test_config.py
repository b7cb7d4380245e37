"""Config presets and config.json readers for both layouts and both rope conventions."""
import json
import math

import pytest

from model.checkpoint import read_config
from model.checkpoint_save import native_config
from model.config import DecoderConfig, SpeechLMConfig, from_hf_config, phi4mm, toy
from tests.model.hf_tiny import original_config, tiny_config


def test_phi4mm_preset_has_the_real_sizes():
    config = phi4mm()
    dec, enc = config.decoder, config.encoder
    assert (dec.num_layers, dec.hidden_size, dec.num_heads, dec.num_kv_heads, dec.head_dim) == (32, 3072, 24, 8, 128)
    assert (dec.intermediate_size, dec.vocab_size, dec.eos_token_ids) == (8192, 200064, (199999, 200020))
    assert dec.rotary_dim == 96 and dec.tie_word_embeddings
    # LongRoPE scale: sqrt(1 + ln(131072 / 4096) / ln(4096)) = sqrt(1 + ln 32 / ln 4096) = 1.1902380714
    assert dec.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert dec.attention_factor == pytest.approx(1.1902380714, abs=1e-9)
    assert (enc.num_blocks, enc.hidden_size, enc.num_heads, enc.intermediate_size, enc.bias_max_distance) == (
        24, 1024, 16, 1536, 500)
    assert config.audio_token_id == 200011 and (config.speech_lora_rank, config.speech_lora_alpha) == (320, 640)


def test_native_transformers5_config():
    raw = tiny_config(hidden=96, heads=6, kv_heads=2, partial=0.5).to_dict()
    assert "rope_parameters" in raw
    config = from_hf_config(raw)
    dec = config.decoder
    assert (dec.hidden_size, dec.num_heads, dec.num_kv_heads, dec.head_dim, dec.rotary_dim) == (96, 6, 2, 16, 8)
    assert dec.rope_type == "longrope" and dec.original_max_position_embeddings == 32
    assert dec.short_factor == pytest.approx(raw["rope_parameters"]["short_factor"])
    assert config.encoder.hidden_size == 32 and config.audio_token_id == 299
    assert (dec.bos_token_id, dec.pad_token_id, dec.eos_token_ids) == (1, 0, (2,))  # 0 is a real id, not "unset"


def test_transformers4_rope_scaling_and_su_alias():
    """4.x configs keep rope_theta / partial_rotary_factor at the top and call LongRoPE "su"."""
    raw = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500.0, "partial_rotary_factor": 0.75,
           "max_position_embeddings": 1024, "original_max_position_embeddings": 256,
           "rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": [3.0] * 6}}
    dec = from_hf_config(raw).decoder
    assert dec.rope_type == "longrope" and dec.rope_theta == 500.0 and dec.partial_rotary_factor == 0.75
    assert dec.long_factor == [3.0] * 6
    assert dec.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)))
    raw["rope_scaling"]["factor"] = 16.0  # an explicit factor overrides max / original
    assert from_hf_config(raw).decoder.attention_factor == pytest.approx(math.sqrt(1 + math.log(16) / math.log(256)))
    raw["rope_scaling"] = None
    assert from_hf_config(raw).decoder.rope_type == "default"
    assert from_hf_config(raw).encoder is None


def test_original_remote_code_config():
    raw = original_config(tiny_config(hidden=64, heads=4, kv_heads=2, partial=0.75))
    config = from_hf_config(raw)
    assert config.encoder.hidden_size == 32 and config.encoder.num_heads == 2
    assert config.encoder.nemo_conv_channels == 8 and config.encoder.bias_max_distance == 20
    assert (config.speech_lora_rank, config.speech_lora_alpha) == (4, 8.0)
    assert config.decoder.eos_token_ids == (2, 200020)  # <|end|> added as generation_config.json does
    assert config.audio_token_id == 299


def test_native_config_round_trips_exactly(tmp_path):
    config = toy()
    (tmp_path / "config.json").write_text(json.dumps(native_config(config)))
    assert read_config(tmp_path) == config
    assert SpeechLMConfig.from_dict(config.to_dict()) == config


def test_bad_config_values_say_what_is_wrong():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DecoderConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"short_factor has 3 entries; LongRoPE needs rotary_dim // 2 = 48"):
        DecoderConfig(short_factor=[1.0] * 3)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['heads'\] in the decoder config"):
        SpeechLMConfig.from_dict({"decoder": {"heads": 3}})
