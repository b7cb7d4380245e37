"""DPO (eq. 3, negated) and sequence log-probabilities."""
import math

import pytest
import torch

from losses.dpo import dpo_loss, sequence_logprobs

LOG2, LOG3 = math.log(2.0), math.log(3.0)
F64 = torch.float64


def hand_pairs():
    """Two pairs, beta = 0.5.

    pair 0: log pi(y+) = -10 + log 3 vs ref -10; log pi(y-) = -12 - log 3 vs ref -12.
        margin = log 3 - (-log 3) = 2 log 3, beta * margin = log 3, sigma(log 3) = 3/4,
        loss_0 = -log(3/4) = log(4/3) = 0.287682; rewards: chosen 0.5 log 3, rejected -0.5 log 3,
        reward margin log 3, accuracy 1.
    pair 1: policy equals reference on both: margin 0, loss_1 = -log(1/2) = log 2, accuracy 0.
    mean loss = (log(4/3) + log 2) / 2 = log(8/3) / 2 = 0.490415.
    """
    policy_chosen = torch.tensor([-10 + LOG3, -4.0], dtype=F64)
    policy_rejected = torch.tensor([-12 - LOG3, -5.0], dtype=F64)
    ref_chosen = torch.tensor([-10.0, -4.0], dtype=F64)
    ref_rejected = torch.tensor([-12.0, -5.0], dtype=F64)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_dpo_hand_values_and_metrics():
    loss, metrics = dpo_loss(*hand_pairs(), beta=0.5)
    assert loss.item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-12)
    assert math.log(8 / 3) / 2 == pytest.approx(0.490415, abs=1e-6)
    torch.testing.assert_close(metrics["chosen_rewards"], torch.tensor([0.5 * LOG3, 0.0], dtype=F64))
    torch.testing.assert_close(metrics["rejected_rewards"], torch.tensor([-0.5 * LOG3, 0.0], dtype=F64))
    torch.testing.assert_close(metrics["reward_margin"], torch.tensor([LOG3, 0.0], dtype=F64))
    torch.testing.assert_close(metrics["reward_accuracy"], torch.tensor([1.0, 0.0], dtype=F64))
    summed, _ = dpo_loss(*hand_pairs(), beta=0.5, reduction="sum")
    assert summed.item() == pytest.approx(math.log(4 / 3) + LOG2, rel=1e-12)


def test_metrics_are_detached():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = hand_pairs()
    policy_chosen.requires_grad_(True)
    policy_rejected.requires_grad_(True)
    _, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    assert all(not value.requires_grad for value in metrics.values())


