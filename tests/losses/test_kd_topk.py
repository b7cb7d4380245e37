"""Top-k teacher (API) forward KL: tail bucket, renormalised variant, -inf padding, duplicates."""
import math

import pytest
import torch

from losses.kd import forward_kl
from losses.kd_topk import forward_kl_topk
from losses.sft import masked_cross_entropy

LOG2 = math.log(2.0)
F64 = torch.float64
NEG_INF = -math.inf


def four_token_student():
    """Student logits log(4, 2, 1, 1): p_S = (1/2, 1/4, 1/8, 1/8) over a vocabulary of 4."""
    return torch.log(torch.tensor([[[4.0, 2.0, 1.0, 1.0]]], dtype=F64))


def topk(ids, logprobs):
    return torch.tensor([[ids]]), torch.tensor([[logprobs]], dtype=F64)


ONE = torch.ones(1, 1, dtype=torch.bool)


def test_tail_bucket_by_hand():
    """Teacher top-2: token 1 with p 1/2, token 0 with p 1/4, so the teacher tail is 1/4.
    Student buckets: token 1: 1/4, token 0: 1/2, tail (tokens 2, 3): 1/8 + 1/8 = 1/4.

        KL = 1/2 log((1/2)/(1/4)) + 1/4 log((1/4)/(1/2)) + 1/4 log((1/4)/(1/4)) = 1/4 log 2

    Gradient w.r.t. the logits: p_S(z) - p_T(z) on the top-k tokens, and
    p_S(z) (1 - p_T^tail / p_S^tail) on tail tokens: (1/2 - 1/4, 1/4 - 1/2, 0, 0) = (1/4, -1/4, 0, 0).

    tail=False renormalises over {1, 0}: p_T = (2/3, 1/3), p_S = (1/4, 1/2) / (3/4) = (1/3, 2/3),
        KL = 2/3 log 2 + 1/3 log(1/2) = 1/3 log 2.
    """
    ids, logprobs = topk([1, 0], [math.log(0.5), math.log(0.25)])
    logits = four_token_student().requires_grad_(True)
    loss = forward_kl_topk(logits, ids, logprobs, ONE)
    assert loss.item() == pytest.approx(LOG2 / 4, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.25, -0.25, 0.0, 0.0]]], dtype=F64), rtol=0, atol=1e-15)
    renormalised = forward_kl_topk(four_token_student(), ids, logprobs, ONE, tail=False)
    assert renormalised.item() == pytest.approx(LOG2 / 3, rel=1e-12)


@pytest.mark.parametrize(
    "ids, logprobs",
    [
        ([1, 1, 0], [math.log(0.5), math.log(0.5), math.log(0.25)]),  # duplicated id, same log-prob
        ([1, 0, 3], [math.log(0.5), math.log(0.25), NEG_INF]),  # -inf padding on an otherwise unused id
        ([1, 0, 0], [math.log(0.5), math.log(0.25), NEG_INF]),  # -inf padding repeating a real id
        ([0, 1, 1, 2], [math.log(0.25), NEG_INF, math.log(0.5), NEG_INF]),  # both, in any order
    ],
    ids=["duplicate", "padding", "padding-duplicate", "mixed"],
)
@pytest.mark.parametrize("tail", [True, False])
def test_padding_and_duplicates_are_neither_nan_nor_double_counted(ids, logprobs, tail):
    clean_ids, clean_logprobs = topk([1, 0], [math.log(0.5), math.log(0.25)])
    clean_logits = four_token_student().requires_grad_(True)
    forward_kl_topk(clean_logits, clean_ids, clean_logprobs, ONE, tail=tail).backward()

    messy_ids, messy_logprobs = topk(ids, logprobs)
    logits = four_token_student().requires_grad_(True)
    loss = forward_kl_topk(logits, messy_ids, messy_logprobs, ONE, tail=tail)
    loss.backward()
    assert loss.item() == pytest.approx(LOG2 / 4 if tail else LOG2 / 3, rel=1e-12)
    torch.testing.assert_close(logits.grad, clean_logits.grad, rtol=0, atol=1e-15)


