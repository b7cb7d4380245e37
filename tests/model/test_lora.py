"""LoRA: the formula, merge/unmerge, the disabled switch, trainability, adapters and PEFT export."""
import pytest
import torch
from torch import nn

from model import load_pretrained
from model.lora import (
    LoRALinear,
    apply_lora,
    export_peft,
    load_adapter,
    lora_disabled,
    lora_modules,
    mark_trainable,
    merge_and_remove_lora,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from tests.model.hf_tiny import random_ids, random_model, tiny_config, transformers


def randomise_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_b.copy_(0.1 * torch.randn(module.lora_b.shape, generator=gen))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    reference = random_model(tiny_config(seed=2), seed=3)
    directory = tmp_path_factory.mktemp("base")
    reference.save_pretrained(directory)
    return directory


def adapted(checkpoint, rank=4, alpha=8.0):
    model = load_pretrained(checkpoint).eval()
    apply_lora(model, rank=rank, alpha=alpha)
    randomise_adapters(model)
    return model


def test_lora_linear_formula_and_state_dict():
    """y = x W^T + b + (alpha/r) x A^T B^T, with the wrapped Linear's keys plus lora_a/lora_b."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=3.0)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_a", "lora_b"}
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B starts at zero
    with torch.no_grad():
        layer.lora_b.normal_()
    expected = x @ base.weight.T + base.bias + 1.5 * x @ layer.lora_a.T @ layer.lora_b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_dropout_acts_on_the_lora_branch_only():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=2.0, dropout=1.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 6)
    layer.train()
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # branch dropped entirely
    layer.eval()
    assert (layer(x) - base(x)).abs().max() > 1e-3


def test_merge_unmerge_restores_weights(checkpoint):
    model = adapted(checkpoint)
    input_ids = random_ids(2, 20)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    with torch.no_grad():
        unmerged_logits = model(input_ids)
        merge_lora(model)
        merged_logits = model(input_ids)
        unmerge_lora(model)
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=0, atol=1e-5)
    for key, before in weights.items():
        torch.testing.assert_close(model.state_dict()[key], before, rtol=0, atol=1e-6)
    changed = [k for k in weights if k.endswith("qkv_proj.weight")]
    assert changed  # the merge really touched these


def test_disabled_adapter_is_the_base_model_exactly(checkpoint):
    base = load_pretrained(checkpoint).eval()
    model = adapted(checkpoint)
    input_ids = random_ids(1, 16)
    with torch.no_grad():
        with lora_disabled(model):
            disabled = model(input_ids)
        enabled = model(input_ids)
        expected = base(input_ids)
    torch.testing.assert_close(disabled, expected, rtol=0, atol=0)
    assert (enabled - expected).abs().max() > 1e-3
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"), lora_disabled(model):
        model(input_ids)


def test_only_lora_and_extra_prefixes_train(checkpoint):
    model = load_pretrained(checkpoint)
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert len(wrapped) == 4 * model.config.decoder.num_layers
    trainable = mark_trainable(model)
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert len(trainable) == 2 * len(wrapped)
    with_projector = mark_trainable(model, extra_prefixes=("projector.",))
    assert set(with_projector) - set(trainable) == {n for n, _ in model.named_parameters() if n.startswith("projector.")}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("encoder.") for n in frozen) and "decoder.embed_tokens.weight" in frozen


def test_adapter_save_load_round_trip(checkpoint, tmp_path):
    model = adapted(checkpoint)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_pretrained(checkpoint).eval()
    load_adapter(fresh, tmp_path / "adapter")
    input_ids = random_ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids), model(input_ids), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="adapter.json"):
        load_adapter(fresh, tmp_path / "nothing")


def test_merge_and_remove_gives_plain_linear(checkpoint):
    model = adapted(checkpoint)
    input_ids = random_ids(1, 12)
    with torch.no_grad():
        expected = model(input_ids)
        merge_and_remove_lora(model)
        assert not lora_modules(model)
        assert type(model.decoder.layers[0].self_attn.qkv_proj) is nn.Linear
        torch.testing.assert_close(model(input_ids), expected, rtol=0, atol=1e-5)


def test_peft_export_loads_onto_transformers(checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted(checkpoint, rank=4, alpha=8.0)
    export_peft(model, tmp_path / "peft")
    reference = transformers.Phi4MultimodalForCausalLM.from_pretrained(checkpoint).eval()
    peft_model = peft.PeftModel.from_pretrained(reference, tmp_path / "peft").eval()
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(wrapped) == len(lora_modules(model))
    assert not any("audio_embed" in n for n in wrapped)  # the encoder's own o_proj is untouched
    input_ids = random_ids(2, 18)
    with torch.no_grad():
        ours = model(input_ids)
        theirs = peft_model(input_ids=input_ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
