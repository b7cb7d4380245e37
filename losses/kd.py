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

    JSD_beta(p_T, p_S) = beta KL(p_T || M) + (1 - beta) KL(p_S || M),   M = beta p_T + (1 - beta) p_S

beta = 0 is *defined* as forward KL(p_T || p_S) and beta = 1 as reverse KL(p_S || p_T): the
mixture form itself vanishes at both ends (M becomes p_S, resp. p_T); JSD_beta / beta tends to the
forward KL as beta -> 0 and JSD_beta / (1 - beta) to the reverse KL as beta -> 1.

Temperature ``tau`` (default 1) applies to *both* distributions before the divergence, as the
``temperature`` argument of TRL's ``generalized_jsd_loss`` does: p_S = softmax(student_logits / tau),
p_T = softmax(log p_T / tau) (dividing log-probabilities by tau and renormalising equals dividing
the teacher's logits by tau). No tau^2 factor is applied. With tau = 1 the teacher log-probabilities
are used exactly as given, so they should be normalised (log_softmax output). This loss temperature
is not the rollout's sampling temperature: TRL's GKDTrainer samples at its configured temperature
but calls the loss with the default 1.0, and the paper uses no loss temperature either.

Teachers. A local teacher gives log-probabilities over the full vocabulary: ``forward_kl``,
``reverse_kl``, ``generalized_jsd`` take them as a [B, T, V] tensor. An API teacher (GPT-4o, a vLLM
server) gives only its top k tokens per position: ``forward_kl_topk``. ``fused_kd_loss`` takes the
student's hidden states and LM-head weight instead of logits and accepts any of the three teacher
forms ``TeacherLogprobs``, ``TeacherHead`` and ``TeacherTopK`` (see its docstring).

Inputs: student_logits [B, T, V] in any float dtype (computed in float32; float64 stays float64),
finite. mask [B, T] bool: True on response tokens. Reduction and alignment: losses/__init__.py.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from losses import check_mask, check_reduction, compute_dtype, reduce_loss

NEG_INF = float("-inf")


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
    kl_teacher_mixture = (teacher_probs * torch.where(teacher_probs > 0, -log_m_over_teacher, 0.0)).sum(-1)  # (N,)
    kl_student_mixture = (student_probs * torch.where(student_probs > 0, -log_m_over_student, 0.0)).sum(-1)  # (N,)
    return beta * kl_teacher_mixture + (1.0 - beta) * kl_student_mixture  # (N,) JSD_beta


def _divergence_rows(student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float) -> Tensor:
    """The GKD divergence per row, with the endpoints beta = 0 and 1 defined as the two KLs."""
    if beta == 0.0:
        return _forward_kl_rows(student_logprobs, teacher_logprobs)
    if beta == 1.0:
        return _reverse_kl_rows(student_logprobs, teacher_logprobs)
    return _mixture_jsd_rows(student_logprobs, teacher_logprobs, beta)


def _check_beta_temperature(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta}: the GKD coefficient must lie in [0, 1] (0 forward KL, 1 reverse KL)")
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature}: must be > 0 (1 means no temperature)")