def test_gradient_is_minus_beta_sigma_of_minus_beta_margin():
    """d loss_p / d log pi(y+) = -beta sigma(-beta margin_p), d / d log pi(y-) = +beta sigma(-beta margin_p);
    the mean over P = 2 pairs divides both by 2. Hand: pair 0 sigma(-log 3) = 1/4, pair 1 sigma(0) = 1/2,
    so with beta = 0.5 the chosen gradient is (-0.5 * 1/4, -0.5 * 1/2) / 2 = (-1/16, -1/8)."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = hand_pairs()
    policy_chosen.requires_grad_(True)
    policy_rejected.requires_grad_(True)
    ref_chosen.requires_grad_(True)
    loss, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    loss.backward()
    beta = 0.5
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    expected_chosen = -beta * torch.sigmoid(-beta * margin.detach()) / 2
    torch.testing.assert_close(policy_chosen.grad, expected_chosen, rtol=1e-12, atol=0)
    torch.testing.assert_close(policy_rejected.grad, -expected_chosen, rtol=1e-12, atol=0)
    torch.testing.assert_close(policy_chosen.grad, torch.tensor([-1 / 16, -1 / 8], dtype=F64), rtol=1e-12, atol=0)
    assert ref_chosen.grad is None  # the reference is a constant


def test_label_smoothing_matches_cdpo_closed_form():
    """eps = 0.1, pair 0 of hand_pairs (beta margin = log 3):
    loss = -(1 - eps) log sigma(log 3) - eps log sigma(-log 3) = 0.9 log(4/3) + 0.1 log 4 = 0.397543.
    Pair 1 (margin 0): 0.9 log 2 + 0.1 log 2 = log 2."""
    loss, _ = dpo_loss(*hand_pairs(), beta=0.5, label_smoothing=0.1, reduction="sum")
    pair0 = 0.9 * math.log(4 / 3) + 0.1 * math.log(4)
    assert pair0 == pytest.approx(0.397543, abs=1e-6)
    assert loss.item() == pytest.approx(pair0 + LOG2, rel=1e-12)


def test_one_sgd_step_raises_the_margin():
    """A linear policy scores two fixed responses; one descent step on the DPO loss raises
    log pi(y+)/pi_ref(y+) - log pi(y-)/pi_ref(y-) and lowers the loss."""
    gen = torch.Generator().manual_seed(0)
    batch, length, hidden, vocab = 2, 5, 4, 6
    states = torch.randn(2 * batch, length, hidden, generator=gen, dtype=F64)  # chosen rows, then rejected rows
    labels = torch.randint(0, vocab, (2 * batch, length), generator=gen)
    mask = torch.ones(2 * batch, length, dtype=torch.bool)
    mask[:, :2] = False  # prompt
    ref_weight = torch.randn(vocab, hidden, generator=gen, dtype=F64)
    weight = ref_weight.clone().requires_grad_(True)

    def margin_and_loss(w):
        policy = sequence_logprobs(states @ w.T, labels, mask)
        ref = sequence_logprobs(states @ ref_weight.T, labels, mask)
        loss, metrics = dpo_loss(policy[:batch], policy[batch:], ref[:batch], ref[batch:], beta=0.1)
        return metrics["reward_margin"].sum() / 0.1, loss

    margin_before, loss_before = margin_and_loss(weight)
    loss_before.backward()
    with torch.no_grad():
        margin_after, loss_after = margin_and_loss(weight - 1.0 * weight.grad)
    assert margin_before.item() == 0.0 and margin_after > 0.1 and loss_after < loss_before


def test_sequence_logprobs_by_hand_and_mask():
    """Row 0: logits (0, 0, log 2) at every step give p = (1/4, 1/4, 1/2); response tokens are
    positions 1 and 2 with labels 2 and 0: log(1/2) + log(1/4) = -3 log 2. Position 0 (prompt)
    holds label -100 and NaN logits, which must not matter. Row 1: no response tokens: 0."""
    step = torch.tensor([0.0, 0.0, LOG2], dtype=F64)
    logits = step.repeat(2, 3, 1)
    logits[0, 0] = math.nan
    labels = torch.tensor([[-100, 2, 0], [1, 1, 1]])
    mask = torch.tensor([[False, True, True], [False, False, False]])
    torch.testing.assert_close(sequence_logprobs(logits, labels, mask), torch.tensor([-3 * LOG2, 0.0], dtype=F64))


def test_sequence_logprobs_gradcheck_and_dtype():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 4), generator=gen)
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, labels, mask), (logits,))
    assert sequence_logprobs(logits.detach().bfloat16(), labels, mask).dtype == torch.float32


def test_dpo_gradcheck():
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(3, generator=gen, dtype=F64, requires_grad=True) for _ in range(2)]
    refs = [torch.randn(3, generator=gen, dtype=F64) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda c, r: dpo_loss(c, r, *refs, beta=0.7, label_smoothing=0.2)[0], inputs)


def test_bad_inputs_raise_with_a_message():
    pairs = hand_pairs()
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*pairs, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*pairs, label_smoothing=0.7)
    with pytest.raises(ValueError, match=r"\[P\]"):
        dpo_loss(pairs[0], pairs[1][:1], pairs[2], pairs[3])
