"""Stage 2 (paper section 2.2): on-policy knowledge distillation.

The student samples y ~ p_S(.|x) itself; the teacher scores the student's own tokens. Eq. 1:

    L(theta) = E_x E_{y ~ p_S(.|x)} [ sum_t KL( p_T(.|x, y_<t) || p_S^theta(.|x, y_<t) ) ]     (1)
    KL(p_T || p_S) = sum_z p_T(z) [ log p_T(z) - log p_S^theta(z) ]

No gradient flows through the sampling of y (the tokens are integers here), and the teacher is
a constant: every teacher input is detached. Hence

    grad_theta KL(p_T || p_S^theta) = - sum_z p_T(z) grad_theta log p_S^theta(z)

SIGN. The paper prints eq. 2 as  + E[ sum_z p_T(z) grad log p_S^theta(z) ],  the policy-gradient
form with p_T(z) as the reward of token z: that is the *ascent* direction. Every function here
returns L, a scalar to *minimise*; autograd gives the descent gradient, which is eq. 2 with a
minus sign (divided by the token count N). tests/losses/test_kd.py pins this with explicit
per-token backward passes on a linear student.

Forward KL here is a true KL: the teacher entropy term sum_z p_T log p_T is included, so the
value is 0 when p_S = p_T (torchtune's ForwardKLLoss returns the cross-entropy instead: same
gradient, value off by the teacher entropy). Its gradient w.r.t. the student logits at one token
is p_S - p_T.

The GKD family (Agarwal et al., ICLR 2024; TRL ``generalized_jsd_loss``), ``beta`` in [0, 1]:

    JSD_beta(p_T, p_S) = beta KL(p_T || M) + (1 - beta) KL(p_S || M),
                         M = beta p_T + (1 - beta) p_S

beta = 0 is *defined* as forward KL(p_T || p_S) and beta = 1 as reverse KL(p_S || p_T): the
mixture form itself vanishes at both ends (M becomes p_S, resp. p_T); JSD_beta / beta tends to the
forward KL as beta -> 0 and JSD_beta / (1 - beta) to the reverse KL as beta -> 1.

Temperature ``tau`` (default 1) applies to *both* distributions before the divergence, as the
``temperature`` argument of TRL's ``generalized_jsd_loss`` does:
p_S = softmax(student_logits / tau), p_T = softmax(log p_T / tau) (dividing log-probabilities by
tau and renormalising equals dividing the teacher's logits by tau). No tau^2 factor is applied.
With tau = 1 the teacher log-probabilities are used exactly as given, so they should be normalised
(log_softmax output). This loss temperature is not the rollout's sampling temperature: TRL's
GKDTrainer samples at its configured temperature but calls the loss with the default 1.0, and the
paper uses no loss temperature either.

Divergences by name: "forward" (eq. 1), "reverse", "jsd" (with 0 < beta < 1); `divergence_rows`
dispatches on the name, and `generalized_jsd` keeps GKD's own convention (beta = 0 and 1 are
the two KLs) for readers coming from TRL.

This module holds eq. 1-2 on full-vocabulary log-probabilities, the reference forms. Where the
other forms live:
  losses/kd_topk.py   an API teacher's top k tokens per position plus one tail bucket
                      (``forward_kl_topk``);
  losses/kd_fused.py  what training runs: the student's hidden states and LM-head weight in,
                      chunked over tokens so that no [tokens, V] logits exist at once
                      (``fused_kd_loss``), with each teacher form; it equals the functions here
                      in value and gradient (tests/losses/test_kd_fused.py).

Inputs: student_logits [B, T, V] in any float dtype (computed in float32; float64 stays float64),
finite. mask [B, T] bool: True on response tokens. Reduction and alignment: losses/__init__.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from losses import check_mask, check_reduction, compute_dtype, reduce_loss

NEG_INF = float("-inf")
DIVERGENCES = ("forward", "reverse", "jsd")  # KL(p_T || p_S) (eq. 1), KL(p_S || p_T), JSD_beta


# ---------------------------------------------------------------------------------------------
# Per-token divergences on rows of log-probabilities: (N, K) x (N, K) -> (N,).
# K is the vocabulary (full-vocab forms) or the k + 1 buckets of the top-k form. Entries of
# probability 0 (log-prob -inf) contribute 0 (0 log 0 = 0) and never produce NaN values or NaN
# gradients: each log-ratio is computed only from finite operands where its weight is non-zero.
# ---------------------------------------------------------------------------------------------


def _forward_kl_rows(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """KL(p_T || p_S) per row: the inner sum of eq. 1."""
    teacher_probs = teacher_logprobs.exp()  # (N, K) p_T(z)
    # (N, K) log p_T(z) - log p_S(z), where p_T(z) > 0
    log_ratio = torch.where(teacher_probs > 0, teacher_logprobs - student_logprobs, 0.0)
    return (teacher_probs * log_ratio).sum(-1)  # (N,) sum_z p_T(z) [log p_T(z) - log p_S(z)]


def _reverse_kl_rows(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """KL(p_S || p_T) per row (GKD beta = 1). Infinite where p_T = 0 < p_S, as the true KL is."""
    student_probs = student_logprobs.exp()  # (N, K) p_S(z)
    # (N, K) log p_S(z) - log p_T(z), where p_S(z) > 0
    log_ratio = torch.where(student_probs > 0, student_logprobs - teacher_logprobs, 0.0)
    return (student_probs * log_ratio).sum(-1)  # (N,) sum_z p_S(z) [log p_S(z) - log p_T(z)]


def _mixture_jsd_rows(student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float) -> Tensor:
    """beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = beta p_T + (1 - beta) p_S, 0 < beta < 1.

    M is never formed. The log-ratios log(M / p_T) and log(M / p_S) are computed directly with
    logaddexp, so no two O(1) log-probabilities are subtracted to get an O(beta) number: the
    result stays accurate for beta near 0 or 1, where the divergence itself is O(beta) or
    O(1 - beta).
    """
    log_beta, log_one_minus_beta = math.log(beta), math.log1p(-beta)  # log beta, log(1 - beta)
    teacher_probs = teacher_logprobs.exp()  # (N, K) p_T(z)
    student_probs = student_logprobs.exp()  # (N, K) p_S(z)
    teacher_finite = torch.where(teacher_probs > 0, teacher_logprobs, 0.0)  # log p_T where p_T > 0
    student_finite = torch.where(student_probs > 0, student_logprobs, 0.0)  # log p_S where p_S > 0
    # log M/p_T = log(beta + (1 - beta) p_S/p_T)
    log_m_over_teacher = torch.logaddexp(
        teacher_finite.new_tensor(log_beta), log_one_minus_beta + student_logprobs - teacher_finite
    )  # (N, K)
    # log M/p_S = log((1 - beta) + beta p_T/p_S)
    log_m_over_student = torch.logaddexp(
        student_finite.new_tensor(log_one_minus_beta), log_beta + teacher_logprobs - student_finite
    )  # (N, K)
    # KL(p_T || M) = sum_z p_T(z) [-log M/p_T (z)], KL(p_S || M) likewise
    kl_teacher_mixture = (
        teacher_probs * torch.where(teacher_probs > 0, -log_m_over_teacher, 0.0)
    ).sum(-1)  # (N,)
    kl_student_mixture = (
        student_probs * torch.where(student_probs > 0, -log_m_over_student, 0.0)
    ).sum(-1)  # (N,)
    return beta * kl_teacher_mixture + (1.0 - beta) * kl_student_mixture  # (N,) JSD_beta


def divergence_rows(student_logprobs: Tensor, teacher_logprobs: Tensor, divergence: str = "forward",
                    beta: float | None = None) -> Tensor:
    """The divergence named `divergence` per row: (N, K) x (N, K) -> (N,); see
    `check_divergence`."""
    check_divergence(divergence, beta)
    if divergence == "forward":
        return _forward_kl_rows(student_logprobs, teacher_logprobs)
    if divergence == "reverse":
        return _reverse_kl_rows(student_logprobs, teacher_logprobs)
    return _mixture_jsd_rows(student_logprobs, teacher_logprobs, beta)


def check_divergence(divergence: str, beta: float | None) -> None:
    """"forward" and "reverse" take no beta; "jsd" needs 0 < beta < 1 (its endpoints are the two
    KLs, asked for by name). A beta given with a KL is an error, never silently ignored."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}: expected one of {DIVERGENCES}")
    if divergence == "jsd":
        if beta is None or not 0.0 < beta < 1.0:
            raise ValueError(f"divergence='jsd' needs 0 < beta < 1, got beta={beta} (beta = 0 is "
                             "divergence='forward', beta = 1 is divergence='reverse')")
    elif beta is not None:
        raise ValueError(f"beta={beta} is the generalized JSD's mixture weight; "
                         f"divergence={divergence!r} takes none (use divergence='jsd')")


