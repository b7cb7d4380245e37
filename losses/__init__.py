"""Losses of the three training stages, as pure functions of tensors (no models, no I/O).

* ``losses.sft``: masked cross-entropy for supervised fine-tuning (stage 1).
* ``losses.kd``: on-policy distillation, eqs. 1-2 of the paper: forward KL, reverse KL and the
  GKD generalized JSD over the full vocabulary, divergences passed by name.
* ``losses.kd_topk``: eq. 1 for a teacher that reports its top k tokens (an API): k buckets + tail.
* ``losses.kd_fused``: what training runs, equal to the two above in value and gradient: decoder
  hidden states and the LM-head weight in, chunked, never the [tokens, vocab] logits at once
  (nor a float32 copy of a bf16 LM head).
* ``losses.dpo``: sequence log-probabilities and the DPO loss, eq. 3.

Conventions shared by every function here
-----------------------------------------
Sign. Every loss returns a scalar to *minimise*. The paper prints eq. 2 as an ascent direction
and eq. 3 as a quantity to maximise; each docstring writes out where the minus sign goes.

Alignment. ``logits[b, t]`` is the distribution that scores ``labels[b, t]`` (or that the teacher
distribution at ``[b, t]`` is compared with). The caller shifts: for a decoder that predicts the
next token, pass ``logits[:, :-1]``, ``input_ids[:, 1:]`` and ``response_mask[:, 1:]``.

Mask. ``mask`` is ``[B, T]``, bool (or 0/1): True on response tokens, False on the prompt
(instruction and audio placeholders) and on padding. Masked-out positions are dropped *before*
any arithmetic, so they get exactly zero gradient, and whatever they hold (``-100`` labels,
``-inf`` or NaN teacher rows) never reaches the loss.

Reduction: ``reduction="mean" | "sum"``.
``"mean"`` divides the sum over this call's response tokens (DPO: pairs) by their count (a call
with none returns 0). ``"sum"`` returns the plain sum, so the training loop can divide by the
count of the *global* batch: all micro-batches of an accumulation step on all ranks. This makes
gradient accumulation and data parallelism give the gradient of one big batch::

    # count first (a cheap pass over the masks), then forward/backward each micro-batch
    global_tokens = sum(response_token_count(mb.mask) for mb in micro_batches)
    torch.distributed.all_reduce(global_tokens)                       # sum over ranks
    for mb in micro_batches:
        loss_sum = forward_kl(mb.logits, mb.teacher_logprobs, mb.mask, reduction="sum")
        # DDP *averages* gradients over ranks, so scale by world_size to undo that average
        (loss_sum * world_size / global_tokens).backward()

Without DDP (plain accumulation on one process) ``world_size`` is 1. For DPO the unit is a
preference pair instead of a token: ``global_pairs`` replaces ``global_tokens``. Averaging each
micro-batch's own ``"mean"`` instead weights a token of a short micro-batch more than a token of
a long one; ``tests/losses/test_reduction.py`` shows both.
"""
from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum")


def response_token_count(mask: Tensor) -> Tensor:
    """Number of response tokens in ``mask`` ([B, T] bool or 0/1), as an int64 scalar tensor."""
    return (mask != 0).sum()


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")


def check_mask(mask: Tensor, batch_shape: torch.Size, what: str) -> Tensor:
    """Return ``mask`` as bool after checking that it is [B, T] like the first two dims of
    ``what``."""
    if tuple(mask.shape) != tuple(batch_shape):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but {what} has batch shape {tuple(batch_shape)}; "
            "pass the [B, T] response mask that lines up with it "
            "(shift both, see losses/__init__.py)"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def reduce_loss(loss_sum: Tensor, count: int | Tensor, reduction: str) -> Tensor:
    """``loss_sum`` for ``"sum"``; ``loss_sum / count`` for ``"mean"`` (0 when count is 0)."""
    if reduction == "sum":
        return loss_sum
    return loss_sum / max(int(count), 1)


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32