def _student_logprobs(student_logits: Tensor, temperature: float) -> Tensor:
    """log p_S = log_softmax(student_logits / tau), upcast to the compute dtype."""
    logits = student_logits.to(compute_dtype(student_logits))
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _teacher_logprobs(teacher_logprobs: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """log p_T, detached (the teacher is a constant); renormalised at temperature tau if tau != 1."""
    teacher_logprobs = teacher_logprobs.detach().to(dtype)
    if temperature == 1.0:
        return teacher_logprobs
    return torch.log_softmax(teacher_logprobs / temperature, dim=-1)


def _check_full_vocab(student_logits: Tensor, teacher_logprobs: Tensor, fn: str) -> None:
    if student_logits.dim() != 3 or teacher_logprobs.shape != student_logits.shape:
        raise ValueError(
            f"{fn}: student_logits {tuple(student_logits.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must both be [B, T, V] with the same V; for a teacher "
            "that returns only its top k tokens use forward_kl_topk"
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
    _check_beta_temperature(beta, temperature)
    _check_full_vocab(student_logits, teacher_logprobs, "generalized_jsd")
    mask = check_mask(mask, student_logits.shape[:2], "student_logits")
    student_logprobs = _student_logprobs(student_logits[mask], temperature)  # (N, V) log p_S^theta(z | x, y_<t)
    teacher_logprobs = _teacher_logprobs(teacher_logprobs[mask], temperature, student_logprobs.dtype)  # (N, V) log p_T
    divergence_per_token = _divergence_rows(student_logprobs, teacher_logprobs, beta)  # (N,)
    return reduce_loss(divergence_per_token.sum(), divergence_per_token.numel(), reduction)


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
    _check_beta_temperature(0.0, temperature)
    _check_full_vocab(student_logits, teacher_logprobs, "forward_kl")
    mask = check_mask(mask, student_logits.shape[:2], "student_logits")
    student_logprobs = _student_logprobs(student_logits[mask], temperature)  # (N, V) log p_S^theta(z | x, y_<t)
    teacher_logprobs = _teacher_logprobs(teacher_logprobs[mask], temperature, student_logprobs.dtype)  # (N, V) log p_T
    kl_per_token = _forward_kl_rows(student_logprobs, teacher_logprobs)  # (N,) KL(p_T || p_S) at each t
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
    _check_beta_temperature(1.0, temperature)
    _check_full_vocab(student_logits, teacher_logprobs, "reverse_kl")
    mask = check_mask(mask, student_logits.shape[:2], "student_logits")
    student_logprobs = _student_logprobs(student_logits[mask], temperature)  # (N, V) log p_S^theta(z)
    teacher_logprobs = _teacher_logprobs(teacher_logprobs[mask], temperature, student_logprobs.dtype)  # (N, V) log p_T
    kl_per_token = _reverse_kl_rows(student_logprobs, teacher_logprobs)  # (N,) KL(p_S || p_T) at each t
    return reduce_loss(kl_per_token.sum(), kl_per_token.numel(), reduction)


# ---------------------------------------------------------------------------------------------
# Top-k teacher (API): k tokens per position plus one tail bucket.
# ---------------------------------------------------------------------------------------------


def _distinct_topk(topk_ids: Tensor, topk_logprobs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the teacher's entries by id and mark the valid ones: (ids, log p_T(z_i), valid), each (N, k).

    An entry is valid when its log-prob is > -inf and its id did not occur before it (a repeated
    id keeps the entry with the largest log-prob). Invalid entries get log-prob -inf and are not
    buckets at all: a -inf padding entry does not take its id's student mass away from the tail,
    and a duplicated id is counted once.
    """
    # sort by log-prob (descending), then stably by id: among equal ids the largest log-prob is first
    by_logprob = torch.argsort(topk_logprobs, dim=-1, descending=True, stable=True)
    ids, teacher_logprobs = topk_ids.gather(-1, by_logprob), topk_logprobs.gather(-1, by_logprob)
    by_id = torch.argsort(ids, dim=-1, stable=True)
    ids, teacher_logprobs = ids.gather(-1, by_id), teacher_logprobs.gather(-1, by_id)  # (N, k) ascending ids
    repeated = torch.zeros_like(ids, dtype=torch.bool)
    repeated[:, 1:] = ids[:, 1:] == ids[:, :-1]
    valid = (teacher_logprobs > NEG_INF) & ~repeated  # (N, k) the teacher's distinct reported tokens
    return ids, torch.where(valid, teacher_logprobs, NEG_INF), valid


def _renormalised(logprobs: Tensor, valid: Tensor) -> Tensor:
    """log [p(z_i) / sum_j p(z_j)] over the valid entries, -inf elsewhere; (N, k) -> (N, k).

    A row with no valid entry at all (its KL is 0) is filled with finite zeros before the
    softmax so that its values and gradients stay finite.
    """
    filler = torch.zeros_like(logprobs[:, :1]).masked_fill(valid.any(-1, keepdim=True), NEG_INF)  # (N, 1)
    return torch.where(valid, torch.log_softmax(torch.where(valid, logprobs, filler), dim=-1), NEG_INF)


def _teacher_tail(teacher_logprobs: Tensor, tail_nonempty: Tensor) -> Tensor:
    """log p_T^tail = log(1 - sum_i p_T(z_i)), -inf when the top-k mass reaches 1 or the tail is empty."""
    teacher_topk_mass = teacher_logprobs.exp().sum(-1)  # (N,) sum_i p_T(z_i)
    return torch.where(tail_nonempty, torch.log1p(-teacher_topk_mass.clamp(max=1.0)), NEG_INF)  # (N,)


def _topk_membership(ids: Tensor, valid: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """(in_topk (N, V) bool: z is one of the valid top-k ids, tail_nonempty (N,): some token is not)."""
    tail_nonempty = valid.sum(-1) < vocab_size  # valid ids are distinct: False only if they cover the vocabulary
    in_topk = torch.zeros((ids.shape[0], vocab_size), dtype=torch.uint8, device=ids.device)
    in_topk.scatter_reduce_(-1, ids, valid.to(torch.uint8), reduce="amax")  # (N, V), 1 where z is a top-k bucket
    return in_topk.view(torch.bool), tail_nonempty


def _topk_bucket_logprobs(
    student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail: bool
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities of the buckets: (N, k + 1) each with the tail bucket
    in the last column (tail=True), or (N, k) renormalised over the valid top-k (tail=False).

    student_logits (N, V) in the compute dtype; topk_ids (N, k) int64; topk_logprobs (N, k).
    Differentiable w.r.t. student_logits (this is the plain form's path; the fused form has a
    closed-form gradient of the same function, ``_topk_forward_kl_value_and_grad``).
    """
    ids, teacher_logprobs, valid = _distinct_topk(topk_ids, topk_logprobs.detach().to(student_logits.dtype))
    student_topk_logits = student_logits.gather(-1, ids)  # (N, k) student logits of z_i
    if not tail:
        return _renormalised(student_topk_logits, valid), _renormalised(teacher_logprobs, valid)

    log_normaliser = torch.logsumexp(student_logits, dim=-1, keepdim=True)  # (N, 1) log sum_z exp(logit_z)
    student_topk = torch.where(valid, student_topk_logits - log_normaliser, NEG_INF)  # (N, k) log p_S(z_i)
    in_topk, tail_nonempty = _topk_membership(ids, valid, student_logits.shape[-1])
    # The student's tail mass is summed over the tail tokens themselves: no 1 - sum cancellation.
    # Rows whose tail is empty mask nothing (a finite logsumexp, no NaN gradient) and get -inf.
    in_topk = in_topk & tail_nonempty[:, None]
    tail_logits = student_logits.masked_fill(in_topk, NEG_INF)  # (N, V) logits of the tail tokens only
    student_tail = torch.where(
        tail_nonempty, torch.logsumexp(tail_logits, dim=-1) - log_normaliser[:, 0], NEG_INF
    )  # (N,) log p_S^tail = log sum_{z in tail} p_S(z)
    teacher_tail = _teacher_tail(teacher_logprobs, tail_nonempty)  # (N,) log p_T^tail
    student = torch.cat([student_topk, student_tail[:, None]], dim=-1)  # (N, k + 1)
    teacher = torch.cat([teacher_logprobs, teacher_tail[:, None]], dim=-1)  # (N, k + 1)
    return student, teacher


def _check_topk(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, fn: str) -> None:
    if topk_ids.dim() != 3 or topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"{fn}: teacher_topk_ids {tuple(topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(topk_logprobs.shape)} must both be [B, T, k] with B, T of the student "
            f"{tuple(student_logits.shape[:2])}"
        )
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: teacher_topk_ids must be int64 token ids, got {topk_ids.dtype}")


def _check_topk_rows(topk_ids: Tensor, topk_logprobs: Tensor, vocab_size: int, fn: str) -> None:
    smallest, largest = (int(topk_ids.min()), int(topk_ids.max())) if topk_ids.numel() else (0, 0)
    if smallest < 0 or largest >= vocab_size:
        raise ValueError(
            f"{fn}: teacher_topk_ids on response tokens must lie in [0, {vocab_size}) (the student "
            f"vocabulary); got [{smallest}, {largest}]. Map the teacher's token ids to the student's, "
            "and give padding entries a valid id with log-prob -inf"
        )
    if torch.isnan(topk_logprobs).any():
        raise ValueError(f"{fn}: teacher_topk_logprobs hold NaN on response tokens; pad with -inf instead")


def forward_kl_topk(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    tail: bool = True,
    *,
    reduction: str = "mean",
) -> Tensor:
    """Eq. 1 for a teacher that reports only its top k tokens per position (an API teacher).

    With ``tail=True`` the vocabulary is split into k + 1 buckets: the teacher's k tokens z_i and
    one tail bucket holding every other token, with mass 1 - sum_i p(z_i) on each side:

        loss = (1/N) sum_t [ sum_i p_T(z_i) log(p_T(z_i) / p_S(z_i)) + p_T^tail log(p_T^tail / p_S^tail) ]

    Without the tail, a student could match the k teacher probabilities while putting its
    remaining mass anywhere. ``tail=False`` renormalises both sides over the k tokens instead.
    This is a true KL between the bucket distributions: 0 when the student agrees with the
    teacher; with k = V it equals ``forward_kl``. Minimise it (eq. 2 up to the descent sign).

    student_logits [B, T, V]; teacher_topk_ids [B, T, k] int64 in the student's vocabulary;
    teacher_topk_logprobs [B, T, k] raw log p_T(z_i) (detached). Entries with log-prob -inf
    (padding when the teacher returned fewer than k) and repeated ids are dropped, never counted
    twice, never NaN. No temperature: scaling the k reported log-probabilities would need the
    teacher's normaliser over the full vocabulary, which an API does not return.
    """
    check_reduction(reduction)
    _check_topk(student_logits, teacher_topk_ids, teacher_topk_logprobs, "forward_kl_topk")
    mask = check_mask(mask, student_logits.shape[:2], "student_logits")
    topk_ids, topk_logprobs = teacher_topk_ids[mask].long(), teacher_topk_logprobs[mask]  # (N, k) z_i, log p_T(z_i)
    _check_topk_rows(topk_ids, topk_logprobs, student_logits.shape[-1], "forward_kl_topk")
    response_logits = student_logits[mask].to(compute_dtype(student_logits))  # (N, V)
    # (N, k + 1) log-probabilities of the buckets z_1..z_k, tail on each side
    student_buckets, teacher_buckets = _topk_bucket_logprobs(response_logits, topk_ids, topk_logprobs, tail)
    kl_per_token = _forward_kl_rows(student_buckets, teacher_buckets)  # (N,) KL over the buckets at each t
    return reduce_loss(kl_per_token.sum(), kl_per_token.numel(), reduction)



# ---------------------------------------------------------------------------------------------
# Fused form: hidden states + LM-head weight in, loss out, chunked over tokens.
# ---------------------------------------------------------------------------------------------


class TeacherLogprobs(NamedTuple):
    """A local teacher's log p_T over the full vocabulary, already computed: [B, T, V]."""

    logprobs: Tensor


class TeacherHead(NamedTuple):
    """A local teacher given by its final hidden states [B, T, H_T] and LM-head weight [V, H_T].

    The teacher's logits are computed chunk by chunk next to the student's, so neither model's
    [tokens, V] tensor ever exists in full.
    """

    hidden: Tensor
    lm_head_weight: Tensor


class TeacherTopK(NamedTuple):
    """An API teacher's top k tokens per position: ids [B, T, k], log-probs [B, T, k]."""

    ids: Tensor
    logprobs: Tensor
    tail: bool = True


Teacher = TeacherLogprobs | TeacherHead | TeacherTopK

# One chunk: (logits (C, V), first row, end row, need_grad) -> (sum of the chunk's per-token
# losses, d sum / d logits (C, V) or None). It may overwrite ``logits``, which it owns.
ChunkValueAndGrad = Callable[[Tensor, int, int, bool], tuple[Tensor, Tensor | None]]


def _forward_kl_value_and_grad(
    logits: Tensor, teacher_logprobs: Tensor, temperature: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Eq. 1 on one chunk and its gradient in closed form (eq. 2 on the logits), in place.

    Same function as ``_forward_kl_rows(log_softmax(logits / tau), teacher_logprobs)`` summed:
        value        = sum_t sum_z p_T(z) [log p_T(z) - log p_S(z)]
        d / d logits = (p_S sum_z p_T(z) - p_T) / tau     (= (p_S - p_T) / tau for a normalised p_T)
    which is what autograd of the plain form gives, without its graph. Both arguments are
    overwritten: (C, V) logits (owned) and teacher log-probs (owned, detached).
    """
    student_logprobs = logits.div_(temperature) if temperature != 1.0 else logits
    student_logprobs -= torch.logsumexp(student_logprobs, dim=-1, keepdim=True)  # (C, V) log p_S, in place
    teacher_probs = teacher_logprobs.exp()  # (C, V) p_T(z)
    # (C, V) log p_T(z) - log p_S(z) where p_T(z) > 0, else 0 (overwrites the teacher log-probs)
    log_ratio = teacher_logprobs.sub_(student_logprobs).masked_fill_(teacher_probs == 0, 0.0)
    value = torch.linalg.vecdot(teacher_probs, log_ratio).sum()  # sum_t KL(p_T || p_S)
    del log_ratio
    if not need_grad:
        return value, None
    teacher_mass = teacher_probs.sum(-1, keepdim=True)  # (C, 1) sum_z p_T(z)
    grad = student_logprobs.exp_().mul_(teacher_mass).sub_(teacher_probs)  # (C, V) p_S sum p_T - p_T
    return value, grad.div_(temperature) if temperature != 1.0 else grad


def _topk_forward_kl_value_and_grad(
    logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail: bool, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Top-k + tail forward KL on one chunk and its gradient in closed form, in place on ``logits``.

    Same function as ``_forward_kl_rows(*_topk_bucket_logprobs(logits, ...))`` summed. With
    teacher bucket probabilities q_b (Q = sum_b q_b) and the student's s_b, the gradient
    w.r.t. the logit of token z is
        top-k token z_i:  s_i Q - q_i
        tail token z:     p_S(z) Q - q_tail p_S(z) / s_tail = softmax_tail(z) (Q s_tail - q_tail)
        (tail=False: s_i Q - q_i on the top-k tokens with s renormalised over them, 0 elsewhere)
    where softmax_tail is the softmax over the tail tokens alone. Everything is in log space
    relative to the tail's own maximum, so neither the tail mass nor the gradient under- or
    overflows, and the (C, V) work is six in-place passes over ``logits``.
    """
    vocab_size = logits.shape[-1]
    ids, teacher_logprobs, valid = _distinct_topk(topk_ids, topk_logprobs.to(logits.dtype))
    student_topk_logits = logits.gather(-1, ids)  # (C, k) logits of z_i
    if not tail:
        student, teacher = _renormalised(student_topk_logits, valid), _renormalised(teacher_logprobs, valid)
        value = _forward_kl_rows(student, teacher).sum()
        if not need_grad:
            return value, None
        teacher_buckets = teacher.exp()  # (C, k) q_i
        topk_grad = student.exp() * teacher_buckets.sum(-1, keepdim=True) - teacher_buckets  # (C, k) s_i Q - q_i
        return value, logits.zero_().scatter_add_(-1, ids, torch.where(valid, topk_grad, 0.0))

    in_topk, tail_nonempty = _topk_membership(ids, valid, vocab_size)
    tail_logits = logits.masked_fill_(in_topk, NEG_INF)  # (C, V) in place: logits of the tail tokens only
    tail_max = tail_logits.amax(-1, keepdim=True)  # (C, 1)
    tail_max = torch.where(tail_nonempty[:, None], tail_max, 0.0)  # an empty tail (all -inf) keeps 0
    tail_exp = tail_logits.sub_(tail_max).exp_()  # (C, V) exp(logit_z - tail max) on the tail, 0 on the top-k
    tail_sum = tail_exp.sum(-1, keepdim=True)  # (C, 1) >= 1 unless the tail is empty
    log_tail = tail_max + tail_sum.log()  # (C, 1) log sum_{z in tail} exp(logit_z), -inf if empty
    topk_logits = torch.where(valid, student_topk_logits, NEG_INF)  # (C, k)
    log_normaliser = torch.logaddexp(log_tail, torch.logsumexp(topk_logits, dim=-1, keepdim=True))  # (C, 1) log Z
    student_topk = topk_logits - log_normaliser  # (C, k) log p_S(z_i), -inf where not a bucket
    student_tail = torch.where(tail_nonempty[:, None], log_tail - log_normaliser, NEG_INF)  # (C, 1) log s_tail
    teacher_tail = _teacher_tail(teacher_logprobs, tail_nonempty)[:, None]  # (C, 1) log q_tail
    student = torch.cat([student_topk, student_tail], dim=-1)  # (C, k + 1)
    teacher = torch.cat([teacher_logprobs, teacher_tail], dim=-1)  # (C, k + 1)
    value = _forward_kl_rows(student, teacher).sum()
    if not need_grad:
        return value, None
    teacher_mass = teacher.exp().sum(-1, keepdim=True)  # (C, 1) Q
    tail_coefficient = teacher_mass * student_tail.exp() - teacher_tail.exp()  # (C, 1) Q s_tail - q_tail
    tail_coefficient = torch.where(tail_nonempty[:, None], tail_coefficient / tail_sum, 0.0)
    grad = tail_exp.mul_(tail_coefficient)  # (C, V) softmax_tail(z) (Q s_tail - q_tail), 0 on the top-k ids
    topk_grad = student_topk.exp() * teacher_mass - teacher_logprobs.exp()  # (C, k) s_i Q - q_i
    return value, grad.scatter_add_(-1, ids, torch.where(valid, topk_grad, 0.0))


def _autograd_value_and_grad(per_token_loss: Callable[[Tensor, int, int], Tensor]) -> ChunkValueAndGrad:
    """Chunk value and gradient by autograd of the plain form's per-token loss (JSD, reverse KL)."""

    def value_and_grad(logits: Tensor, start: int, end: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        if not need_grad:
            return per_token_loss(logits, start, end).sum(), None
        with torch.enable_grad():
            logits = logits.detach().requires_grad_()
            chunk_loss_sum = per_token_loss(logits, start, end).sum()
        (grad,) = torch.autograd.grad(chunk_loss_sum, logits)
        return chunk_loss_sum.detach(), grad

    return value_and_grad


class _ChunkedLinearLoss(torch.autograd.Function):
    """sum over tokens of a loss of ``hidden @ weight.T``, one chunk of rows at a time.

    The gradient is computed in the forward pass: each chunk's d loss / d logits (C, V) is
    turned into d loss / d hidden (C, H) and accumulated into d loss / d weight (V, H) at once,
    so only one chunk's (C, V) tensors are alive at a time; backward only scales the stored
    gradients by the incoming scalar.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, value_and_grad: ChunkValueAndGrad, chunk_size: int):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_hidden_grad or need_weight_grad
        loss_sum = torch.zeros((), dtype=compute_dtype(hidden), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None  # (N, H)
        grad_weight = (
            torch.zeros(weight.shape, dtype=compute_dtype(weight), device=weight.device) if need_weight_grad else None
        )  # (V, H), accumulated over chunks in float32
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:end]  # (C, H)
            logits = (hidden_chunk @ weight.T).to(compute_dtype(hidden))  # (C, V) student logits, float32
            chunk_loss_sum, grad_logits = value_and_grad(logits, start, end, need_grad)
            loss_sum += chunk_loss_sum
            del logits
            if need_hidden_grad:
                grad_hidden[start:end] = grad_logits.to(weight.dtype) @ weight  # (C, H)
            if need_weight_grad:
                grad_weight.addmm_(grad_logits.T.to(grad_weight.dtype), hidden_chunk.to(grad_weight.dtype))  # (V, H)
            del grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def fused_kd_loss(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher: Teacher,
    mask: Tensor,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int = 256,
    reduction: str = "mean",
) -> Tensor:
    """Distillation loss from the student's hidden states, never holding all [N, V] logits.

    Equals, in value and gradient (w.r.t. ``student_hidden`` and ``lm_head_weight``)::

        logits = student_hidden @ lm_head_weight.T                                  # (B, T, V)
        generalized_jsd(logits, teacher_logprobs, mask, beta, temperature=...)    # full vocab
        forward_kl_topk(logits, ids, logprobs, mask, tail)                          # TeacherTopK

    so with the default beta = 0 it is eq. 1 (forward KL), a scalar to minimise whose gradient
    is eq. 2 with the descent sign. Response tokens are processed ``chunk_size`` at a time: the
    chunk's (chunk, V) logits are formed in float32, the per-token loss and its gradient w.r.t.
    those logits are computed (in closed form for the forward KL, eq. 2 on the logits; by
    autograd of the plain form's per-token function for 0 < beta <= 1), and the gradient is
    folded into those of the hidden states and the weight at once, in the forward pass
    (backward only scales them). Peak extra memory: a few (chunk, V) float32 tensors, plus one
    (V, H) float32 accumulator only if ``lm_head_weight`` requires grad. If neither input
    requires grad, no gradient work is done. Double backward is not supported.

    student_hidden [B, T, H]: final decoder hidden states (after the last norm) at the positions
    whose logits score the response tokens. lm_head_weight [V, H] (no bias). mask [B, T].
    teacher, one of:
      * ``TeacherLogprobs(logprobs [B, T, V])``: sliced chunk by chunk alongside the student.
      * ``TeacherHead(hidden [B, T, H_T], lm_head_weight [V, H_T])``: a local teacher's logits are
        formed chunk by chunk too (no grad), so its [N, V] never exists either.
      * ``TeacherTopK(ids [B, T, k], logprobs [B, T, k], tail=True)``: forward KL over the top-k
        buckets (``forward_kl_topk``); needs beta = 0 and temperature = 1.
    ``beta`` and ``temperature``: as in ``generalized_jsd`` (full-vocabulary teachers).
    """
    check_reduction(reduction)
    _check_beta_temperature(beta, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (tokens per chunk)")
    if student_hidden.dim() != 3 or lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"fused_kd_loss: student_hidden {tuple(student_hidden.shape)} must be [B, T, H] and "
            f"lm_head_weight {tuple(lm_head_weight.shape)} must be [V, H] with the same H"
        )
    mask = check_mask(mask, student_hidden.shape[:2], "student_hidden")
    vocab_size = lm_head_weight.shape[0]
    rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices of the response tokens
    hidden_rows = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)  # (N, H)
    dtype = compute_dtype(student_hidden)

    if isinstance(teacher, TeacherTopK):
        if beta != 0.0 or temperature != 1.0:
            raise ValueError(
                "fused_kd_loss: a TeacherTopK supports the forward KL only (beta=0, temperature=1); "
                "see forward_kl_topk"
            )
        _check_topk(student_hidden, teacher.ids, teacher.logprobs, "fused_kd_loss")
        topk_ids = teacher.ids.reshape(-1, teacher.ids.shape[-1]).index_select(0, rows).long()  # (N, k) z_i
        topk_logprobs = teacher.logprobs.reshape(-1, teacher.logprobs.shape[-1]).index_select(0, rows)  # (N, k)
        _check_topk_rows(topk_ids, topk_logprobs, vocab_size, "fused_kd_loss")
        topk_logprobs = topk_logprobs.detach()

        def value_and_grad(logits: Tensor, start: int, end: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
            return _topk_forward_kl_value_and_grad(
                logits, topk_ids[start:end], topk_logprobs[start:end], teacher.tail, need_grad
            )

    elif isinstance(teacher, (TeacherLogprobs, TeacherHead)):
        if isinstance(teacher, TeacherLogprobs):
            if teacher.logprobs.shape != (*student_hidden.shape[:2], vocab_size):
                raise ValueError(
                    f"fused_kd_loss: TeacherLogprobs.logprobs {tuple(teacher.logprobs.shape)} must be "
                    f"[B, T, V] = {(*student_hidden.shape[:2], vocab_size)}"
                )
            teacher_flat = teacher.logprobs.detach().reshape(-1, vocab_size)  # (B*T, V), a view

            def teacher_chunk(start: int, end: int) -> Tensor:
                return teacher_flat.index_select(0, rows[start:end]).to(dtype)  # (C, V) log p_T, a copy
        else:
            teacher_hidden, teacher_weight = teacher.hidden.detach(), teacher.lm_head_weight.detach()
            if teacher_hidden.shape[:2] != student_hidden.shape[:2] or teacher_weight.shape != (
                vocab_size,
                teacher_hidden.shape[-1],
            ):
                raise ValueError(
                    f"fused_kd_loss: TeacherHead hidden {tuple(teacher_hidden.shape)} must be [B, T, H_T] "
                    f"with the student's B, T and lm_head_weight {tuple(teacher_weight.shape)} [V, H_T] "
                    f"with V = {vocab_size}"
                )
            teacher_hidden_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # (B*T, H_T)

            def teacher_chunk(start: int, end: int) -> Tensor:
                teacher_logits = teacher_hidden_flat.index_select(0, rows[start:end]) @ teacher_weight.T  # (C, V)
                return torch.log_softmax(teacher_logits.to(dtype), dim=-1)  # (C, V) log p_T

        def chunk_teacher_logprobs(start: int, end: int) -> Tensor:
            with torch.no_grad():
                return _teacher_logprobs(teacher_chunk(start, end), temperature, dtype)  # (C, V) log p_T

        if beta == 0.0:  # eq. 1, closed-form gradient

            def value_and_grad(logits: Tensor, start: int, end: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
                return _forward_kl_value_and_grad(logits, chunk_teacher_logprobs(start, end), temperature, need_grad)

        else:

            def per_token_loss(logits: Tensor, start: int, end: int) -> Tensor:
                student_logprobs = _student_logprobs(logits, temperature)  # (C, V) log p_S^theta
                return _divergence_rows(student_logprobs, chunk_teacher_logprobs(start, end), beta)  # (C,)

            value_and_grad = _autograd_value_and_grad(per_token_loss)

    else:
        raise TypeError(
            f"fused_kd_loss: teacher must be TeacherLogprobs, TeacherHead or TeacherTopK, got {type(teacher).__name__}"
        )

    loss_sum = _ChunkedLinearLoss.apply(hidden_rows, lm_head_weight, value_and_grad, chunk_size)
    return reduce_loss(loss_sum, rows.numel(), reduction)
