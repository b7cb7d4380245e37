"""Reduction across accumulation steps and ranks: sum / global count == one big batch.

Four sequences with 6, 1, 4 and 2 response tokens, split into micro-batches. The pattern of
losses/__init__.py (``reduction="sum"``, scaled by world_size / global_count, gradients summed
over micro-batches and averaged over ranks as DDP does) must reproduce the full-batch gradient;
averaging each micro-batch's own mean must not (a token of a short micro-batch weighs more).
"""
import pytest
import torch

from losses import response_token_count
from losses.dpo import dpo_loss, sequence_logprobs
from losses.kd import forward_kl
from losses.kd_fused import TeacherHead, fused_kd_loss
from losses.sft import masked_cross_entropy

F64 = torch.float64
BATCH, LENGTH, HIDDEN, VOCAB = 4, 8, 5, 9


def make_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(BATCH, LENGTH, HIDDEN, generator=gen, dtype=F64)
    teacher_states = torch.randn(BATCH, LENGTH, 3, generator=gen, dtype=F64)
    teacher_weight = torch.randn(VOCAB, 3, generator=gen, dtype=F64)
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen)
    mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    for row, (start, count) in enumerate([(1, 6), (3, 1), (2, 4), (5, 2)]):
        mask[row, start : start + count] = True
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=F64)
    return states, teacher_states, teacher_weight, labels, mask, weight


TOKEN_LOSSES = {  # (weight, states, teacher states, teacher weight, labels, mask, reduction) -> loss
    "forward_kl": lambda w, s, ts, tw, y, m, red: forward_kl(
        s @ w.T, torch.log_softmax(ts @ tw.T, -1), m, reduction=red
    ),
    "fused_kd": lambda w, s, ts, tw, y, m, red: fused_kd_loss(
        s, w, TeacherHead(ts, tw), m, chunk_size=3, reduction=red
    ),
    "masked_cross_entropy": lambda w, s, ts, tw, y, m, red: masked_cross_entropy(s @ w.T, y, m, reduction=red),
}


def grad_of(weight, loss_fn):
    weight = weight.clone().requires_grad_(True)
    loss_fn(weight).backward()
    return weight.grad


@pytest.mark.parametrize("name", TOKEN_LOSSES)
def test_accumulation_and_ranks_with_global_token_count_equal_one_batch(name):
    loss = TOKEN_LOSSES[name]
    states, teacher_states, teacher_weight, labels, mask, weight = make_batch()
    parts = [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4)]  # rank r holds micro-batches 2r, 2r+1

    full = grad_of(weight, lambda w: loss(w, states, teacher_states, teacher_weight, labels, mask, "mean"))

    global_tokens = sum(response_token_count(mask[p]) for p in parts)  # all-reduced in training
    world_size = 2
    rank_grads = []
    for rank in range(world_size):
        w = weight.clone().requires_grad_(True)
        for p in parts[2 * rank : 2 * rank + 2]:  # gradient accumulation on this rank
            loss_sum = loss(w, states[p], teacher_states[p], teacher_weight, labels[p], mask[p], "sum")
            (loss_sum * world_size / global_tokens).backward()
        rank_grads.append(w.grad)
    ddp_grad = sum(rank_grads) / world_size  # what DDP's all-reduce (average) produces
    torch.testing.assert_close(ddp_grad, full, rtol=1e-12, atol=1e-14)

    halves = [slice(0, 2), slice(2, 4)]  # plain accumulation, one process: two half batches
    w = weight.clone().requires_grad_(True)
    for p in halves:
        (loss(w, states[p], teacher_states[p], teacher_weight, labels[p], mask[p], "sum") / global_tokens).backward()
    torch.testing.assert_close(w.grad, full, rtol=1e-12, atol=1e-14)

    w = weight.clone().requires_grad_(True)  # the tempting mean of per-micro-batch means is different
    for p in halves:
        (loss(w, states[p], teacher_states[p], teacher_weight, labels[p], mask[p], "mean") / len(halves)).backward()
    assert not torch.allclose(w.grad, full, rtol=1e-3)


def test_dpo_accumulation_with_global_pair_count_equals_one_batch():
    states, _, _, labels, mask, weight = make_batch(seed=1)
    ref_weight = weight + 0.3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    # rows 0, 1 are chosen responses for pairs 0, 1; rows 2, 3 the rejected ones; pair 2 repeats pair 0 swapped
    chosen_rows, rejected_rows = torch.tensor([0, 1, 2]), torch.tensor([2, 3, 0])

    def pair_loss(w, pairs, reduction):
        policy = sequence_logprobs(states @ w.T, labels, mask)
        ref = sequence_logprobs(states @ ref_weight.T, labels, mask)
        c, r = chosen_rows[pairs], rejected_rows[pairs]
        return dpo_loss(policy[c], policy[r], ref[c], ref[r], beta=0.5, reduction=reduction)[0]

    full = grad_of(weight, lambda w: pair_loss(w, torch.arange(3), "mean"))
    micro_batches = [torch.tensor([0, 1]), torch.tensor([2])]  # unequal: 2 pairs, then 1
    global_pairs = sum(len(p) for p in micro_batches)
    w = weight.clone().requires_grad_(True)
    for pairs in micro_batches:
        (pair_loss(w, pairs, "sum") / global_pairs).backward()
    torch.testing.assert_close(w.grad, full, rtol=1e-12, atol=1e-14)
