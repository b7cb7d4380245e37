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

`bucketed_plans` is the planner for real data (data/dataset.py): length-bucketed batches under
a token budget, sharded over ranks with equal batch counts. Its docstring gives the algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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


# ---------------------------------------------------------------------------------------------
# length-bucketed planning under a token budget


def batch_cost(lengths: Sequence[int]) -> int:
    """Tokens a batch occupies once padded: rows x longest row (audio + text tokens per row)."""
    return len(lengths) * max(lengths) if lengths else 0


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, stream): the same on every rank and run."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 8 + stream) % (2**63 - 1))


def bucketed_plans(
    lengths: Sequence[int],
    *,
    max_tokens: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    max_batch_size: int | None = None,
    window: int = 1000,
    shuffle: bool = True,
) -> list[list[int]]:
    """This rank's batches of one epoch: lists of indices into `lengths`, in training order.

    `lengths[i]` is sample i's length in tokens (audio + prompt text + response), estimated from
    the manifest. Every rank computes the same global plan and keeps its share:
      1. order: a permutation of all samples drawn from (seed, epoch) (identity if not shuffle);
      2. windows of `window` consecutive samples of that order are each sorted by length,
         longest first, so batches mix little padding while the epoch stays random;
      3. each window is cut greedily into batches whose padded cost `batch_cost` (rows x
         longest row) stays <= max_tokens, and rows <= max_batch_size. A sample longer than
         max_tokens on its own forms a batch of one;
      4. equal steps for DDP: while the batch count is not a multiple of world_size, the batch
         with the most rows (earliest on ties) is split into two halves; only when every batch is
         a single sample are the last (count % world_size) batches of step 5 dropped, which
         loses at most world_size - 1 samples (the case of DistributedSampler's drop_last);
      5. the batch order is shuffled with (seed, epoch) (kept if not shuffle);
      6. rank r takes batches r, r + W, r + 2W, ...: ranks get disjoint samples, the same number
         of batches, and together every sample of the epoch (except step 4's drop).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank}, world_size {world_size}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    count = len(lengths)
    if shuffle:
        order = torch.randperm(count, generator=epoch_generator(seed, epoch, 0)).tolist()
    else:
        order = list(range(count))
    batches: list[list[int]] = []
    for begin in range(0, count, window):
        ranked = sorted(order[begin : begin + window], key=lambda i: -lengths[i])  # stable: ties keep order
        batches += _cut(ranked, lengths, max_tokens, max_batch_size)
    while len(batches) % world_size:
        widest = max(range(len(batches)), key=lambda b: (len(batches[b]), -b))
        rows = batches[widest]
        if len(rows) < 2:
            break
        batches[widest : widest + 1] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=epoch_generator(seed, epoch, 1)).tolist()]
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]


def _cut(ranked: list[int], lengths: Sequence[int], max_tokens: int, max_batch_size: int | None) -> list[list[int]]:
    """Greedy batches of consecutive samples of `ranked` (longest first) under the budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in ranked:
        length = lengths[index]
        grown = max(longest, length)
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * grown > max_tokens):
            batches.append(current)
            current, grown = [], length
        current.append(index)
        longest = grown
    if current:
        batches.append(current)
    return batches
