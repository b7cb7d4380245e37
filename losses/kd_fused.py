"""What training runs for eq. 1-2: the distillation loss from the student's final hidden states
and LM-head weight, chunked over response tokens so that no [tokens, V] logits ever exist at
once (at Phi-4-mini's V = 200064, 2048 response tokens of float32 logits are 1.6 GB per copy).

``fused_kd_loss`` equals, in value and in gradient w.r.t. the hidden states and the weight,
the reference forms applied to ``logits = hidden @ weight.T``: ``forward_kl`` (eq. 1, the
default), ``reverse_kl`` or the generalized JSD of losses/kd.py for a full-vocabulary teacher,
and ``forward_kl_topk`` of losses/kd_topk.py for an API teacher (tests/losses/test_kd_fused.py
proves each, gradcheck in float64 included).

The teacher comes in one of three forms, one small chunk function each:
  TeacherLogprobs  log p_T [B, T, V], already computed: sliced chunk by chunk;
  TeacherHead      a local teacher's hidden states and LM-head weight: its logits are formed chunk
                   by chunk too, so its [tokens, V] never exists either;
  TeacherTopK      an API teacher's top k ids and log-probs per position, plus the tail bucket.
Per chunk, the loss and its gradient w.r.t. the chunk's logits are computed (in closed form for
the forward KL, eq. 2 on the logits; by autograd of the per-token divergence for the others)
and folded at once into the gradients of the hidden states and the weight
(``_ChunkedLinearLoss``); backward only scales them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from losses import check_mask, check_reduction, compute_dtype, reduce_loss
from losses.kd import (
    NEG_INF,
    _forward_kl_rows,
    check_divergence,
    check_temperature,
    divergence_rows,
    scaled_student_logprobs,
    scaled_teacher_logprobs,
)
from losses.kd_topk import (
    _check_topk,
    _check_topk_rows,
    _distinct_topk,
    _renormalised,
    _teacher_tail,
    _topk_membership,
)


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


# the three forms fused_kd_loss takes
TeacherDistribution = TeacherLogprobs | TeacherHead | TeacherTopK

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
    # (C, V) log p_S, in place
    student_logprobs -= torch.logsumexp(student_logprobs, dim=-1, keepdim=True)
    teacher_probs = teacher_logprobs.exp()  # (C, V) p_T(z)
    # (C, V) log p_T(z) - log p_S(z) where p_T(z) > 0, else 0 (overwrites the teacher log-probs)
    log_ratio = teacher_logprobs.sub_(student_logprobs).masked_fill_(teacher_probs == 0, 0.0)
    value = torch.linalg.vecdot(teacher_probs, log_ratio).sum()  # sum_t KL(p_T || p_S)
    del log_ratio
    if not need_grad:
        return value, None
    teacher_mass = teacher_probs.sum(-1, keepdim=True)  # (C, 1) sum_z p_T(z)
    # (C, V) p_S sum p_T - p_T
    grad = student_logprobs.exp_().mul_(teacher_mass).sub_(teacher_probs)
    return value, grad.div_(temperature) if temperature != 1.0 else grad


def _topk_forward_kl_value_and_grad(
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


def _autograd_value_and_grad(
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


class _ChunkedLinearLoss(torch.autograd.Function):
    """sum over tokens of a loss of ``hidden @ weight.T``, one chunk of rows at a time.

    The gradient is computed in the forward pass: each chunk's d loss / d logits (C, V) is
    turned into d loss / d hidden (C, H) and accumulated into d loss / d weight (V, H) at once,
    so only one chunk's (C, V) tensors are alive at a time; backward only scales the stored
    gradients by the incoming scalar.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, value_and_grad: ChunkValueAndGrad, chunk_size: int
    ):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_hidden_grad or need_weight_grad
        loss_sum = torch.zeros((), dtype=compute_dtype(hidden), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None  # (N, H)
        grad_weight = (
            torch.zeros(weight.shape, dtype=compute_dtype(weight), device=weight.device)
            if need_weight_grad
            else None
        )  # (V, H), accumulated over chunks in float32
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:end]  # (C, H)
            # (C, V) student logits, float32
            logits = (hidden_chunk @ weight.T).to(compute_dtype(hidden))
            chunk_loss_sum, grad_logits = value_and_grad(logits, start, end, need_grad)
            loss_sum += chunk_loss_sum
            del logits
            if need_hidden_grad:
                grad_hidden[start:end] = grad_logits.to(weight.dtype) @ weight  # (C, H)
            if need_weight_grad:
                grad_weight.addmm_(
                    grad_logits.T.to(grad_weight.dtype), hidden_chunk.to(grad_weight.dtype)
                )  # (V, H)
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
    teacher: TeacherDistribution,
    mask: Tensor,
    *,
    divergence: str = "forward",
    beta: float | None = None,
    temperature: float = 1.0,
    chunk_size: int = 256,
    reduction: str = "mean",
) -> Tensor:
    """Distillation loss from the student's hidden states, never holding all [N, V] logits.

    Equals, in value and gradient (w.r.t. ``student_hidden`` and ``lm_head_weight``)::

        logits = student_hidden @ lm_head_weight.T                                # (B, T, V)
        forward_kl(logits, teacher_logprobs, mask, temperature=...)               # "forward": eq. 1
        reverse_kl(...) / generalized_jsd(..., beta)                              # "reverse", "jsd"
        forward_kl_topk(logits, ids, logprobs, mask, tail)                        # TeacherTopK

    a scalar to minimise whose gradient (forward KL) is eq. 2 with the descent sign. Response
    tokens are processed ``chunk_size`` at a time (module docstring). Peak extra memory: a few
    (chunk, V) float32 tensors, plus one (V, H) float32 accumulator only if ``lm_head_weight``
    requires grad. If neither input requires grad, no gradient work is done. Double backward is
    not supported.

    student_hidden [B, T, H]: final decoder hidden states (after the last norm) at the positions
    whose logits score the response tokens. lm_head_weight [V, H] (no bias). mask [B, T].
    teacher: ``TeacherLogprobs``, ``TeacherHead`` or ``TeacherTopK`` (forward KL only,
    temperature 1).
    divergence: "forward" | "reverse" | "jsd"; ``beta`` (0 < beta < 1) with "jsd" only.
    """
    check_reduction(reduction)
    check_divergence(divergence, beta)
    check_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (tokens per chunk)")
    if (
        student_hidden.dim() != 3
        or lm_head_weight.dim() != 2
        or lm_head_weight.shape[1] != student_hidden.shape[-1]
    ):
        raise ValueError(
            f"fused_kd_loss: student_hidden {tuple(student_hidden.shape)} must be [B, T, H] and "
            f"lm_head_weight {tuple(lm_head_weight.shape)} must be [V, H] with the same H"
        )
    mask = check_mask(mask, student_hidden.shape[:2], "student_hidden")
    rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices of the response tokens
    # (N, H)
    hidden_rows = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)
    value_and_grad = _chunk_loss(
        teacher, rows, student_hidden, lm_head_weight.shape[0], divergence, beta, temperature
    )
    loss_sum = _ChunkedLinearLoss.apply(hidden_rows, lm_head_weight, value_and_grad, chunk_size)
    return reduce_loss(loss_sum, rows.numel(), reduction)


