"""One chunk of the fused KD loss: the divergence of a (C, V) block of student logits from the
teacher's distribution and its gradient w.r.t. those logits, computed at once (losses/kd_fused.py
folds the gradient into the hidden states' and the weight's).

The forward KL (eq. 1, the default) and its top-k + tail form have closed-form gradients (eq. 2 on
the logits: (p_S - p_T) / tau); the reverse KL and the generalized JSD take autograd of their
per-token form. Row-wise work runs a few rows at a time, so its temporaries are never (C, V).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from losses.kd import NEG_INF, _forward_kl_rows
from losses.kd_topk import _distinct_topk, _renormalised, _teacher_tail, _topk_membership

# One chunk: (logits (C, V), first row, end row, need_grad) -> (sum of the chunk's per-token
# losses, d sum / d logits (C, V) or None). It may overwrite ``logits``, which it owns.
ChunkValueAndGrad = Callable[[Tensor, int, int, bool], tuple[Tensor, Tensor | None]]


# Row-wise (C, V) work runs this many elements at a time, so that its temporaries (logsumexp's
# shifted copy, p_T, the log-ratio) are a few rows, not (C, V): 2**21 elements, 10 rows at
# V = 200064.
ROW_BLOCK_ELEMENTS = 2**21


def row_step(vocab_size: int) -> int:
    """Rows per block of a (C, V) tensor: ``ROW_BLOCK_ELEMENTS`` elements, at least one row."""
    return max(1, ROW_BLOCK_ELEMENTS // max(vocab_size, 1))


def log_softmax_(logits: Tensor) -> Tensor:
    """``log_softmax(logits, -1)`` in place on (C, V) ``logits``, a block of rows at a time."""
    step = row_step(logits.shape[-1])
    for start in range(0, logits.shape[0], step):
        block = logits[start : start + step]  # (R, V), a view
        block -= torch.logsumexp(block, dim=-1, keepdim=True)
    return logits


def forward_kl_value_and_grad(
    logits: Tensor, teacher_logprobs: Tensor, temperature: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Eq. 1 on one chunk and its gradient in closed form (eq. 2 on the logits), in place.

    Same function as ``_forward_kl_rows(log_softmax(logits / tau), teacher_logprobs)`` summed:
        value        = sum_t sum_z p_T(z) [log p_T(z) - log p_S(z)]
        d / d logits = (p_S sum_z p_T(z) - p_T) / tau     (= (p_S - p_T) / tau for a normalised p_T)
    which is what autograd of the plain form gives, without its graph. ``logits`` (C, V), owned,
    is overwritten with the gradient; the teacher's (C, V) log-probs are read only. The work
    runs a block of rows at a time, so besides these two only a few rows of temporaries exist.
    """
    value = logits.new_zeros(())
    step = row_step(logits.shape[-1])
    for start in range(0, logits.shape[0], step):
        student = logits[start : start + step]  # (R, V) student logits, a view
        teacher = teacher_logprobs[start : start + step]  # (R, V) log p_T
        if temperature != 1.0:
            student.div_(temperature)
        student -= torch.logsumexp(student, dim=-1, keepdim=True)  # (R, V) log p_S, in place
        teacher_probs = teacher.exp()  # (R, V) p_T(z)
        # (R, V) log p_T(z) - log p_S(z) where p_T(z) > 0, else 0
        log_ratio = (teacher - student).masked_fill_(teacher_probs == 0, 0.0)
        value += torch.linalg.vecdot(teacher_probs, log_ratio).sum()  # sum_t KL(p_T || p_S)
        del log_ratio
        if need_grad:
            teacher_mass = teacher_probs.sum(-1, keepdim=True)  # (R, 1) sum_z p_T(z)
            # (R, V) p_S sum p_T - p_T, over log p_S
            student.exp_().mul_(teacher_mass).sub_(teacher_probs)
            if temperature != 1.0:
                student.div_(temperature)
    return value, logits if need_grad else None


