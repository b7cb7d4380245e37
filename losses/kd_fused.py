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

Precision. The logits and everything after them are float32 (float64 stays float64). An LM head
stored in bf16, as a bf16 model holds it, is never copied whole to float32 (a 2.46 GB copy at
Phi-4-mini's [200064, 3072]): where the device has no bf16 matmul kernels (a CPU without
AVX512-BF16 or AMX), or the hidden states are float32, the head is upcast one block of
vocabulary rows at a time, each block multiplied in float32 (``LinearHead``). Upcasting is
exact, so the logits are the float32 product of the stored weights, the same numbers as the
float32 path given an upcast copy of the head. Where the device has the kernels and the hidden
states are bf16 too (a GPU), the matmul runs in bf16 as the model's own head does.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from losses import check_mask, check_reduction, compute_dtype, reduce_loss
from losses.kd import (
    check_divergence,
    check_temperature,
    divergence_rows,
    scaled_student_logprobs,
    scaled_teacher_logprobs,
)
from losses.kd_chunk import (
    ChunkValueAndGrad,
    autograd_value_and_grad,
    forward_kl_value_and_grad,
    log_softmax_,
    topk_forward_kl_value_and_grad,
)
from losses.kd_topk import _check_topk, _check_topk_rows
from losses.linear_head import LinearHead


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

class _ChunkedLinearLoss(torch.autograd.Function):
    """sum over tokens of a loss of ``hidden @ weight.T``, one chunk of rows at a time.

    The gradient is computed in the forward pass: each chunk's d loss / d logits (C, V) is
    turned into d loss / d hidden (C, H) and accumulated into d loss / d weight (V, H) at once,
    so only one chunk's (C, V) tensors are alive at a time; backward only scales the stored
    gradients by the incoming scalar. The matmuls with the weight: ``LinearHead``.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, value_and_grad: ChunkValueAndGrad, chunk_size: int,
        vocab_chunk_size: int | None,
    ):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_hidden_grad or need_weight_grad
        dtype = _loss_dtype(hidden, weight)
        head = LinearHead(weight, hidden.dtype, dtype, vocab_chunk_size)
        loss_sum = torch.zeros((), dtype=dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None  # (N, H)
        grad_weight = (
            torch.zeros(weight.shape, dtype=compute_dtype(weight), device=weight.device)
            if need_weight_grad
            else None
        )  # (V, H), accumulated over chunks in float32
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:end]  # (C, H)
            logits = head.logits(hidden_chunk)  # (C, V) student logits, float32
            chunk_loss_sum, grad_logits = value_and_grad(logits, start, end, need_grad)
            loss_sum += chunk_loss_sum
            del logits
            if need_hidden_grad:
                grad_hidden[start:end] = head.input_grad(grad_logits)  # (C, H)
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
        return grad_hidden, grad_weight, None, None, None


def _loss_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The loss's compute dtype: float64 if either input is float64, else float32."""
    return torch.promote_types(compute_dtype(hidden), compute_dtype(weight))


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
    vocab_chunk_size: int | None = None,
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

    Precision (module docstring): the loss is float32 (float64 if an input is). A bf16 LM head
    (the student's, or a ``TeacherHead``'s) stays bf16: on a device without bf16 matmul kernels,
    or beside float32 hidden states, it is upcast ``vocab_chunk_size`` vocabulary rows at a time
    (default: 32 MB of float32, 2730 rows at H = 3072) and multiplied in float32, so no float32
    [V, H] copy of it exists, and the result equals the float32 path on the upcast head.

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
    if vocab_chunk_size is not None and vocab_chunk_size < 1:
        raise ValueError(
            f"vocab_chunk_size={vocab_chunk_size}: must be >= 1 (vocabulary rows upcast at a time)"
        )
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
        teacher, rows, student_hidden, lm_head_weight.shape[0], divergence, beta, temperature,
        _loss_dtype(student_hidden, lm_head_weight), vocab_chunk_size,
    )
    loss_sum = _ChunkedLinearLoss.apply(
        hidden_rows, lm_head_weight, value_and_grad, chunk_size, vocab_chunk_size
    )
    return reduce_loss(loss_sum, rows.numel(), reduction)


def _chunk_loss(teacher: TeacherDistribution, rows: Tensor, student_hidden: Tensor, vocab_size: int,
                divergence: str, beta: float | None, temperature: float, dtype: torch.dtype,
                vocab_chunk_size: int | None) -> ChunkValueAndGrad:
    """The per-chunk loss for the teacher's form (module docstring), in ``dtype``."""
    if isinstance(teacher, TeacherTopK):
        if divergence != "forward" or temperature != 1.0:
            raise ValueError("fused_kd_loss: a TeacherTopK supports the forward KL only "
                             "(divergence='forward', temperature=1); see forward_kl_topk")
        return _topk_chunks(teacher, rows, student_hidden, vocab_size)
    if isinstance(teacher, TeacherLogprobs):
        teacher_rows = _logprobs_rows(teacher, rows, student_hidden, vocab_size, dtype)
    elif isinstance(teacher, TeacherHead):
        teacher_rows = _head_rows(
            teacher, rows, student_hidden, vocab_size, dtype, vocab_chunk_size
        )
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
        return lambda logits, start, end, need_grad: forward_kl_value_and_grad(
            logits, chunk_teacher_logprobs(start, end), temperature, need_grad)

    def per_token_loss(logits: Tensor, start: int, end: int) -> Tensor:
        student = scaled_student_logprobs(logits, temperature)  # (C, V) log p_S^theta
        # (C,)
        return divergence_rows(student, chunk_teacher_logprobs(start, end), divergence, beta)

    return autograd_value_and_grad(per_token_loss)


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
               dtype: torch.dtype, vocab_chunk_size: int | None) -> Callable[[int, int], Tensor]:
    """Response rows [start, end) of a TeacherHead: its logits formed for those rows alone (a bf16
    head upcast a block at a time, as the student's: ``LinearHead``), (C, V) log p_T."""
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
    # the loss's dtype, or float64 for a float64 teacher
    teacher_dtype = torch.promote_types(dtype, _loss_dtype(teacher_hidden, teacher_weight))
    head = LinearHead(teacher_weight, teacher_hidden.dtype, teacher_dtype, vocab_chunk_size)

    def teacher_rows(start: int, end: int) -> Tensor:
        # (C, V) teacher logits
        teacher_logits = head.logits(teacher_hidden_flat.index_select(0, rows[start:end]))
        return log_softmax_(teacher_logits).to(dtype)  # (C, V) log p_T, in place

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
    return lambda logits, start, end, need_grad: topk_forward_kl_value_and_grad(
        logits, topk_ids[start:end], topk_logprobs[start:end], teacher.tail, need_grad)
