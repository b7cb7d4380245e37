"""Test material for tests/data: audio files written with numpy + soundfile, manifests, a toy tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile

from model.tokenizer import SentencePieceTokenizer, train_sentencepiece
from tests.rollout.tiny_checkpoint import corpus

RATE = 16000


def tone(seconds: float, rate: int = RATE, frequency: float = 440.0, seed: int = 0, noise: float = 0.01) -> np.ndarray:
    """A 0.5-amplitude sine plus a little Gaussian noise, float32 (samples,) in [-1, 1)."""
    t = np.arange(int(round(seconds * rate))) / rate
    noise = np.random.default_rng(seed).standard_normal(t.shape[0]) * noise
    return (0.5 * np.sin(2 * np.pi * frequency * t) + noise).astype(np.float32)


def write_audio(path: Path, samples: np.ndarray, rate: int = RATE, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, rate, subtype=subtype)
    return path


def write_manifest(path: Path, rows: list) -> Path:
    """rows: dicts (written as JSON) or bytes (written as they are, for malformed lines)."""
    with open(path, "wb") as handle:
        for row in rows:
            handle.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            handle.write(b"\n")
    return path


_TOKENIZERS: dict[str, SentencePieceTokenizer] = {}


def tokenizer(directory: Path) -> SentencePieceTokenizer:
    """The toy SentencePiece tokenizer of tests/rollout (vocabulary 300), trained once per directory."""
    key = str(directory)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = train_sentencepiece(corpus(), directory / "toy", vocab_size=300)
    return _TOKENIZERS[key]


def tiny_audio_model(tok, seed: int = 0):
    """A 2-layer SpeechLM with a 1-block encoder, ids from `tok`; small enough for CPU tests."""
    import dataclasses

    import torch

    from model import SpeechLM, toy
    from model.tokenizer import config_token_ids

    config = toy(**config_token_ids(tok))
    decoder = dataclasses.replace(config.decoder, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    encoder = dataclasses.replace(config.encoder, hidden_size=32, intermediate_size=64, num_blocks=1, num_heads=2,
                                  nemo_conv_channels=8, ext_pw_out_channel=32, depthwise_separable_out_channel=32,
                                  bias_max_distance=20)
    torch.manual_seed(seed)
    model = SpeechLM(dataclasses.replace(config, decoder=decoder, encoder=encoder))
    with torch.no_grad():
        model.decoder.lm_head.weight.normal_(0.0, 0.5)  # spread logits: sampled pairs differ
    return model