def topk_forward_kl_value_and_grad(
    logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail: bool, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Top-k + tail forward KL on one chunk and its gradient in closed form, in place on ``logits``.

    Same function as ``_forward_kl_rows(*kd_topk._topk_bucket_logprobs(logits, ...))`` summed. With
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
        student, teacher = (
            _renormalised(student_topk_logits, valid), _renormalised(teacher_logprobs, valid)
        )
        value = _forward_kl_rows(student, teacher).sum()
        if not need_grad:
            return value, None
        teacher_buckets = teacher.exp()  # (C, k) q_i
        # (C, k) s_i Q - q_i
        topk_grad = student.exp() * teacher_buckets.sum(-1, keepdim=True) - teacher_buckets
        return value, logits.zero_().scatter_add_(-1, ids, torch.where(valid, topk_grad, 0.0))

    in_topk, tail_nonempty = _topk_membership(ids, valid, vocab_size)
    # (C, V) in place: logits of the tail tokens only
    tail_logits = logits.masked_fill_(in_topk, NEG_INF)
    tail_max = tail_logits.amax(-1, keepdim=True)  # (C, 1)
    # an empty tail (all -inf) keeps 0
    tail_max = torch.where(tail_nonempty[:, None], tail_max, 0.0)
    # (C, V) exp(logit_z - tail max) on the tail, 0 on the top-k
    tail_exp = tail_logits.sub_(tail_max).exp_()
    tail_sum = tail_exp.sum(-1, keepdim=True)  # (C, 1) >= 1 unless the tail is empty
    log_tail = tail_max + tail_sum.log()  # (C, 1) log sum_{z in tail} exp(logit_z), -inf if empty
    topk_logits = torch.where(valid, student_topk_logits, NEG_INF)  # (C, k)
    # (C, 1) log Z
    log_normaliser = torch.logaddexp(log_tail, torch.logsumexp(topk_logits, dim=-1, keepdim=True))
    student_topk = topk_logits - log_normaliser  # (C, k) log p_S(z_i), -inf where not a bucket
    # (C, 1) log s_tail
    student_tail = torch.where(tail_nonempty[:, None], log_tail - log_normaliser, NEG_INF)
    teacher_tail = _teacher_tail(teacher_logprobs, tail_nonempty)[:, None]  # (C, 1) log q_tail
    student = torch.cat([student_topk, student_tail], dim=-1)  # (C, k + 1)
    teacher = torch.cat([teacher_logprobs, teacher_tail], dim=-1)  # (C, k + 1)
    value = _forward_kl_rows(student, teacher).sum()
    if not need_grad:
        return value, None
    teacher_mass = teacher.exp().sum(-1, keepdim=True)  # (C, 1) Q
    # (C, 1) Q s_tail - q_tail
    tail_coefficient = teacher_mass * student_tail.exp() - teacher_tail.exp()
    tail_coefficient = torch.where(tail_nonempty[:, None], tail_coefficient / tail_sum, 0.0)
    # (C, V) softmax_tail(z) (Q s_tail - q_tail), 0 on the top-k ids
    grad = tail_exp.mul_(tail_coefficient)
    topk_grad = student_topk.exp() * teacher_mass - teacher_logprobs.exp()  # (C, k) s_i Q - q_i
    return value, grad.scatter_add_(-1, ids, torch.where(valid, topk_grad, 0.0))


def autograd_value_and_grad(
    per_token_loss: Callable[[Tensor, int, int], Tensor]
) -> ChunkValueAndGrad:
    """Chunk value and gradient by autograd of a per-token loss (reverse KL, JSD)."""

    def value_and_grad(
        logits: Tensor, start: int, end: int, need_grad: bool
    ) -> tuple[Tensor, Tensor | None]:
        if not need_grad:
            return per_token_loss(logits, start, end).sum(), None
        with torch.enable_grad():
            logits = logits.detach().requires_grad_()
            chunk_loss_sum = per_token_loss(logits, start, end).sum()
        (grad,) = torch.autograd.grad(chunk_loss_sum, logits)
        return chunk_loss_sum.detach(), grad

    return value_and_grad