def _chunk_loss(teacher: TeacherDistribution, rows: Tensor, student_hidden: Tensor, vocab_size: int,
                divergence: str, beta: float | None, temperature: float) -> ChunkValueAndGrad:
    """The per-chunk loss for the teacher's form (module docstring)."""
    dtype = compute_dtype(student_hidden)
    if isinstance(teacher, TeacherTopK):
        if divergence != "forward" or temperature != 1.0:
            raise ValueError("fused_kd_loss: a TeacherTopK supports the forward KL only "
                             "(divergence='forward', temperature=1); see forward_kl_topk")
        return _topk_chunks(teacher, rows, student_hidden, vocab_size)
    if isinstance(teacher, TeacherLogprobs):
        teacher_rows = _logprobs_rows(teacher, rows, student_hidden, vocab_size, dtype)
    elif isinstance(teacher, TeacherHead):
        teacher_rows = _head_rows(teacher, rows, student_hidden, vocab_size, dtype)
    else:
        raise TypeError(
            "fused_kd_loss: teacher must be TeacherLogprobs, TeacherHead or TeacherTopK, "
            f"got {type(teacher).__name__}"
        )

    def chunk_teacher_logprobs(start: int, end: int) -> Tensor:
        with torch.no_grad():
            # (C, V) log p_T
            return scaled_teacher_logprobs(teacher_rows(start, end), temperature, dtype)

    if divergence == "forward":  # eq. 1, closed-form gradient (eq. 2 on the logits)
        return lambda logits, start, end, need_grad: _forward_kl_value_and_grad(
            logits, chunk_teacher_logprobs(start, end), temperature, need_grad)

    def per_token_loss(logits: Tensor, start: int, end: int) -> Tensor:
        student = scaled_student_logprobs(logits, temperature)  # (C, V) log p_S^theta
        # (C,)
        return divergence_rows(student, chunk_teacher_logprobs(start, end), divergence, beta)

    return _autograd_value_and_grad(per_token_loss)


