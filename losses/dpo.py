"""Stage 3 (paper section 2.3): direct preference optimisation (Rafailov et al., 2023).

For each audio x the student's two samples are judged: y+ preferred, y- rejected. Eq. 3:

    L_DPO = E_x [ log sigma( beta log pi(y+|x)/pi_ref(y+|x)
                             - beta log pi(y-|x)/pi_ref(y-|x) ) ]   (3)

SIGN. As printed, (3) is a quantity to *maximise*. ``dpo_loss`` returns its negative, a scalar to
minimise (TRL's "sigmoid" loss):

    loss = -log sigma(beta * margin),   margin = [log pi(y+) - log pi_ref(y+)]
                                                 - [log pi(y-) - log pi_ref(y-)]

Per pair, d loss / d log pi(y+) = -beta sigma(-beta margin) and
d loss / d log pi(y-) = +beta sigma(-beta margin) (``reduction="mean"`` divides both by the number
of pairs P): a descent step raises log pi(y+) and lowers log pi(y-), i.e. raises the margin.

log pi(y|x) is the sum of token log-probabilities over the response tokens (``sequence_logprobs``).
pi_ref is the KD checkpoint: in this project the same model with its LoRA adapters disabled, or
precomputed reference log-probabilities; its inputs are detached either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losses import check_mask, check_reduction, compute_dtype, reduce_loss


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """log pi(y|x) = sum_{t in response} log pi(y_t | x, y_<t), one value per row: [B].

    logits [B, T, V] (position t scores labels[:, t]: shift before calling), labels [B, T] int64
    (values at masked-out positions are ignored), mask [B, T] bool, True on response tokens.
    Only the response rows are upcast to float32 (float64 stays float64), so a long audio prompt
    costs nothing here. Differentiable w.r.t. ``logits``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"sequence_logprobs: logits {tuple(logits.shape)} must be [B, T, V] and labels "
            f"{tuple(labels.shape)} must be [B, T] with the same B, T"
        )
    mask = check_mask(mask, logits.shape[:2], "logits")
    response_logits = logits[mask].to(compute_dtype(logits))  # (N, V)
    response_labels = labels[mask].long()  # (N,) y_t
    # (N,) logit of y_t
    label_logits = response_logits.gather(-1, response_labels[:, None]).squeeze(-1)
    # (N,) log pi(y_t | x, y_<t)
    token_logprobs = label_logits - torch.logsumexp(response_logits, dim=-1)
    row_of_token = mask.nonzero()[:, 0]  # (N,) which sequence each response token belongs to
    sequence_sums = torch.zeros(logits.shape[0], dtype=token_logprobs.dtype, device=logits.device)
    return sequence_sums.index_add(0, row_of_token, token_logprobs)  # (B,) log pi(y | x)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negated eq. 3, a scalar to minimise, and detached per-pair metrics.

    Inputs are [P] sequence log-probabilities (``sequence_logprobs``), one per preference pair:
    policy pi on y+ and y-, reference pi_ref on y+ and y- (detached). With label_smoothing = 0:

        loss_p = -log sigma(beta * margin_p)

    With label_smoothing = eps > 0, the conservative DPO loss (cDPO, labels flipped with
    probability eps; TRL's "sigmoid" loss with label_smoothing):

        loss_p = -(1 - eps) log sigma(beta * margin_p) - eps log sigma(-beta * margin_p)

    Returns ``(loss, metrics)``; loss is the mean over pairs (``reduction="mean"``) or the sum
    (``"sum"``; divide by the global pair count, see losses/__init__.py). metrics, each [P] and
    detached: ``chosen_rewards`` = beta (log pi(y+) - log pi_ref(y+)), ``rejected_rewards``
    likewise for y-, ``reward_accuracy`` = 1.0 where chosen_rewards > rejected_rewards (ties
    count 0), ``reward_margin`` = chosen_rewards - rejected_rewards = beta * margin.
    """
    check_reduction(reduction)
    if not beta > 0:
        raise ValueError(f"beta={beta}: the DPO temperature must be > 0 (paper/TRL default 0.1)")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(
            f"label_smoothing={label_smoothing}: the cDPO flip probability must lie in [0, 0.5]"
        )
    inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(t.shape) for t in inputs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(
            "dpo_loss: the four log-prob tensors must all be [P] (one per pair), "
            f"got shapes {shapes}"
        )
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    chosen_logratio = policy_chosen_logps - ref_chosen_logps  # (P,) log pi(y+|x) / pi_ref(y+|x)
    # (P,) log pi(y-|x) / pi_ref(y-|x)
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    # (P,) the argument of sigma in eq. 3, divided by beta
    margin = chosen_logratio - rejected_logratio
    per_pair = -F.logsigmoid(beta * margin)  # (P,) -log sigma(beta margin): eq. 3 negated
    if label_smoothing > 0.0:
        # (P,) cDPO
        per_pair = (
            (1.0 - label_smoothing) * per_pair - label_smoothing * F.logsigmoid(-beta * margin)
        )
    loss = reduce_loss(per_pair.sum(), per_pair.numel(), reduction)

    chosen_rewards = (beta * chosen_logratio).detach()  # (P,) implicit reward r(x, y+)
    rejected_rewards = (beta * rejected_logratio).detach()  # (P,) implicit reward r(x, y-)
    metrics = {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "reward_accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "reward_margin": chosen_rewards - rejected_rewards,
    }
    return loss, metrics
