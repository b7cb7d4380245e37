"""The frozen-encoder output cache: same loss and gradients as the encoder itself, hits on the
second pass, refused for a trainable encoder, keyed by weights and clip, crash-safe entries."""
import pytest
import torch

from model import SpeechLM, toy
from model.encoder_cache import EncoderOutputCache, EncoderTrainableError, read_usage
from model.lora import apply_lora, mark_trainable

AUDIO = 4


def small_model(seed: int = 0) -> SpeechLM:
    torch.manual_seed(seed)
    config = toy(vocab_size=64)
    config.encoder.mask_padding = True
    model = SpeechLM(config)
    apply_lora(model, rank=4, alpha=8.0)
    mark_trainable(model, extra_prefixes=("projector.",))  # LoRA + projector train, the encoder is frozen
    return model


def batch(seed: int = 1):
    """Two clips of different lengths (a padded batch), one per row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([160, 96])
    features = torch.randn(2, 160, 80, generator=gen) * 3 + 10
    features[1, 96:] = 0
    counts = [-(-int(n) // 8) for n in lengths]  # encoder frames: ceil(T / 8)
    rows = [torch.cat([torch.tensor([7, 8]), torch.full((c,), AUDIO), torch.randint(9, 60, (6,), generator=gen)])
            for c in counts]
    width = max(len(r) for r in rows)
    input_ids = torch.stack([torch.cat([r, torch.zeros(width - len(r), dtype=torch.long)]) for r in rows])
    return input_ids, features, lengths


def loss_and_grads(model: SpeechLM, input_ids, features, lengths):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids, None, features, lengths)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), input_ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cached_path_gives_the_same_loss_and_gradients(tmp_path):
    model = small_model()
    input_ids, features, lengths = batch()
    loss, grads = loss_and_grads(model, input_ids, features, lengths)
    model.encoder_cache = EncoderOutputCache(tmp_path, model.encoder)
    for expected_misses, expected_hits in ((2, 0), (2, 2)):  # first pass fills the cache, the second reads it
        cached_loss, cached_grads = loss_and_grads(model, input_ids, features, lengths)
        assert (model.encoder_cache.misses, model.encoder_cache.hits) == (expected_misses, expected_hits)
        torch.testing.assert_close(cached_loss, loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == cached_grads.keys() and any(name.startswith("projector.") for name in grads)
        for name in grads:
            torch.testing.assert_close(cached_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    cache = model.encoder_cache  # the second pass read both clips: 160 + 96 valid frames
    assert (cache.miss_frames, cache.hit_frames) == (256, 256) and cache.encode_seconds > 0
    assert cache.saved_seconds() == cache.encode_seconds and "2 clips read, 2 encoded" in cache.summary()


def test_a_second_model_object_reads_the_first_ones_entries(tmp_path):
    """Entries outlive the process: a new cache over equal weights hits; other weights miss."""
    input_ids, features, lengths = batch()
    first = small_model()
    first.encoder_cache = EncoderOutputCache(tmp_path, first.encoder)
    expected = first(input_ids, None, features, lengths)
    same = small_model()
    same.encoder_cache = EncoderOutputCache(tmp_path, same.encoder)
    torch.testing.assert_close(same(input_ids, None, features, lengths), expected)
    assert (same.encoder_cache.hits, same.encoder_cache.misses) == (2, 0)
    other = small_model(seed=5)
    other.encoder_cache = EncoderOutputCache(tmp_path, other.encoder)
    other(input_ids, None, features, lengths)
    assert (other.encoder_cache.hits, other.encoder_cache.misses) == (0, 2)


def test_a_trainable_encoder_is_refused(tmp_path):
    model = small_model()
    model.encoder.requires_grad_(True)
    with pytest.raises(EncoderTrainableError, match="frozen encoder"):
        EncoderOutputCache(tmp_path, model.encoder)
    model.encoder.requires_grad_(False)
    model.encoder_cache = EncoderOutputCache(tmp_path, model.encoder)
    model.encoder.encoders[0].feed_forward_in.gate_up_proj.weight.requires_grad_(True)  # unfrozen after attaching
    input_ids, features, lengths = batch()
    with pytest.raises(EncoderTrainableError, match="encoders.0.feed_forward_in"):
        model(input_ids, None, features, lengths)


def test_a_damaged_entry_is_recomputed(tmp_path):
    model = small_model()
    model.encoder_cache = EncoderOutputCache(tmp_path, model.encoder)
    input_ids, features, lengths = batch()
    expected = model(input_ids, None, features, lengths)
    entries = sorted(tmp_path.rglob("*.safetensors"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:20])  # truncated, as by a crash of another writer
    torch.testing.assert_close(model(input_ids, None, features, lengths), expected)
    assert model.encoder_cache.misses == 3 and model.encoder_cache.hits == 1


def test_usage_records_from_several_processes_add_up(tmp_path):
    """Two cache objects on one folder (two processes of make demo) each append their counts;
    `read_usage` sums them and skips a torn line. The second object read both clips the first
    one encoded: it has no encoding speed of its own, so the saving is priced at the speed
    measured over all misses, the first object's: its encode_seconds for the same frames."""
    first, second = small_model(), small_model()
    input_ids, features, lengths = batch()
    for model in (first, second):
        model.encoder_cache = EncoderOutputCache(tmp_path, model.encoder)
        model(input_ids, None, features, lengths)
    first.encoder_cache.record_usage("first")
    second.encoder_cache.record_usage("second")
    with open(tmp_path / "usage.jsonl", "a") as handle:
        handle.write('{"who": "torn", "hits": 3')  # a write cut short
    usage = read_usage(tmp_path)
    frames = int(lengths.sum())
    assert usage["processes"] == 2
    assert (usage["hits"], usage["misses"]) == (2, 2)
    assert (usage["hit_frames"], usage["miss_frames"]) == (frames, frames)
    assert usage["encode_seconds"] == pytest.approx(first.encoder_cache.encode_seconds, abs=1e-3)
    assert second.encoder_cache.saved_seconds() == 0.0  # alone, it has no speed to price its reads at
    assert usage["saved_seconds"] == pytest.approx(usage["encode_seconds"])  # the same frames, read instead
    assert read_usage(tmp_path / "nothing") is None


def test_saved_seconds_scale_the_measured_speed():
    """saved = encode_seconds * hit_frames / miss_frames: 2 s for 100 encoded frames, 250 read."""
    cache = EncoderOutputCache.__new__(EncoderOutputCache)
    cache.encode_seconds, cache.hit_frames, cache.miss_frames = 2.0, 250, 100
    assert cache.saved_seconds() == pytest.approx(5.0)
