"""A damaged model.safetensors (truncated, a stub, a header length past the end) is a
CheckpointError naming the file and the sizes, not safetensors' own traceback."""
import dataclasses
import json

import pytest
import torch

from model import SpeechLM, load_pretrained, save_pretrained, toy
from model.checkpoint import CheckpointError

HEADER_2_62 = (2**62).to_bytes(8, "little")


def tiny_checkpoint(path, max_shard_bytes=5 * 1024**3):
    config = dataclasses.replace(toy(vocab_size=64), encoder=None)
    config.decoder.hidden_size, config.decoder.intermediate_size, config.decoder.num_layers = 32, 64, 2
    config.decoder.num_heads, config.decoder.num_kv_heads, config.decoder.head_dim = 4, 2, 8
    torch.manual_seed(0)
    save_pretrained(SpeechLM(config), path, max_shard_bytes=max_shard_bytes)
    return path


@pytest.fixture()
def checkpoint(tmp_path):
    path = tiny_checkpoint(tmp_path / "ckpt")
    load_pretrained(path)  # intact, it loads: the errors below come from the damage alone
    return path


def header_bytes(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def test_truncated_file_names_the_file_and_both_sizes(checkpoint):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(checkpoint)
    assert str(caught.value) == (f"{weights}: truncated or not a safetensors file: its header says {len(data)} "
                                 f"bytes, the file has {len(data) // 2}; re-download or re-export the checkpoint")


def test_twenty_byte_file(checkpoint):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:20])
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(checkpoint)
    assert str(caught.value).startswith(f"{weights}: truncated or not a safetensors file: its header says at least "
                                        f"{header_bytes(data)} bytes, the file has 20;")


def test_header_length_of_two_to_the_62(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(HEADER_2_62 + b"{}ab")
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(checkpoint)
    assert str(caught.value).startswith(f"{weights}: truncated or not a safetensors file: its header says at least "
                                        f"{2**62 + 8} bytes, the file has 12;")


def test_file_shorter_than_the_header_length(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or not a safetensors file: 3 bytes, "
                                              r"too short for the 8-byte header length"):
        load_pretrained(checkpoint)


def test_truncated_shard_of_a_sharded_checkpoint(tmp_path):
    path = tiny_checkpoint(tmp_path / "sharded", max_shard_bytes=16 * 1024)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = path / sorted(set(weight_map.values()))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(path)
    assert str(caught.value).startswith(f"{shard}: truncated or not a safetensors file: its header says "
                                        f"{len(data)} bytes, the file has {len(data) - 1};")
