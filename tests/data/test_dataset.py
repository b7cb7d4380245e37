"""ManifestDataset: chat prompts with audio placeholders, labels on the response, length-bucketed
batches under a token budget, disjoint deterministic rank shards, bad samples, the feature cache,
and the training loop consuming it."""
import logging
import math
import os

import numpy as np
import pytest
import torch

import data.dataset as dataset_module
from data.audio import load_audio
from data.batching import batch_cost, bucketed_plans
from data.dataset import ManifestDataset
from data.manifest import DataError, load_manifest
from model.features import log_mel
from tests.data.helpers import tiny_audio_model, tokenizer, tone, write_audio, write_manifest

INSTRUCTION = "Summarize the meeting."
SUMMARY = "The team agreed on the budget."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer(tmp_path_factory.mktemp("tokenizer"))


def clips(folder, count, seconds=lambda i: 0.5 + 0.25 * i, bad=()):
    rows = []
    for i in range(count):
        name = f"c{i}.wav"
        if i not in bad:
            write_audio(folder / name, tone(seconds(i), seed=i))
        rows.append({"audio_filepath": name, "duration": seconds(i), "id": f"s{i}", "instruction": INSTRUCTION,
                     "summary": SUMMARY, "transcript": f"transcript {i}"})
    return write_manifest(folder / "m.jsonl", rows)


def test_example_prompt_audio_placeholders_and_labels_on_the_response(tmp_path, tok):
    write_audio(tmp_path / "cd.wav", np.stack([tone(1.3, rate=44100), tone(1.3, rate=44100)], 1), rate=44100)
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"audio_filepath": "cd.wav", "duration": 1.2, "offset": 0.1, "id": "a", "instruction": INSTRUCTION,
         "summary": SUMMARY, "transcript": "we agreed"}])
    sft = ManifestDataset.from_manifests([manifest], tok, task="sft")
    example = sft.example(0)
    features = log_mel(load_audio(tmp_path / "cd.wav", offset=0.1, duration=1.2).waveform)  # (118, 80)
    audio_tokens = math.ceil(features.shape[0] / 8)  # from the loaded audio: 15
    assert features.shape == (118, 80) and audio_tokens == 15
    chat = tok.build_chat_prompt(INSTRUCTION, [audio_tokens], response=SUMMARY, add_eos=True)
    assert example.prompt_ids == chat.prompt_ids and example.prompt_ids.count(tok.audio_token_id) == 15
    assert example.response_ids == tok.encode(SUMMARY) + [tok.special_ids["end"], tok.special_ids["endoftext"]]
    torch.testing.assert_close(example.features, features, rtol=0, atol=0)
    assert example.transcript == "we agreed" and example.instruction == INSTRUCTION

    batch = sft.load([0])
    labels = batch.input_ids[batch.loss_mask]
    assert labels.tolist() == example.response_ids and batch.prompt_lengths.tolist() == [len(chat.prompt_ids)]
    assert batch.audio_features.shape == (1, 118, 80) and batch.audio_lengths.tolist() == [118]

    prompt = ManifestDataset.from_manifests([manifest], tok, task="prompt", add_eos=False).example(0)
    assert prompt.prompt_ids == chat.prompt_ids and prompt.response_ids == []


