"""A local model's log-probabilities at given positions of given token sequences: the one scoring
routine behind `rollout.teachers.LocalTeacher` (KD) and `rollout.server` (prompt_logprobs,
echo + logprobs). Batched, no grad, the log-softmax taken `chunk_tokens` positions at a time,
so a 200k vocabulary never needs a (tokens, V) tensor beyond one chunk unless the full
distribution is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

NEG_INF = float("-inf")
TokenIds = Sequence[Sequence[int]]  # one list (or 1-D tensor) of token ids per row


@dataclass
class ScoredPositions:
    """Scores of positions [start_b, len_b) of each sequence b, right-padded to T = max(len_b - start_b)."""

    token_logprobs: Tensor  # (B, T) float32
    topk_ids: Tensor  # (B, T, k) int64
    topk_logprobs: Tensor  # (B, T, k) float32, -inf where padded
    ranks: Tensor | None  # (B, T) int64, 1-based rank of the token in the full vocabulary
    full: Tensor | None  # (B, T, V) float32
    mask: Tensor  # (B, T) bool


@torch.no_grad()
def score_positions(
    model,
    sequences: TokenIds,
    starts: Sequence[int],
    top_k: int = 0,
    *,
    full: bool = False,
    ranks: bool = False,
    batch_size: int = 8,
    chunk_tokens: int = 1024,
) -> ScoredPositions:
    """Teacher-forced log p(seq[t] | seq[:t]) and top-k for t in [start, len) of every sequence.

    Sequences are right-padded `batch_size` at a time and run through `model.hidden_states`
    (text only); the LM head and log-softmax run `chunk_tokens` positions at a time.
    """
    decoder = model.decoder
    vocab_size = decoder.config.vocab_size
    device = decoder.embed_tokens.weight.device
    sequences = [list(s) for s in sequences]
    if not 0 <= top_k <= vocab_size:
        raise ValueError(f"top_k must lie in [0, vocab_size={vocab_size}], got {top_k}")
    for b, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
        if not 1 <= start <= len(sequence):
            raise ValueError(f"sequence {b}: start {start} must lie in [1, len={len(sequence)}] "
                             "(position 0 has no prediction)")
        bad = [t for t in sequence if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sequence {b}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    lengths = [len(s) - start for s, start in zip(sequences, starts)]
    num, steps = len(sequences), max(lengths, default=0)
    out = ScoredPositions(
        token_logprobs=torch.zeros(num, steps),
        topk_ids=torch.zeros(num, steps, top_k, dtype=torch.long),
        topk_logprobs=torch.full((num, steps, top_k), NEG_INF),
        ranks=torch.zeros(num, steps, dtype=torch.long) if ranks else None,
        full=torch.zeros(num, steps, vocab_size) if full else None,
        mask=torch.arange(steps)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None],
    )
    pad = decoder.config.pad_token_id
    for first in range(0, num, batch_size):
        rows = [b for b in range(first, min(first + batch_size, num)) if lengths[b] > 0]
        if not rows:
            continue
        width = max(len(sequences[b]) for b in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, b in enumerate(rows):
            input_ids[i, : len(sequences[b])] = torch.tensor(sequences[b])
            attention_mask[i, : len(sequences[b])] = 1
        padded = bool((attention_mask == 0).any())
        hidden = model.hidden_states(input_ids.to(device), attention_mask.to(device) if padded else None)  # (n, S, H)
        # position p of a row predicts token p + 1: take p in [start - 1, len - 1)
        row_index = torch.cat([torch.full((lengths[b],), i) for i, b in enumerate(rows)])  # (N,)
        source = torch.cat([torch.arange(starts[b] - 1, len(sequences[b]) - 1) for b in rows])  # (N,)
        target_row = torch.cat([torch.full((lengths[b],), b) for b in rows])  # (N,) row of the output
        target_step = torch.cat([torch.arange(lengths[b]) for b in rows])  # (N,) step of the output
        targets = torch.cat([torch.tensor(sequences[b][starts[b]:]) for b in rows])  # (N,) the scored tokens
        flat_hidden = hidden[row_index.to(device), source.to(device)]  # (N, H)
        for c in range(0, flat_hidden.shape[0], chunk_tokens):
            chunk = slice(c, c + chunk_tokens)
            logprobs = decoder.logits(flat_hidden[chunk]).float().log_softmax(-1)  # (C, V)
            token_lp = logprobs.gather(-1, targets[chunk, None].to(device))[:, 0]  # (C,)
            where = (target_row[chunk], target_step[chunk])
            out.token_logprobs[where] = token_lp.cpu()
            if top_k:
                values, ids = logprobs.topk(top_k, dim=-1)  # (C, k) descending
                out.topk_logprobs[where] = values.cpu()
                out.topk_ids[where] = ids.cpu()
            if ranks:
                out.ranks[where] = ((logprobs > token_lp[:, None]).sum(-1) + 1).cpu()
            if full:
                out.full[where] = logprobs.cpu()
    return out
