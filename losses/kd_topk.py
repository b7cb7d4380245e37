"""Eq. 1 for an API teacher that reports only its top k tokens per position (GPT-4o's
``top_logprobs``, a vLLM server's ``prompt_logprobs``): the vocabulary is split into the k
reported tokens plus one tail bucket holding every other token, and the forward KL of
losses/kd.py is taken between the two bucket distributions (``forward_kl_topk``). The fused,
chunked form that training runs is ``losses.kd_fused.fused_kd_loss`` with a ``TeacherTopK``.

Inputs and conventions as in losses/kd.py and losses/__init__.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from losses import check_mask, check_reduction, compute_dtype, reduce_loss
from losses.kd import NEG_INF, _forward_kl_rows


def _distinct_topk(topk_ids: Tensor, topk_logprobs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the teacher's entries by id and mark the valid ones: (ids, log p_T(z_i), valid), each
    (N, k).

    An entry is valid when its log-prob is > -inf and its id did not occur before it (a repeated
    id keeps the entry with the largest log-prob). Invalid entries get log-prob -inf and are not
    buckets at all: a -inf padding entry does not take its id's student mass away from the tail,
    and a duplicated id is counted once.
    """
    # sort by log-prob (descending), then stably by id: among equal ids the largest log-prob is
    # first
    by_logprob = torch.argsort(topk_logprobs, dim=-1, descending=True, stable=True)
    ids, teacher_logprobs = topk_ids.gather(-1, by_logprob), topk_logprobs.gather(-1, by_logprob)
    by_id = torch.argsort(ids, dim=-1, stable=True)
    # (N, k) ascending ids
    ids, teacher_logprobs = ids.gather(-1, by_id), teacher_logprobs.gather(-1, by_id)
    repeated = torch.zeros_like(ids, dtype=torch.bool)
    repeated[:, 1:] = ids[:, 1:] == ids[:, :-1]
    # (N, k) the teacher's distinct reported tokens
    valid = (teacher_logprobs > NEG_INF) & ~repeated
    return ids, torch.where(valid, teacher_logprobs, NEG_INF), valid


def _renormalised(logprobs: Tensor, valid: Tensor) -> Tensor:
    """log [p(z_i) / sum_j p(z_j)] over the valid entries, -inf elsewhere; (N, k) -> (N, k).

    A row with no valid entry at all (its KL is 0) is filled with finite zeros before the
    softmax so that its values and gradients stay finite.
    """
    # (N, 1)
    filler = torch.zeros_like(logprobs[:, :1]).masked_fill(valid.any(-1, keepdim=True), NEG_INF)
    return torch.where(
        valid, torch.log_softmax(torch.where(valid, logprobs, filler), dim=-1), NEG_INF
    )


def _teacher_tail(teacher_logprobs: Tensor, tail_nonempty: Tensor) -> Tensor:
    """log p_T^tail = log(1 - sum_i p_T(z_i)), -inf when the top-k mass reaches 1 or the tail is
    empty."""
    teacher_topk_mass = teacher_logprobs.exp().sum(-1)  # (N,) sum_i p_T(z_i)
    # (N,)
    return torch.where(tail_nonempty, torch.log1p(-teacher_topk_mass.clamp(max=1.0)), NEG_INF)


def _topk_membership(ids: Tensor, valid: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """(in_topk (N, V) bool: z is one of the valid top-k ids, tail_nonempty (N,): some token is
    not)."""
    # valid ids are distinct: False only if they cover the vocabulary
    tail_nonempty = valid.sum(-1) < vocab_size
    in_topk = torch.zeros((ids.shape[0], vocab_size), dtype=torch.uint8, device=ids.device)
    # (N, V), 1 where z is a top-k bucket
    in_topk.scatter_reduce_(-1, ids, valid.to(torch.uint8), reduce="amax")
    return in_topk.view(torch.bool), tail_nonempty


def _topk_bucket_logprobs(
    student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail: bool
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities of the buckets: (N, k + 1) each with the tail bucket
    in the last column (tail=True), or (N, k) renormalised over the valid top-k (tail=False).

    student_logits (N, V) in the compute dtype; topk_ids (N, k) int64; topk_logprobs (N, k).
    Differentiable w.r.t. student_logits (this is the plain form's path; the fused form has a
    closed-form gradient of the same function: losses/kd_chunk.py
    ``topk_forward_kl_value_and_grad``).
    """
    ids, teacher_logprobs, valid = _distinct_topk(
        topk_ids, topk_logprobs.detach().to(student_logits.dtype)
    )
    student_topk_logits = student_logits.gather(-1, ids)  # (N, k) student logits of z_i
    if not tail:
        return _renormalised(student_topk_logits, valid), _renormalised(teacher_logprobs, valid)

    # (N, 1) log sum_z exp(logit_z)
    log_normaliser = torch.logsumexp(student_logits, dim=-1, keepdim=True)
    # (N, k) log p_S(z_i)
    student_topk = torch.where(valid, student_topk_logits - log_normaliser, NEG_INF)
    in_topk, tail_nonempty = _topk_membership(ids, valid, student_logits.shape[-1])
    # The student's tail mass is summed over the tail tokens themselves: no 1 - sum cancellation.
    # Rows whose tail is empty mask nothing (a finite logsumexp, no NaN gradient) and get -inf.
    in_topk = in_topk & tail_nonempty[:, None]
    # (N, V) logits of the tail tokens only
    tail_logits = student_logits.masked_fill(in_topk, NEG_INF)
    student_tail = torch.where(
        tail_nonempty, torch.logsumexp(tail_logits, dim=-1) - log_normaliser[:, 0], NEG_INF
    )  # (N,) log p_S^tail = log sum_{z in tail} p_S(z)
    teacher_tail = _teacher_tail(teacher_logprobs, tail_nonempty)  # (N,) log p_T^tail
    student = torch.cat([student_topk, student_tail[:, None]], dim=-1)  # (N, k + 1)
    teacher = torch.cat([teacher_logprobs, teacher_tail[:, None]], dim=-1)  # (N, k + 1)
    return student, teacher


def _check_topk(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, fn: str) -> None:
    if (
        topk_ids.dim() != 3
        or topk_ids.shape != topk_logprobs.shape
        or topk_ids.shape[:2] != student_logits.shape[:2]
    ):
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
            f"vocabulary); got [{smallest}, {largest}]. Map the teacher's token ids to the "
            "student's, and give padding entries a valid id with log-prob -inf"
        )
    if torch.isnan(topk_logprobs).any():
        raise ValueError(
            f"{fn}: teacher_topk_logprobs hold NaN on response tokens; pad with -inf instead"
        )


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

        loss = (1/N) sum_t [ sum_i p_T(z_i) log(p_T(z_i) / p_S(z_i))
                             + p_T^tail log(p_T^tail / p_S^tail) ]

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
    # (N, k) z_i, log p_T(z_i)
    topk_ids, topk_logprobs = teacher_topk_ids[mask].long(), teacher_topk_logprobs[mask]
    _check_topk_rows(topk_ids, topk_logprobs, student_logits.shape[-1], "forward_kl_topk")
    response_logits = student_logits[mask].to(compute_dtype(student_logits))  # (N, V)
    # (N, k + 1) log-probabilities of the buckets z_1..z_k, tail on each side
    student_buckets, teacher_buckets = _topk_bucket_logprobs(
        response_logits, topk_ids, topk_logprobs, tail
    )
    # (N,) KL over the buckets at each t
    kl_per_token = _forward_kl_rows(student_buckets, teacher_buckets)
    return reduce_loss(kl_per_token.sum(), kl_per_token.numel(), reduction)
