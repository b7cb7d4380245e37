"""Tokenized examples, the padded batch every stage consumes, and deterministic sharded batching.

An `Example` is one (audio, instruction[, response]) item already turned into token ids by the
chat template (model/tokenizer.py): `prompt_ids` hold the placeholder run of its clip. `collate`
right-pads examples into a `Batch`; `loss_mask` marks the response tokens, so a decoder that
predicts the next token is scored with logits[:, :-1] against input_ids[:, 1:] where
loss_mask[:, 1:].

`ExampleSource` plans batches with DistributedSampler semantics: each epoch is a permutation of
the examples drawn from (seed, epoch); the first len - len % world_size entries are dealt out
round-robin, so rank r gets entries r, r + W, r + 2W, ... (disjoint shards, the same for the
same seed), and consecutive entries of a rank form its batches. A batch plan is a list of
example indices, so the loop can resume at any batch without loading the ones before it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Example:
    id: str
    prompt_ids: list[int]  # chat prompt, audio placeholders included
    response_ids: list[int] = field(default_factory=list)  # reference answer (SFT); empty for KD/DPO pools
    features: torch.Tensor | None = None  # (frames, 80) log-mel of the clip, None for text-only
    instruction: str = ""
    transcript: str = ""


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    loss_mask: torch.Tensor  # (B, T) True on response tokens
    prompt_lengths: torch.Tensor  # (B,)
    audio_features: torch.Tensor | None  # (N, F, 80) clips of the rows that have one, zero-padded
    audio_lengths: torch.Tensor | None  # (N,) valid frames
    examples: list[Example]

    @property
    def prompts(self) -> list[torch.Tensor]:
        """Prompt ids of each row, unpadded (what the sampler takes)."""
        return [self.input_ids[i, :n] for i, n in enumerate(self.prompt_lengths.tolist())]

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(self.ids, move(self.input_ids), move(self.attention_mask), move(self.loss_mask),
                     move(self.prompt_lengths), move(self.audio_features), move(self.audio_lengths), self.examples)


def collate(examples: list[Example], pad_token_id: int) -> Batch:
    """Right-pad prompt + response ids; zero-pad the clips in row order."""
    if not examples:
        raise ValueError("collate: empty batch")
    length = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), length, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        loss_mask[row, len(example.prompt_ids) : len(ids)] = True
    clips = [e.features for e in examples if e.features is not None]
    features = lengths = None
    if clips:
        lengths = torch.tensor([c.shape[0] for c in clips], dtype=torch.long)
        features = torch.zeros(len(clips), int(lengths.max()), clips[0].shape[-1], dtype=clips[0].dtype)
        for i, clip in enumerate(clips):
            features[i, : clip.shape[0]] = clip
    return Batch(
        ids=[e.id for e in examples],
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        prompt_lengths=torch.tensor([len(e.prompt_ids) for e in examples], dtype=torch.long),
        audio_features=features,
        audio_lengths=lengths,
        examples=list(examples),
    )


class ExampleSource:
    """Deterministic, sharded batches over an in-memory list of examples (see module docstring)."""

    def __init__(self, examples: list[Example], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pad_token_id: int = 0, shuffle: bool = True, device=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples, self.batch_size = examples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad_token_id, self.shuffle, self.device = pad_token_id, shuffle, device

    def epoch_order(self, epoch: int) -> list[int]:
        count = len(self.examples)
        if not self.shuffle:
            return list(range(count))
        return torch.randperm(count, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)).tolist()

    def epoch_plans(self, epoch: int) -> list[list[int]]:
        order = self.epoch_order(epoch)
        usable = len(order) - len(order) % self.world_size
        shard = order[self.rank : usable : self.world_size]
        return [shard[i : i + self.batch_size] for i in range(0, len(shard), self.batch_size)]

    def load(self, plan: list[int]) -> Batch:
        batch = collate([self.examples[i] for i in plan], self.pad_token_id)
        return batch.to(self.device) if self.device is not None else batch

    def sample_ids(self, batch: Batch) -> list[str]:
        return batch.ids
