"""A tiny audio student checkpoint, a text teacher, audio files and the three manifests, as the
smoke configs expect them under a root directory (toy/checkpoints/..., cache/toy/quick/... and
runs/smoke/pairs.jsonl, relative to the run's cwd): tiny stand-ins for the shipped checkpoints and the
quick corpus."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import soundfile
import torch

from model import SpeechLM, save_pretrained, toy
from model.config import EncoderConfig
from model.tokenizer import config_token_ids, train_sentencepiece
from tests.rollout.tiny_checkpoint import build_tiny_checkpoint, corpus


def build_toy_files(root: Path, clips: int = 6) -> Path:
    cache, checkpoints = root / "cache" / "toy" / "quick", root / "toy" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    build_tiny_checkpoint(checkpoints / "teacher", seed=3)
    tokenizer = train_sentencepiece(corpus(), root / "cache" / "spm" / "toy", vocab_size=300)
    student = checkpoints / "student"
    config = toy(**config_token_ids(tokenizer))
    config = dataclasses.replace(
        config,
        decoder=dataclasses.replace(config.decoder, hidden_size=64, intermediate_size=128, num_layers=2,
                                    num_heads=4, num_kv_heads=2, head_dim=16),
        encoder=EncoderConfig(hidden_size=32, intermediate_size=64, num_blocks=1, num_heads=2, nemo_conv_channels=8,
                              ext_pw_out_channel=32, depthwise_separable_out_channel=32, bias_max_distance=20),
    )
    torch.manual_seed(0)
    save_pretrained(SpeechLM(config), student)
    shutil.copy2(tokenizer.path, student / "tokenizer.model")
    texts = corpus(num_sentences=clips, seed=7)
    rows = []
    for i, transcript in enumerate(texts):
        seconds = 1.0 + 0.25 * i
        t = np.arange(int(seconds * 16000)) / 16000
        audio = (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32)
        path = cache / "audio" / f"clip{i}.wav"
        path.parent.mkdir(exist_ok=True)
        soundfile.write(str(path), audio, 16000)
        rows.append({"audio_filepath": f"audio/clip{i}.wav", "duration": seconds, "id": f"clip{i}",
                     "transcript": transcript, "instruction": "Summarize briefly.", "summary": transcript[:30]})
    write = lambda name, items: (cache / name).write_text("".join(json.dumps(r) + "\n" for r in items))  # noqa: E731
    write("sft.jsonl", rows)
    write("validation.jsonl", rows[:2])
    write("kd.jsonl", [{k: v for k, v in r.items() if k != "summary"} for r in rows])
    pairs = root / "runs" / "smoke" / "pairs.jsonl"  # as eval.preferences writes it, audio paths made absolute
    pairs.parent.mkdir(parents=True, exist_ok=True)
    pairs.write_text("".join(json.dumps({**{k: v for k, v in r.items() if k != "summary"},
                                         "audio_filepath": str(cache / r["audio_filepath"]), "chosen": r["summary"],
                                         "rejected": "the the the the"}) + "\n" for r in rows))
    return root