def _logprobs_rows(teacher: TeacherLogprobs, rows: Tensor, student_hidden: Tensor, vocab_size: int,
                   dtype: torch.dtype) -> Callable[[int, int], Tensor]:
    """Response rows [start, end) of a TeacherLogprobs: (C, V) log p_T, a copy."""
    if teacher.logprobs.shape != (*student_hidden.shape[:2], vocab_size):
        raise ValueError(
            f"fused_kd_loss: TeacherLogprobs.logprobs {tuple(teacher.logprobs.shape)} must be "
            f"[B, T, V] = {(*student_hidden.shape[:2], vocab_size)}"
        )
    teacher_flat = teacher.logprobs.detach().reshape(-1, vocab_size)  # (B*T, V), a view
    return lambda start, end: teacher_flat.index_select(0, rows[start:end]).to(dtype)


def _head_rows(teacher: TeacherHead, rows: Tensor, student_hidden: Tensor, vocab_size: int,
               dtype: torch.dtype) -> Callable[[int, int], Tensor]:
    """Response rows [start, end) of a TeacherHead: its logits formed for those rows alone, (C, V)
    log p_T."""
    teacher_hidden, teacher_weight = teacher.hidden.detach(), teacher.lm_head_weight.detach()
    if teacher_hidden.shape[:2] != student_hidden.shape[:2] or teacher_weight.shape != (
        vocab_size, teacher_hidden.shape[-1]
    ):
        raise ValueError(
            f"fused_kd_loss: TeacherHead hidden {tuple(teacher_hidden.shape)} must be [B, T, H_T] "
            f"with the student's B, T and lm_head_weight {tuple(teacher_weight.shape)} [V, H_T] "
            f"with V = {vocab_size}"
        )
    teacher_hidden_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # (B*T, H_T)

    def teacher_rows(start: int, end: int) -> Tensor:
        # (C, V)
        teacher_logits = teacher_hidden_flat.index_select(0, rows[start:end]) @ teacher_weight.T
        return torch.log_softmax(teacher_logits.to(dtype), dim=-1)  # (C, V) log p_T

    return teacher_rows


def _topk_chunks(teacher: TeacherTopK, rows: Tensor, student_hidden: Tensor,
                 vocab_size: int) -> ChunkValueAndGrad:
    """Top-k + tail forward KL per chunk, closed-form gradient."""
    _check_topk(student_hidden, teacher.ids, teacher.logprobs, "fused_kd_loss")
    # (N, k) z_i
    topk_ids = teacher.ids.reshape(-1, teacher.ids.shape[-1]).index_select(0, rows).long()
    # (N, k)
    topk_logprobs = teacher.logprobs.reshape(-1, teacher.logprobs.shape[-1]).index_select(0, rows)
    _check_topk_rows(topk_ids, topk_logprobs, vocab_size, "fused_kd_loss")
    topk_logprobs = topk_logprobs.detach()
    return lambda logits, start, end, need_grad: _topk_forward_kl_value_and_grad(
        logits, topk_ids[start:end], topk_logprobs[start:end], teacher.tail, need_grad)
