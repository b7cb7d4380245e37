"""Checkpoint loading: key coverage at full size, round trips, sharding and bad input."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import SpeechLM, load_pretrained, phi4mm, save_pretrained
from model.checkpoint import CheckpointError, classify_key
from tests.model.hf_tiny import original_keys, random_ids, random_model, tiny_config, transformers


def full_size_reference_shapes() -> dict[str, tuple]:
    """State-dict shapes of transformers' Phi4MultimodalForCausalLM at the real Phi-4MM sizes."""
    config = transformers.Phi4MultimodalConfig(
        num_attention_heads=24,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0] * 48, "long_factor": [1.0] * 48},
        audio_config={"bias_max_distance": 500},
    )
    with torch.device("meta"):
        reference = transformers.Phi4MultimodalForCausalLM(config)
    return {k: tuple(v.shape) for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def full_size():
    with torch.device("meta"):
        ours = SpeechLM(phi4mm())
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    expected.pop("decoder.lm_head.weight")  # tied to the embedding
    return full_size_reference_shapes(), expected


def classify_all(shapes: dict[str, tuple]):
    weights, loras, skipped, unknown = {}, {}, [], []
    for key, shape in shapes.items():
        kind, target = classify_key(key)
        if kind == "skip":
            skipped.append(key)
        elif kind == "speech_lora":
            loras[target] = shape
        elif target is None:
            unknown.append(key)
        elif target != "decoder.lm_head.weight":
            assert target not in weights, f"{key} maps onto {target} twice"
            weights[target] = shape
    return weights, loras, skipped, unknown


def test_full_size_native_layout_covers_every_key(full_size):
    reference, expected = full_size
    weights, loras, skipped, unknown = classify_all(reference)
    assert unknown == []
    assert loras == {}
    assert weights == expected  # every key, same shape, nothing missing or unexpected
    assert all("image_embed" in k or "vision_speech" in k for k in skipped)
    assert len(expected) > 300  # 32 decoder layers and 24 conformer blocks really are there


def test_full_size_original_layout_covers_every_key(full_size):
    reference, expected = full_size
    original = original_keys(reference, rank=320)
    assert any(".base_layer." in k for k in original) and any("linear_q" in k for k in original)
    weights, loras, skipped, unknown = classify_all(original)
    assert unknown == []
    assert weights == expected
    modules = {module for module, _ in loras}
    assert len(modules) == 32 * 4  # qkv, o, gate_up, down of every decoder layer
    assert loras[("model.layers.0.self_attn.qkv_proj", "A")] == (320, 3072)
    assert loras[("model.layers.0.self_attn.qkv_proj", "B")] == ((24 + 2 * 8) * 128, 320)
    assert any(".lora_A.vision." in k for k in skipped)


def test_save_then_load_round_trip_and_sharding(tmp_path):
    reference = random_model(tiny_config(seed=1), seed=4)
    reference.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf").eval()
    save_pretrained(ours, tmp_path / "single")
    save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    input_ids = random_ids(1, 24, seed=5)
    with torch.no_grad():
        expected = ours(input_ids)
        for name in ("single", "sharded"):
            reloaded = load_pretrained(tmp_path / name).eval()
            torch.testing.assert_close(reloaded(input_ids), expected, rtol=0, atol=0)
    # our native-layout weights load into transformers unchanged
    reloaded_hf = transformers.Phi4MultimodalForCausalLM.from_pretrained(tmp_path / "single").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded_hf(input_ids=input_ids).logits, expected, rtol=0, atol=1e-5)


def test_dtype_and_device_arguments(tmp_path):
    random_model(tiny_config(seed=1), seed=4).save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight


# ---------------------------------------------------------------------------------------------
# bad input: one clear error naming the problem


@pytest.fixture()
def saved(tmp_path):
    random_model(tiny_config(seed=1), seed=4).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/config\.json: not found"):
        load_pretrained(tmp_path / "empty")


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nowhere")


def test_missing_shard(saved, tmp_path):
    ours = load_pretrained(saved)
    save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    next((tmp_path / "sharded").glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d+\.safetensors: shard listed .* is missing"):
        load_pretrained(tmp_path / "sharded")


def test_tensor_of_wrong_shape(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' has shape \(3, 3\)"):
        load_pretrained(saved)


def test_unknown_key(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected key.*model\.layers\.0\.mlp\.surprise\.weight"):
        load_pretrained(saved)


def test_missing_key(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint.*model\.norm\.weight"):
        load_pretrained(saved)


def test_no_weights_and_bad_json(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors file"):
        load_pretrained(saved)
    (saved / "config.json").write_text('{"vocab_size": 3,\n oops}')
    with pytest.raises(CheckpointError, match=r"config\.json, line 2: invalid JSON"):
        load_pretrained(saved)


def test_resave_replaces_weights_keeps_other_files_and_leaves_no_temporaries(tmp_path):
    model = load_pretrained(_saved_tiny(tmp_path))
    target = tmp_path / "out"
    save_pretrained(model, target, max_shard_bytes=64 * 1024)  # sharded first
    (target / "tokenizer.model").write_bytes(b"tok")
    save_pretrained(model, target)  # then a single file: the old shards must go
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert (target / "tokenizer.model").read_bytes() == b"tok"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _saved_tiny(tmp_path):
    random_model(tiny_config(seed=1), seed=4).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


TRANSFORMERS_4_ENV = Path(__file__).resolve().parents[2] / ".venv-tf4"  # made by `make test` (Makefile)
TRANSFORMERS_4 = TRANSFORMERS_4_ENV / "bin" / "python"
TRANSFORMERS_4_LOGITS = """
import sys, torch, transformers
model = transformers.Phi4MultimodalForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save({"logits": model(input_ids=ids).logits, "version": transformers.__version__}, sys.argv[3])
"""


def test_a_saved_longrope_checkpoint_loads_in_transformers_5_and_4(tmp_path):
    """save_pretrained writes rope_parameters (transformers 5) and, beside it, rope_theta,
    partial_rotary_factor and rope_scaling (what 4.x reads; without them 4.57 builds a model with
    a full rotary dimension and no LongRoPE, 0.48 off). Both majors then give our logits, on a
    sequence past original_max_position_embeddings (the long factors). transformers 4.57 runs in
    its own environment (.venv-tf4, made by `make test`); without it that half is skipped."""


    random_model(tiny_config(seed=1), seed=4).save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf").eval()
    save_pretrained(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    rope = config["rope_parameters"]
    assert config["rope_scaling"] == {"type": "longrope", "short_factor": rope["short_factor"],
                                      "long_factor": rope["long_factor"]}
    assert (config["rope_theta"], config["partial_rotary_factor"]) == (rope["rope_theta"], 0.75)
    ids = random_ids(2, 48, seed=5)  # past original_max_position_embeddings = 32
    with torch.no_grad():
        expected = ours(ids)
        reloaded = transformers.Phi4MultimodalForCausalLM.from_pretrained(tmp_path / "ours",
                                                                          attn_implementation="eager").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    if not (TRANSFORMERS_4_ENV / ".installed").exists():
        pytest.skip(f"no transformers 4.x environment at {TRANSFORMERS_4_ENV} (make test builds it)")
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run([str(TRANSFORMERS_4), "-c", TRANSFORMERS_4_LOGITS, str(tmp_path / "ours"),
                           str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result["version"].startswith("4.57")
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-5)
