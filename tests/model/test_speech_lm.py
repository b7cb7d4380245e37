"""Full-model parity with audio: features -> encoder -> projector -> spliced at the placeholders
-> decoder, against transformers' tiny random Phi4MultimodalForCausalLM (float32, eager).

Clips shorter and longer than 500 encoder frames (4000 feature frames; the long one is encoded
in windows), batched with different lengths, several clips in one row and none in another,
in both checkpoint layouts. Tolerance 1e-4 (observed ~1e-6).
"""
import pytest
import torch

from model import load_pretrained
from tests.model.hf_tiny import AUDIO_TOKEN, VOCAB, random_model, tiny_config, write_original_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    reference = random_model(tiny_config(seed=8, audio_blocks=2), seed=9)
    native_dir = tmp_path_factory.mktemp("native")
    reference.save_pretrained(native_dir)
    original_dir = tmp_path_factory.mktemp("original")
    merged_state = write_original_checkpoint(reference, original_dir, seed=10)
    merged_reference = random_model(tiny_config(seed=8, audio_blocks=2), seed=9)
    merged_reference.load_state_dict(merged_state, strict=False)
    return {
        "native": (reference, load_pretrained(native_dir).eval()),
        "original": (merged_reference, load_pretrained(original_dir).eval()),
    }


def prompt(num_audio_tokens_per_clip, text_length, seed):
    """[text][placeholder x n]... for each clip, then text: one row of input ids."""
    gen = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(3, VOCAB - 1, (3,), generator=gen)]
    for count in num_audio_tokens_per_clip:
        pieces += [torch.full((count,), AUDIO_TOKEN), torch.randint(3, VOCAB - 1, (2,), generator=gen)]
    pieces.append(torch.randint(3, VOCAB - 1, (text_length,), generator=gen))
    return torch.cat(pieces)


def right_pad(rows):
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def tokens(frames):
    return -(-frames // 8)


@pytest.mark.parametrize("layout", ["native", "original"])
@pytest.mark.parametrize("frames", [333, 4100])  # 42 tokens; 513 tokens = two 500-frame windows
def test_single_clip_logits_match(models, layout, frames):
    reference, ours = models[layout]
    features = torch.randn(1, frames, 80, generator=torch.Generator().manual_seed(frames))
    input_ids = prompt([tokens(frames)], 5, seed=1)[None]
    with torch.no_grad():
        expected = reference(input_ids=input_ids, audio_input_features=features,
                             audio_embed_sizes=torch.tensor([tokens(frames)])).logits
        logits = ours(input_ids, audio_features=features)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", ["native", "original"])
def test_batch_with_several_clips_per_row_and_a_text_only_row(models, layout):
    """Row 0 holds clips of 333 and 120 frames, row 1 one of 200 frames, row 2 none.
    Clips are padded to a common length with the reference's audio_attention_mask."""
    reference, ours = models[layout]
    lengths = torch.tensor([333, 120, 200])
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(3, 333, 80, generator=gen)
    features[torch.arange(333)[None, :] >= lengths[:, None]] = 0.0  # as the feature extractor pads
    sizes = [tokens(n) for n in lengths.tolist()]
    rows = [prompt(sizes[:2], 4, seed=4), prompt(sizes[2:], 9, seed=5), prompt([], 20, seed=6)]
    input_ids, mask = right_pad(rows)
    audio_mask = torch.arange(333)[None, :] < lengths[:, None]
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask, audio_input_features=features,
                             audio_embed_sizes=torch.tensor(sizes), audio_attention_mask=audio_mask).logits
        logits = ours(input_ids, attention_mask=mask, audio_features=features, audio_lengths=lengths)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], rtol=0, atol=1e-4)


def test_placeholder_count_mismatch_is_a_clear_error(models):
    _, ours = models["native"]
    features = torch.randn(1, 333, 80)
    input_ids = prompt([tokens(333) - 1], 3, seed=1)[None]
    with pytest.raises(ValueError, match=r"hold 41 audio placeholders .* give 42 audio tokens"):
        ours(input_ids, audio_features=features)


def test_audio_changes_the_logits(models):
    """The splice really happens: other audio, other logits at and after the placeholders."""
    _, ours = models["native"]
    input_ids = prompt([tokens(333)], 5, seed=1)[None]
    with torch.no_grad():
        first = ours(input_ids, audio_features=torch.randn(1, 333, 80))
        second = ours(input_ids, audio_features=torch.randn(1, 333, 80))
    assert (first[0, :3] - second[0, :3]).abs().max() == 0  # text before the audio is untouched
    assert (first[0, 3] - second[0, 3]).abs().max() > 1e-3  # the first placeholder position
    assert (first[0, -1] - second[0, -1]).abs().max() > 0  # and, through attention, the text after it


def gradients(model, input_ids, features):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids, audio_features=features)
    logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients(models):
    _, ours = models["native"]
    input_ids = prompt([tokens(333)], 5, seed=2)[None]
    features = torch.randn(1, 333, 80, generator=torch.Generator().manual_seed(4))
    ours.train()
    try:
        plain = gradients(ours, input_ids, features)
        ours.decoder.gradient_checkpointing = ours.encoder.gradient_checkpointing = True
        checkpointed = gradients(ours, input_ids, features)
    finally:
        ours.decoder.gradient_checkpointing = ours.encoder.gradient_checkpointing = False
        ours.eval()
        ours.zero_grad(set_to_none=True)
    assert plain.keys() == checkpointed.keys() and any(k.startswith("encoder.") for k in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_frozen_encoder_keeps_no_graph_while_projector_and_lora_train(models, tmp_path):
    from model import save_pretrained
    from model.lora import apply_lora, mark_trainable

    _, source = models["native"]
    save_pretrained(source, tmp_path / "copy")
    model = load_pretrained(tmp_path / "copy").train()
    apply_lora(model, rank=2, alpha=4)
    mark_trainable(model, extra_prefixes=("projector.",))
    outputs = []
    model.encoder.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    input_ids = prompt([tokens(333)], 5, seed=2)[None]
    grads = gradients(model, input_ids, torch.randn(1, 333, 80))
    assert not outputs[0].requires_grad  # no activations kept for the frozen encoder
    assert {n.split(".")[0] for n in grads} == {"decoder", "projector"}
    assert all(n.startswith("projector.") or n.endswith((".lora_a", ".lora_b")) for n in grads)


def test_a_clip_repeated_in_consecutive_rows_is_encoded_once(models):
    """Two rows with the same clip (a DPO pair): one encoder call on one clip, same logits as
    two separate rows."""
    _, ours = models["native"]
    features = torch.randn(1, 200, 80, generator=torch.Generator().manual_seed(8))
    rows = [prompt([tokens(200)], 4, seed=21), prompt([tokens(200)], 6, seed=22)]
    input_ids, mask = right_pad(rows)
    calls = []
    hook = ours.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            together = ours(input_ids, mask, features.expand(2, -1, -1), torch.tensor([200, 200]))
    finally:
        hook.remove()
    assert calls == [1]
    with torch.no_grad():
        for row in range(2):
            alone = ours(input_ids[row : row + 1, : len(rows[row])], audio_features=features,
                         audio_lengths=torch.tensor([200]))
            torch.testing.assert_close(together[row, : len(rows[row])], alone[0], rtol=0, atol=1e-5)