def gkd_divergence(beta: float) -> tuple[str, float | None]:
    """GKD's beta in [0, 1] (TRL ``generalized_jsd_loss``) as (divergence, beta): 0 -> forward KL,
    1 -> reverse KL, in between -> jsd."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"beta={beta}: the GKD coefficient must lie in [0, 1] (0 forward KL, 1 reverse KL)"
        )
    return ("forward", None) if beta == 0.0 else ("reverse", None) if beta == 1.0 else ("jsd", beta)


def check_temperature(temperature: float) -> None:
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature}: must be > 0 (1 means no temperature)")


def scaled_student_logprobs(student_logits: Tensor, temperature: float) -> Tensor:
    """log p_S = log_softmax(student_logits / tau), upcast to the compute dtype."""
    logits = student_logits.to(compute_dtype(student_logits))
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def scaled_teacher_logprobs(teacher_logprobs: Tensor, temperature: float,
                            dtype: torch.dtype) -> Tensor:
    """log p_T, detached (the teacher is a constant); renormalised at temperature tau if
    tau != 1."""
    teacher_logprobs = teacher_logprobs.detach().to(dtype)
    if temperature == 1.0:
        return teacher_logprobs
    return torch.log_softmax(teacher_logprobs / temperature, dim=-1)


def _check_full_vocab(student_logits: Tensor, teacher_logprobs: Tensor, fn: str) -> None:
    if student_logits.dim() != 3 or teacher_logprobs.shape != student_logits.shape:
        raise ValueError(
            f"{fn}: student_logits {tuple(student_logits.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must both be [B, T, V] with the same V; "
            "for a teacher that returns only its top k tokens use forward_kl_topk"
        )


# ---------------------------------------------------------------------------------------------
# Full-vocabulary forms (local teacher). Reference implementations: they hold the (N, V)
# response logits in float32. For a large vocabulary use fused_kd_loss.
# ---------------------------------------------------------------------------------------------


def generalized_jsd(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    beta: float = 0.5,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """GKD generalized JSD between p_T and p_S per response token; a scalar to minimise.

    beta = 0: forward KL(p_T || p_S), the divergence of eq. 1 (same as ``forward_kl``).
    beta = 1: reverse KL(p_S || p_T) (same as ``reverse_kl``).
    0 < beta < 1: beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = beta p_T + (1 - beta) p_S,
    computed in log space without forming M (module docstring).

    student_logits [B, T, V]; teacher_logprobs [B, T, V] log p_T (detached); mask [B, T].
    ``temperature`` divides both distributions' logits before the divergence.
    """
    check_reduction(reduction)
    divergence, mixture = gkd_divergence(beta)
    return _full_vocab_loss(student_logits, teacher_logprobs, mask, divergence, mixture,
                            temperature, reduction, "generalized_jsd")


def forward_kl(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Eq. 1: token-level KL(p_T || p_S^theta) on the student's own samples; a scalar to minimise.

        loss = (1/N) sum_{t in response} sum_z p_T(z) [log p_T(z) - log p_S^theta(z)]

    A true KL (0 when the two agree). Its gradient is eq. 2 with the minus sign that descent
    needs:  grad loss = -(1/N) sum_t sum_z p_T(z) grad log p_S^theta(z);  w.r.t. the student
    logits at a response token it is (p_S - p_T) / N, and 0 at every other position.

    student_logits [B, T, V] (position t scores the token at t: shift before calling);
    teacher_logprobs [B, T, V] normalised log p_T on the same positions (detached; -inf allowed);
    mask [B, T] bool, True on the sampled response tokens.
    """
    check_reduction(reduction)
    check_temperature(temperature)
    _check_full_vocab(student_logits, teacher_logprobs, "forward_kl")
    mask = check_mask(mask, student_logits.shape[:2], "student_logits")
    # (N, V) log p_S^theta(z | x, y_<t)
    student = scaled_student_logprobs(student_logits[mask], temperature)
    # (N, V) log p_T(z | x, y_<t)
    teacher = scaled_teacher_logprobs(teacher_logprobs[mask], temperature, student.dtype)
    kl_per_token = _forward_kl_rows(student, teacher)  # (N,) KL(p_T || p_S) at each t
    return reduce_loss(kl_per_token.sum(), kl_per_token.numel(), reduction)  # sum_t KL_t [/ N]


