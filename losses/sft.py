"""Stage 1 (paper section 2.1): supervised fine-tuning on synthetic (audio, query, summary) data.

    L_SFT(theta) = - (1/N) sum_{t in response} log p_theta(y_t | x, y_<t)

N is the number of response tokens; the prompt (instruction, audio placeholders) and padding are
excluded by ``mask``. Conventions (alignment, mask, reduction): see losses/__init__.py.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from losses import check_mask, check_reduction, compute_dtype, reduce_loss


def masked_cross_entropy(
    logits: Tensor, labels: Tensor, mask: Tensor, *, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy of ``labels`` under ``logits`` over the response tokens only.

    logits [B, T, V] (any float dtype; computed in float32, or float64 if given float64),
    labels [B, T] int64 (values at masked-out positions are ignored, e.g. -100),
    mask [B, T] bool. Returns a scalar to minimise: ``-sum_t log p(y_t)`` over response tokens,
    divided by their count for ``reduction="mean"``. d loss / d logits = (p - onehot(y)) / N on
    response positions and exactly 0 elsewhere.
    """
    check_reduction(reduction)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"masked_cross_entropy: logits {tuple(logits.shape)} must be [B, T, V] and labels "
            f"{tuple(labels.shape)} must be [B, T] with the same B, T"
        )
    mask = check_mask(mask, logits.shape[:2], "logits")
    response_logits = logits[mask].to(compute_dtype(logits))  # (N, V) logits at response positions
    response_labels = labels[mask]  # (N,) y_t
    # -sum_t log p(y_t | x, y_<t)
    nll_sum = F.cross_entropy(response_logits, response_labels, reduction="sum")
    return reduce_loss(nll_sum, response_labels.numel(), reduction)
