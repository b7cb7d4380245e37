"""A tiny random text-only checkpoint with its own toy tokenizer, for the teacher, server and
judge tests.

Layout of the directory (what `python -m rollout.server --checkpoint DIR` and
`LocalTeacher.from_pretrained(DIR)` read):

    DIR/config.json         model.save_pretrained (carries the exact config under "speechsum")
    DIR/model.safetensors   random weights, seed fixed
    DIR/tokenizer.model     SentencePiece model (a real checkpoint ships tokenizer.json instead);
                            model.tokenizer.load_tokenizer(DIR) finds either
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import random
import shutil
import threading
from pathlib import Path

import torch

from model import SpeechLM, save_pretrained, toy
from model.tokenizer import SPECIAL_TOKENS, config_token_ids, train_sentencepiece

WORDS = (
    "the meeting team budget project design remote control we decided agreed next week price battery "
    "button marketing manager said that should cost euros and user interface summary action items"
).split()


def corpus(num_sentences: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ", 25 euros.", ' "ok" {x}']))
    return sentences


def build_tiny_checkpoint(directory: str | Path, seed: int = 0, vocab_size: int = 300) -> Path:
    """Train the toy tokenizer, build a 2-layer text-only SpeechLM (untied head) on it, save both into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_sentencepiece(corpus(), directory / "spm" / "toy", vocab_size=vocab_size)
    shutil.move(str(tokenizer.path), directory / "tokenizer.model")
    shutil.rmtree(directory / "spm")
    config = toy(**config_token_ids(tokenizer))
    decoder = dataclasses.replace(config.decoder, num_layers=2, tie_word_embeddings=False)
    config = dataclasses.replace(config, encoder=None, decoder=decoder)
    torch.manual_seed(seed)
    model = SpeechLM(config)
    with torch.no_grad():
        # Untied, small LM head: logits spread over a few nats (a tied random embedding makes every
        # token predict itself with probability ~1, and near-uniform logits make top-k ties).
        model.decoder.lm_head.weight.normal_(0.0, 0.15)
    save_pretrained(model, directory)
    return directory


@contextlib.contextmanager
def serving(checkpoint: str | Path, model_name: str, api_key: str | None = None):
    """rollout.server over `checkpoint` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    from rollout.server import load_service, make_server

    server = make_server(load_service(checkpoint, model_name=model_name), "127.0.0.1", 0, api_key=api_key)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# gpt-oss's (harmony) role markers: a KD teacher tokenizer with its own special tokens
HARMONY_MARKERS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>")


def train_with_markers(texts, path: str | Path, markers=HARMONY_MARKERS, vocab_size: int = 300) -> Path:
    """A toy SentencePiece model as model.tokenizer.train_sentencepiece trains it, with `markers` as the
    user-defined special tokens (ids 4-8) in place of the Phi-4 chat's: trained on the same texts, its
    ordinary pieces and their ids are the toy tokenizer's (a teacher sharing the student's vocabulary
    with a chat template of its own)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type="bpe", pad_id=0,
        bos_id=1, eos_id=2, unk_id=3, eos_piece=SPECIAL_TOKENS["endoftext"], user_defined_symbols=list(markers),
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        character_coverage=1.0, max_sentence_length=1 << 20, num_threads=1, minloglevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path