def test_bucketed_plans_respect_the_budget_and_sort_within_windows():
    lengths = torch.randint(20, 400, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    lengths[7] = 5000  # longer than the budget: a batch of its own
    plans = bucketed_plans(lengths, max_tokens=1600, seed=3, epoch=0, window=100, max_batch_size=16)
    assert sorted(i for plan in plans for i in plan) == list(range(500))
    assert [7] in plans
    for plan in plans:
        rows = [lengths[i] for i in plan]
        assert rows == sorted(rows, reverse=True) and len(plan) <= 16
        assert batch_cost(rows) <= 1600 or len(plan) == 1
    shuffled = bucketed_plans(lengths, max_tokens=10**9, seed=3, epoch=0, window=1, max_batch_size=1)
    unsorted = [sum(shuffled[i : i + 6], []) for i in range(0, len(shuffled), 6)]  # the same order, no sorting
    padding = lambda batches: 1 - sum(lengths) / sum(batch_cost([lengths[i] for i in p]) for p in batches)  # noqa: E731
    assert padding(plans) < 0.2 * padding(unsorted)  # bucketing removes most of the padding
    assert plans == bucketed_plans(lengths, max_tokens=1600, seed=3, epoch=0, window=100, max_batch_size=16)
    assert plans != bucketed_plans(lengths, max_tokens=1600, seed=3, epoch=1, window=100, max_batch_size=16)


@pytest.mark.parametrize("count,world_size", [(97, 2), (50, 3), (5, 4)])
def test_ranks_get_disjoint_shards_covering_the_epoch_with_equal_steps(count, world_size):
    lengths = [10 + (i * 37) % 90 for i in range(count)]
    for epoch in (0, 1):
        shards = [bucketed_plans(lengths, max_tokens=300, seed=11, epoch=epoch, rank=r, world_size=world_size)
                  for r in range(world_size)]
        assert len({len(shard) for shard in shards}) == 1  # DDP: the same number of steps on every rank
        seen = [i for shard in shards for plan in shard for i in plan]
        assert len(seen) == len(set(seen))  # disjoint
        assert set(seen) == set(range(count))  # splitting batches made the count divisible: nothing dropped
        again = [bucketed_plans(lengths, max_tokens=300, seed=11, epoch=epoch, rank=r, world_size=world_size)
                 for r in range(world_size)]
        assert again == shards
    singles = [bucketed_plans([10] * 7, max_tokens=10, seed=0, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in singles] == [2, 2, 2]  # all batches are single samples: 7 % 3 = 1 dropped


def test_two_rank_datasets_load_disjoint_samples_and_plan_without_reading_audio(tmp_path, tok):
    manifest = clips(tmp_path, 12)
    ranks = [ManifestDataset.from_manifests([manifest], tok, max_tokens=120, seed=5, rank=r, world_size=2)
             for r in range(2)]
    loaded = [[sample for plan in d.epoch_plans(0) for sample in d.load(plan).ids] for d in ranks]
    assert set(loaded[0]).isdisjoint(loaded[1]) and sorted(loaded[0] + loaded[1]) == sorted(f"s{i}" for i in range(12))
    assert len(ranks[0].epoch_plans(0)) == len(ranks[1].epoch_plans(0))
    for name in os.listdir(tmp_path):  # planning reads only the manifest: delete the audio and plan again
        if name.endswith(".wav"):
            os.remove(tmp_path / name)
    fresh = ManifestDataset.from_manifests([manifest], tok, max_tokens=120, seed=5, rank=0, world_size=2)
    assert fresh.epoch_plans(0) == ranks[0].epoch_plans(0) and fresh.rejected == {}


def test_a_batch_of_only_bad_samples_is_refilled_and_strict_mode_raises(tmp_path, tok, caplog):
    manifest = clips(tmp_path, 6, bad=(0, 1))
    data = ManifestDataset.from_manifests([manifest], tok, max_tokens=10_000, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        batch = data.load([0, 1])
    assert batch.ids == ["s2"] and data.refills == 1 and data.skipped == {"audio_file": 2}
    assert f"{manifest}:1: field 'audio_filepath': {tmp_path / 'c0.wav'} does not exist" in caplog.text
    assert "every sample of the batch ['s0', 's1'] was bad; substituted 's2'" in caplog.text
    assert data.load([0, 3]).ids == ["s3"] and data.skipped == {"audio_file": 3}
    strict = ManifestDataset.from_manifests([manifest], tok, strict=True)
    with pytest.raises(DataError, match="c1.wav does not exist"):
        strict.load([2, 1])
    nothing = ManifestDataset(load_manifest(manifest)[:2], tok)
    with pytest.raises(DataError, match=r"m.jsonl: no sample of the 2 could be loaded; skipped: \{'audio_file': 2\}"):
        nothing.load([0, 1])


def test_context_limit_at_planning_and_at_load(tmp_path, tok):
    manifest = clips(tmp_path, 3, seconds=lambda i: [1.0, 3.0, 1.0][i])
    # 1 s -> 13 audio tokens, 3 s -> 38; the text around them is the same for every sample
    text = len(tok.build_chat_prompt(INSTRUCTION, [], response=SUMMARY, add_eos=True).input_ids)
    data = ManifestDataset.from_manifests([manifest], tok, max_context=text + 20)
    assert [e.id for e in data.entries] == ["s0", "s2"] and data.rejected == {"over_context": 1}
    assert str(data.issues[0]) == (
        f"{manifest}:2: field 'duration': the example needs {text + 38} tokens (38 audio tokens for 3 s, "
        f"{len(tok.encode(INSTRUCTION))} in the instruction, {len(tok.encode_response(SUMMARY, add_eos=True))} in "
        f"the summary), over the model's context of {text + 20}; shorten the segment or the text")
    prompts = ManifestDataset.from_manifests([manifest], tok, task="prompt", max_context=text + 20, reserve_tokens=64)
    assert prompts.entries == [] and prompts.rejected == {"over_context": 3}


def test_feature_cache_hits_invalidation_and_damaged_entries(tmp_path, tok, monkeypatch):
    manifest = clips(tmp_path, 2)
    cache = tmp_path / "features"
    first = ManifestDataset.from_manifests([manifest], tok, feature_cache=cache).load([0, 1])
    entries = sorted(cache.glob("??/*.safetensors"))
    assert len(entries) == 2 and not list(cache.glob("??/.*"))  # no temporary files left

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the features are cached")

    monkeypatch.setattr(dataset_module, "load_audio", no_decoding)
    second = ManifestDataset.from_manifests([manifest], tok, feature_cache=cache).load([0, 1])
    torch.testing.assert_close(second.audio_features, first.audio_features, rtol=0, atol=0)
    monkeypatch.undo()

    entries[0].write_bytes(b"damaged")  # an unreadable entry is a miss and is rewritten
    os.utime(tmp_path / "c1.wav", ns=(1, 1))  # a changed file gets a new key
    third = ManifestDataset.from_manifests([manifest], tok, feature_cache=cache).load([0, 1])
    torch.testing.assert_close(third.audio_features, first.audio_features, rtol=0, atol=0)
    assert len(list(cache.glob("??/*.safetensors"))) == 3


def test_the_training_loop_runs_on_a_manifest_dataset_with_a_bad_sample(tmp_path, tok):
    from model.lora import apply_lora, mark_trainable
    from train.config import load_config
    from train.distributed import DistInfo
    from train.loop import train
    from train.stages import SFTStage

    manifest = clips(tmp_path, 6, bad=(2,))
    data = ManifestDataset.from_manifests([manifest], tok, max_tokens=150, max_batch_size=2)
    model = tiny_audio_model(tok)
    apply_lora(model, rank=2, alpha=4)
    mark_trainable(model, extra_prefixes=("projector.",))
    config = load_config(None, [f"run.out_dir={tmp_path / 'run'}", "optim.max_steps=4", "optim.lr=0.01"])
    position = train(config, model, SFTStage(), data, DistInfo(0, 1, 0, torch.device("cpu")))
    assert position.step == 4 and data.skipped["audio_file"] >= 1
    assert (tmp_path / "run" / "latest").read_text() == "step_0000004"
