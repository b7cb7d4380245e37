"""model/serving_export.py: a fine-tuned model written as the hub's original layout with one
combined speech LoRA, served the way vLLM serves Phi-4MM (base without LoRA + an adapter).

The fine-tuned model: a tiny original-layout checkpoint (speech LoRA r 4) loaded and merged, one
rank-2 stage merged in, a second rank-2 stage left as adapters, and a changed projector. Its
decoder delta has rank <= 4 + 2 + 2 = 8, so a rank-12 export is exact (errors ~1e-7).
"""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import load_pretrained
from model.lora import apply_lora, lora_modules, merge_and_remove_lora
from model.serving_export import HUB_TARGET_MODULES, export_for_serving, main, vllm_max_lora_rank
from tests.model.hf_tiny import AUDIO_TOKEN, VOCAB, random_model, tiny_config, write_original_checkpoint

VLLM_PHI4MM_LORA_SUFFIXES = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # its decoder's linear layers
CARRIED = {"tokenizer.json": "{}", "preprocessor_config.json": "{\"sampling_rate\": 16000}",
           "generation_config.json": "{\"eos_token_id\": [200020, 199999]}", "modeling_phi4mm.py": "# remote code\n"}


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    source = tmp_path_factory.mktemp("source")
    write_original_checkpoint(random_model(tiny_config(seed=5), seed=2), source, seed=7, rank=4, alpha=8.0)
    for name, text in CARRIED.items():
        (source / name).write_text(text)
    (source / "vision-lora").mkdir()
    (source / "vision-lora" / "adapter_config.json").write_text("{\"r\": 4}")
    model = load_pretrained(source)
    gen = torch.Generator().manual_seed(0)
    for stage in range(2):
        apply_lora(model, rank=2, alpha=4.0)
        with torch.no_grad():
            for module in lora_modules(model).values():
                module.lora_b.copy_(0.05 * torch.randn(module.lora_b.shape, generator=gen))
        if stage == 0:
            merge_and_remove_lora(model)  # a finished stage, as train/ hands it on
    with torch.no_grad():
        model.projector.up_proj.weight.add_(0.05 * torch.randn(model.projector.up_proj.weight.shape, generator=gen))
    return source, model.eval()


def speech_prompt():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(1, 160, 80, generator=gen)  # 20 audio tokens
    ids = torch.cat([torch.randint(3, VOCAB - 1, (4,), generator=gen), torch.full((20,), AUDIO_TOKEN),
                     torch.randint(3, VOCAB - 1, (9,), generator=gen)])[None]
    return ids, features


def logits(model):
    ids, features = speech_prompt()
    with torch.no_grad():
        return model.eval()(ids, audio_features=features)


def vllm_adapter_problems(folder, max_lora_rank):
    """vLLM's checks when it loads a LoRA folder (vllm/lora: PEFTHelper and LoRAModel.from_local_checkpoint):
    r <= --max-lora-rank; target_modules a list or a string; every key `[base_model.model.]<module>.lora_{A,B}.weight`
    whose last name part is one of the model's LoRA-capable linear layers."""
    config = json.loads((folder / "adapter_config.json").read_text())
    problems = []
    if config["r"] > max_lora_rank:
        problems.append(f"r {config['r']} > max_lora_rank {max_lora_rank}")
    if not isinstance(config.get("target_modules"), (str, list)):
        problems.append("target_modules is neither a string nor a list")
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            name = key.replace("base_model.model.", "")
            parts = name.split(".")
            if parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
                problems.append(f"{key}: unsupported LoRA weight")
            elif parts[-3] not in VLLM_PHI4MM_LORA_SUFFIXES:
                problems.append(f"{key}: module {parts[-3]} is not a LoRA target of vLLM's Phi4MM")
    return problems