@pytest.mark.parametrize("tail", [True, False])
def test_all_padding_row_gives_zero_loss_and_finite_gradient(tail):
    """A position where the teacher returned nothing: every bucket is the tail (or none), KL 0."""
    ids, logprobs = topk([0, 1], [NEG_INF, NEG_INF])
    logits = four_token_student().requires_grad_(True)
    loss = forward_kl_topk(logits, ids, logprobs, ONE, tail=tail)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)


def full_vocab_case(seed=0, batch=2, length=4, vocab=6):
    gen = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(batch, length, vocab, generator=gen, dtype=F64)
    teacher_logprobs = torch.log_softmax(2 * torch.randn(batch, length, vocab, generator=gen, dtype=F64), -1)
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    return student_logits, teacher_logprobs, mask


@pytest.mark.parametrize("tail", [True, False])
def test_k_equal_to_vocabulary_is_forward_kl(tail):
    """All V tokens reported (in a random order per position): no tail mass on either side."""
    student_logits, teacher_logprobs, mask = full_vocab_case()
    gen = torch.Generator().manual_seed(1)
    vocab = student_logits.shape[-1]
    ids = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(mask.numel())]).view(*mask.shape, vocab)
    topk_logprobs = teacher_logprobs.gather(-1, ids)

    reference_logits = student_logits.clone().requires_grad_(True)
    reference = forward_kl(reference_logits, teacher_logprobs, mask)
    reference.backward()
    logits = student_logits.clone().requires_grad_(True)
    loss = forward_kl_topk(logits, ids, topk_logprobs, mask, tail=tail)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-10, atol=1e-15)


def test_one_hot_teacher_is_cross_entropy():
    """k = 1 with log-prob 0: the teacher tail is 0 (log -inf), and KL(onehot || p_S) = -log p_S(y)."""
    student_logits, _, mask = full_vocab_case(seed=2)
    labels = torch.randint(0, student_logits.shape[-1], mask.shape, generator=torch.Generator().manual_seed(3))
    got = forward_kl_topk(student_logits, labels[..., None], torch.zeros(*mask.shape, 1, dtype=F64), mask)
    torch.testing.assert_close(got, masked_cross_entropy(student_logits, labels, mask), rtol=1e-12, atol=0)


def test_gradcheck_float64_with_padding_and_duplicates():
    student_logits, teacher_logprobs, mask = full_vocab_case(seed=4)
    top = teacher_logprobs.topk(3, dim=-1)
    ids = torch.cat([top.indices, top.indices[..., :1]], -1)  # a duplicate of the top token ...
    logprobs = torch.cat([top.values, top.values[..., :1]], -1)
    logprobs[0, 1, 2] = NEG_INF  # ... and a padded entry
    student_logits.requires_grad_(True)
    for tail in (True, False):
        assert torch.autograd.gradcheck(lambda s: forward_kl_topk(s, ids, logprobs, mask, tail=tail), (student_logits,))


def test_masked_positions_may_hold_anything():
    student_logits, teacher_logprobs, mask = full_vocab_case(seed=5)
    top = teacher_logprobs.topk(2, dim=-1)
    ids, logprobs = top.indices.clone(), top.values.clone()
    reference = forward_kl_topk(student_logits, ids, logprobs, mask)
    ids[~mask] = 10**6  # out-of-range ids and NaN at prompt / padding positions
    logprobs[~mask] = math.nan
    assert forward_kl_topk(student_logits, ids, logprobs, mask).item() == reference.item()


def test_bad_topk_inputs_raise_with_a_message():
    student_logits, teacher_logprobs, mask = full_vocab_case()
    top = teacher_logprobs.topk(2, dim=-1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\)"):
        forward_kl_topk(student_logits, top.indices + 10, top.values, mask)
    with pytest.raises(ValueError, match="NaN"):
        forward_kl_topk(student_logits, top.indices, torch.full_like(top.values, math.nan), mask)
    with pytest.raises(ValueError, match=r"\[B, T, k\]"):
        forward_kl_topk(student_logits, top.indices[..., 0], top.values[..., 0], mask)
