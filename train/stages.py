"""The stages' losses on a model and a batch, in the form train/loop.py runs.

Each stage returns a *sum* over its loss units and the number of units comes from
`loss_units`; the loop divides by the units of the global batch (see train/loop.py).
Metrics are sums over the same units, so the loop's division turns them into means.
"""
from __future__ import annotations

import torch

from data.batching import Batch
from losses.sft import masked_cross_entropy


def response_logits(model, batch: Batch, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the positions that predict a response token, and those tokens (N,).

    Only the N response positions go through the LM head: a prompt of 22,500 audio tokens
    never becomes [T, 200064] logits.
    """
    if hidden is None:
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask, batch.audio_features, batch.audio_lengths)
    target_mask = batch.loss_mask[:, 1:]  # (B, T-1): position t predicts token t + 1
    predicting = hidden[:, :-1][target_mask]  # (N, hidden)
    return model.decoder.logits(predicting), batch.input_ids[:, 1:][target_mask]


class SFTStage:
    """Stage 1: teacher-forced cross-entropy on (audio, instruction) -> reference summary."""

    name = "sft"

    def prepare(self, model, batch: Batch) -> Batch:
        return batch

    def loss_units(self, batch: Batch) -> int:
        return int(batch.loss_mask[:, 1:].sum())

    def loss(self, model, batch: Batch):
        logits, targets = response_logits(model, batch)  # (N, V), (N,)
        mask = torch.ones(1, targets.numel(), dtype=torch.bool, device=targets.device)
        nll_sum = masked_cross_entropy(logits[None], targets[None], mask, reduction="sum")
        return nll_sum, {}