def test_the_export_reloads_with_the_fine_tuned_logits(fine_tuned, tmp_path):
    source, model = fine_tuned
    report = export_for_serving(model, source, tmp_path / "served", extra_rank=8)
    assert report.rank == 12 and report.modules == 4 * 2 and report.max_relative_error < 1e-5
    reloaded = load_pretrained(tmp_path / "served")
    assert (logits(reloaded) - logits(load_pretrained(source))).abs().max() > 1e-2  # the stages changed it
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-4)
    config = json.loads((tmp_path / "served" / "config.json").read_text())
    assert config["speech_lora"]["r"] == config["speech_lora"]["lora_alpha"] == 12
    assert config["speech_lora"]["layer"] == "layers.*"  # the rest of the source entry is kept


def test_vllm_view_stock_base_plus_the_adapter_gives_the_fine_tuned_logits(fine_tuned, tmp_path):
    """As vLLM loads it: every weight whose name holds "lora" skipped, `base_layer.` dropped, then
    speech-lora/ applied as W + (lora_alpha / r) B A."""
    source, model = fine_tuned
    served = tmp_path / "served"
    report = export_for_serving(model, source, served, extra_rank=8)
    adapter_dir = served / "speech-lora"
    assert vllm_adapter_problems(adapter_dir, report.vllm_max_lora_rank) == []
    assert report.vllm_max_lora_rank == 16
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == HUB_TARGET_MODULES

    weights = load_file(str(served / "model.safetensors"))
    base = {k.replace("base_layer.", ""): v for k, v in weights.items() if "lora" not in k}
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for key, lora_a in adapter.items():
        match = re.fullmatch(r"base_model\.model\.(.*)\.lora_A\.weight", key)
        if match:
            module = match.group(1)
            lora_b = adapter[f"base_model.model.{module}.lora_B.weight"]
            base[f"{module}.weight"] = base[f"{module}.weight"] + scale * lora_b @ lora_a
    stock = tmp_path / "stock"
    stock.mkdir()
    config = json.loads((served / "config.json").read_text())
    config.pop("speech_lora")
    (stock / "config.json").write_text(json.dumps(config))
    save_file(base, str(stock / "model.safetensors"))
    torch.testing.assert_close(logits(load_pretrained(stock)), logits(model), rtol=0, atol=1e-4)


def test_vision_weights_and_side_files_are_carried(fine_tuned, tmp_path):
    source, model = fine_tuned
    export_for_serving(model, source, tmp_path / "served", extra_rank=8)
    served = load_file(str(tmp_path / "served" / "model.safetensors"))
    original = load_file(str(source / "model.safetensors"))
    vision = [k for k in original if "image_embed" in k or ".vision." in k]
    assert len(vision) > 10
    for key in vision:
        assert torch.equal(served[key], original[key]), key
    for name, text in CARRIED.items():
        assert (tmp_path / "served" / name).read_text() == text
    assert (tmp_path / "served" / "vision-lora" / "adapter_config.json").is_file()


def test_too_small_a_rank_is_refused_with_the_error_it_would_leave(fine_tuned, tmp_path):
    source, model = fine_tuned
    with pytest.raises(ValueError, match=r"rank-4 adapter leaves a relative error of .* raise the rank"):
        export_for_serving(model, source, tmp_path / "served", extra_rank=0)
    assert not (tmp_path / "served").exists()


def test_cli_prints_the_serving_command_and_refuses_a_native_source(fine_tuned, tmp_path, capsys):
    from model import save_pretrained
    source, model = fine_tuned
    merged = tmp_path / "merged"
    merge_and_remove_lora(copy := load_pretrained(source))
    save_pretrained(copy, merged)
    assert main(["--checkpoint", str(merged), "--source", str(source), "--out", str(tmp_path / "served")]) == 0
    out = capsys.readouterr().out
    assert "rank 68 on 8 modules" in out  # the source speech rank 4 + 64
    assert "--enable-lora --max-lora-rank 128 --lora-modules speech=" in out
    assert main(["--checkpoint", str(merged), "--source", str(merged), "--out", str(tmp_path / "x")]) == 2
    assert "is not the original layout" in capsys.readouterr().err


def test_vllm_rank_values():
    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 320, 384)] == [1, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="exceeds"):
        vllm_max_lora_rank(513)