def reverse_kl(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Token-level reverse KL(p_S^theta || p_T) (GKD beta = 1); a scalar to minimise.

        loss = (1/N) sum_t sum_z p_S(z) [log p_S(z) - log p_T(z)]

    Mode-seeking, unlike the forward KL of eq. 1. Infinite where the teacher gives a token
    probability 0 (log-prob -inf) that the student does not; same arguments as ``forward_kl``.
    """
    check_reduction(reduction)
    return _full_vocab_loss(student_logits, teacher_logprobs, mask, "reverse", None, temperature,
                            reduction, "reverse_kl")


def _full_vocab_loss(student_logits: Tensor, teacher_logprobs: Tensor, mask: Tensor,
                     divergence: str, beta: float | None, temperature: float, reduction: str,
                     fn: str) -> Tensor:
    """The named divergence per response token, reduced: the body of the three forms above."""
    check_temperature(temperature)
    _check_full_vocab(student_logits, teacher_logprobs, fn)
    mask = check_mask(mask, student_logits.shape[:2], "student_logits")
    # (N, V) log p_S^theta(z | x, y_<t)
    student = scaled_student_logprobs(student_logits[mask], temperature)
    # (N, V) log p_T
    teacher = scaled_teacher_logprobs(teacher_logprobs[mask], temperature, student.dtype)
    per_token = divergence_rows(student, teacher, divergence, beta)  # (N,)
    return reduce_loss(per_token.sum(), per_token.numel(), reduction)
