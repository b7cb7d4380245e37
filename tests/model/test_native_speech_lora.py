"""The transformers-native layout as transformers' converter writes it: base weights without any
LoRA, the speech adapter in a `speech-lora/` peft folder, `<|end|>` only in generation_config.json.

Reference: the same random weights and speech LoRA written in the original remote-code layout,
which tests/model/test_decoder_parity.py pins against transformers with the LoRA merged.
"""
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_pretrained
from model.checkpoint import CheckpointError
from model.lora import lora_modules
from tests.model.hf_tiny import random_ids, random_model, tiny_config, write_original_checkpoint

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """(original-layout dir, converted-native dir without speech-lora/, the transformers model)."""
    root = tmp_path_factory.mktemp("layouts")
    reference = random_model(tiny_config(seed=5), seed=2)
    write_original_checkpoint(reference, root / "original", seed=7, rank=RANK, alpha=ALPHA)
    reference.save_pretrained(root / "native")  # the base weights: no LoRA, as the converter writes them
    return root / "original", root / "native", reference


def add_speech_lora(original, native, prefix=""):
    """Copy the original checkpoint's speech LoRA into native/speech-lora/ with the converter's key names."""
    tensors = load_file(str(original / "model.safetensors"))
    adapter = {prefix + key.replace(".speech.", "."): value for key, value in tensors.items() if ".speech." in key
               and ".lora_" in key}
    folder = native / "speech-lora"
    folder.mkdir(exist_ok=True)
    save_file(adapter, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.01, "task_type": "CAUSAL_LM",
        "target_modules": r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"}))
    return len(adapter)


def logits(model, seed=3):
    with torch.no_grad():
        return model.eval()(random_ids(2, 24, seed=seed))


@pytest.mark.parametrize("prefix", ["", "base_model.model."])
def test_native_with_speech_lora_folder_equals_the_original_layout(layouts, tmp_path, prefix):
    original, native_base, _ = layouts
    native = shutil.copytree(native_base, tmp_path / "native")
    assert add_speech_lora(original, native, prefix) == 2 * 4 * 2  # A and B, 4 projections, 2 layers
    expected = logits(load_pretrained(original))
    torch.testing.assert_close(logits(load_pretrained(native)), expected, rtol=0, atol=1e-5)
    kept = load_pretrained(native, merge_speech_lora=False)
    assert {(m.rank, m.scale) for m in lora_modules(kept).values()} == {(RANK, ALPHA / RANK)}
    assert len(lora_modules(kept)) == 8
    torch.testing.assert_close(logits(kept), expected, rtol=0, atol=1e-5)


def test_native_without_the_folder_warns_in_one_line_and_is_the_base(layouts, caplog):
    original, native, reference = layouts
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        model = load_pretrained(native)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "without its speech LoRA" in warnings[0] and "\n" not in warnings[0]
    with torch.no_grad():
        expected = reference(input_ids=random_ids(2, 24, seed=3)).logits
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    assert (logits(model) - logits(load_pretrained(original))).abs().max() > 1e-2  # the LoRA mattered


def test_our_own_checkpoints_and_the_original_layout_do_not_warn(layouts, tmp_path, caplog):
    from model import save_pretrained
    original, _, _ = layouts
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        model = load_pretrained(original)
        save_pretrained(model, tmp_path / "ours")
        load_pretrained(tmp_path / "ours")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_generation_config_adds_its_stop_ids(layouts, tmp_path):
    _, native_base, _ = layouts
    native = shutil.copytree(native_base, tmp_path / "native")
    (native / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2], "bos_token_id": 1}))
    assert load_pretrained(native).config.decoder.eos_token_ids == (2, 7)  # config.json's 2, then the file's 7
    (native / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert load_pretrained(native).config.decoder.eos_token_ids == (2, 9)
    (native / "generation_config.json").write_text(json.dumps({"eos_token_id": "end"}))
    with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id must be an integer"):
        load_pretrained(native)


def test_a_broken_speech_lora_folder_is_named(layouts, tmp_path):
    original, native_base, _ = layouts
    native = shutil.copytree(native_base, tmp_path / "native")
    add_speech_lora(original, native)
    config = json.loads((native / "speech-lora" / "adapter_config.json").read_text())
    (native / "speech-lora" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: .* adapter_config.json says r = 8"):
        load_pretrained(native)
    (native / "speech-lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"speech-lora/adapter_model.safetensors: missing"):
        load_pretrained(native)
