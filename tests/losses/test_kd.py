"""Full-vocabulary distillation losses: forward KL (eq. 1), its gradient (eq. 2), reverse KL, GKD JSD."""
import math

import pytest
import torch

from losses.kd import forward_kl, generalized_jsd, reverse_kl

LOG2, LOG3 = math.log(2.0), math.log(3.0)
F64 = torch.float64


def random_case(seed=0, batch=2, length=5, vocab=7, dtype=F64):
    """Random student logits, a normalised teacher, and a mask with prompt/padding holes."""
    gen = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(batch, length, vocab, generator=gen, dtype=dtype)
    teacher_logprobs = torch.log_softmax(2.0 * torch.randn(batch, length, vocab, generator=gen, dtype=dtype), -1)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :2] = False  # prompt
    mask[1, -1] = False  # padding
    return student_logits, teacher_logprobs, mask


def hand_example():
    """Three positions, vocabulary of 3 tokens; position 2 is prompt (masked out).

    position 0: p_T = (1/2, 1/4, 1/4); student logits (0, 0, log 6) give p_S = (1/8, 1/8, 3/4).
        KL(p_T || p_S) = 1/2 log(4) + 1/4 log(2) + 1/4 log(1/3) = 5/4 log 2 - 1/4 log 3 = 0.591781
    position 1: p_T = (1, 0, 0) (log-probs 0, -inf, -inf); student logits (log 2, 0, 0) give
        p_S = (1/2, 1/4, 1/4).  KL = 1 * log(1 / (1/2)) + 0 log 0 + 0 log 0 = log 2 = 0.693147
    position 2: masked out; its teacher row is NaN and must not matter.
    mean over the N = 2 response tokens: (9/4 log 2 - 1/4 log 3) / 2 = 0.642464
    """
    student_logits = torch.tensor([[[0.0, 0.0, math.log(6.0)], [LOG2, 0.0, 0.0], [1.0, 2.0, 3.0]]], dtype=F64)
    teacher_logprobs = torch.tensor(
        [[[math.log(0.5), math.log(0.25), math.log(0.25)], [0.0, -math.inf, -math.inf], [math.nan] * 3]], dtype=F64
    )
    mask = torch.tensor([[True, True, False]])
    return student_logits, teacher_logprobs, mask


def test_forward_kl_is_zero_when_student_equals_teacher():
    student_logits, _, mask = random_case()
    teacher_logprobs = torch.log_softmax(student_logits, -1)
    assert forward_kl(student_logits, teacher_logprobs, mask).item() == pytest.approx(0.0, abs=1e-15)
    loss32 = forward_kl(student_logits.float(), teacher_logprobs.float(), mask)
    assert loss32.dtype == torch.float32 and abs(loss32.item()) < 1e-6


def test_forward_kl_hand_values_on_three_token_vocabulary():
    student_logits, teacher_logprobs, mask = hand_example()
    expected_sum = 9 / 4 * LOG2 - 1 / 4 * LOG3
    assert forward_kl(student_logits, teacher_logprobs, mask).item() == pytest.approx(expected_sum / 2, rel=1e-12)
    summed = forward_kl(student_logits, teacher_logprobs, mask, reduction="sum")
    assert summed.item() == pytest.approx(expected_sum, rel=1e-12)
    assert expected_sum / 2 == pytest.approx(0.642464, abs=1e-6)


def test_forward_kl_gradient_is_student_minus_teacher_over_n_on_masked_positions_only():
    """d/d logits of (1/N) sum_t KL_t = (p_S - p_T) / N at response tokens, exactly 0 elsewhere."""
    student_logits, teacher_logprobs, mask = random_case()
    teacher_logprobs[~mask] = math.nan  # garbage at prompt/padding must not leak into the gradient
    student_logits.requires_grad_(True)
    forward_kl(student_logits, teacher_logprobs, mask).backward()
    n = mask.sum()
    expected = (torch.softmax(student_logits.detach(), -1) - teacher_logprobs.exp()) / n
    expected[~mask] = 0.0
    torch.testing.assert_close(student_logits.grad, expected, rtol=1e-12, atol=1e-15)
    assert torch.all(student_logits.grad[~mask] == 0)

    student_logits, teacher_logprobs, mask = hand_example()
    student_logits.requires_grad_(True)
    forward_kl(student_logits, teacher_logprobs, mask).backward()
    p_s_minus_p_t = [[1 / 8 - 1 / 2, 1 / 8 - 1 / 4, 3 / 4 - 1 / 4], [1 / 2 - 1, 1 / 4, 1 / 4], [0, 0, 0]]
    by_hand = torch.tensor([p_s_minus_p_t], dtype=F64) / 2
    torch.testing.assert_close(student_logits.grad, by_hand, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda s, t, m: forward_kl(s, t, m),
        lambda s, t, m: forward_kl(s, t, m, temperature=1.7, reduction="sum"),
        lambda s, t, m: reverse_kl(s, t, m),
        lambda s, t, m: generalized_jsd(s, t, m, beta=0.3, temperature=0.8),
    ],
    ids=["forward_kl", "forward_kl_temperature_sum", "reverse_kl", "jsd_0.3"],
)
def test_gradcheck_float64(loss_fn):
    student_logits, teacher_logprobs, mask = random_case(seed=1, batch=2, length=3, vocab=5)
    student_logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda logits: loss_fn(logits, teacher_logprobs, mask), (student_logits,))


def test_equation_2_on_a_linear_student_with_explicit_per_token_backward_passes():
    """Eq. 2 printed: sum_t sum_z p_T(z) grad log p_S(z), the ascent direction.

    For a linear student logits_t = W h_t the autograd gradient of the mean forward KL must be
    -(1/N) sum_t sum_z p_T(z | t) grad_W log p_S(z | t), each grad_W log p_S(z | t) taken by its
    own backward pass. A small step along -grad lowers the KL; along +grad it raises it.
    """
    gen = torch.Generator().manual_seed(3)
    batch, length, hidden, vocab = 2, 3, 4, 5
    weight = torch.randn(vocab, hidden, generator=gen, dtype=F64, requires_grad=True)
    hidden_states = torch.randn(batch, length, hidden, generator=gen, dtype=F64)
    teacher_logprobs = torch.log_softmax(torch.randn(batch, length, vocab, generator=gen, dtype=F64), -1)
    mask = torch.tensor([[False, True, True], [True, True, False]])

    loss = forward_kl(hidden_states @ weight.T, teacher_logprobs, mask)
    (autograd_grad,) = torch.autograd.grad(loss, weight)

    printed_eq2 = torch.zeros_like(weight)  # sum_t sum_z p_T(z) grad log p_S(z)
    for b, t in mask.nonzero().tolist():
        student_logprobs = torch.log_softmax(weight @ hidden_states[b, t], -1)  # (V,)
        for z in range(vocab):
            (grad_log_p,) = torch.autograd.grad(student_logprobs[z], weight, retain_graph=True)
            printed_eq2 += teacher_logprobs[b, t, z].exp() * grad_log_p
    n = int(mask.sum())
    torch.testing.assert_close(autograd_grad, -printed_eq2 / n, rtol=1e-12, atol=1e-14)

    with torch.no_grad():
        lr = 0.5
        after_descent = forward_kl(hidden_states @ (weight - lr * autograd_grad).T, teacher_logprobs, mask)
        after_printed_eq2_ascent = forward_kl(hidden_states @ (weight + lr * printed_eq2 / n).T, teacher_logprobs, mask)
        after_wrong_sign = forward_kl(hidden_states @ (weight + lr * autograd_grad).T, teacher_logprobs, mask)
    assert after_descent < loss and after_printed_eq2_ascent < loss
    assert after_wrong_sign > loss


def test_reverse_kl_hand_value():
    """Position 0 of hand_example: KL(p_S || p_T) = 1/8 log(1/4) + 1/8 log(1/2) + 3/4 log 3
    = 3/4 log 3 - 3/8 log 2 = 0.564029 (different from the forward value 0.591781)."""
    student_logits, teacher_logprobs, _ = hand_example()
    mask = torch.tensor([[True, False, False]])
    reverse = reverse_kl(student_logits, teacher_logprobs, mask).item()
    forward = forward_kl(student_logits, teacher_logprobs, mask).item()
    assert reverse == pytest.approx(3 / 4 * LOG3 - 3 / 8 * LOG2, rel=1e-12)
    assert forward == pytest.approx(5 / 4 * LOG2 - 1 / 4 * LOG3, rel=1e-12)


def test_jsd_beta_half_by_hand():
    """p_T = (1/2, 1/4, 1/4), p_S = (1/4, 1/2, 1/4), beta = 1/2: M = (3/8, 3/8, 1/4).
    KL(p_T || M) = 1/2 log(4/3) + 1/4 log(2/3) + 0 = 5/4 log 2 - 3/4 log 3, and KL(p_S || M) is
    the same by symmetry, so JSD = 1/2 (both) = 5/4 log 2 - 3/4 log 3 = 0.042475."""
    student_logits = torch.log(torch.tensor([[[0.25, 0.5, 0.25]]], dtype=F64))
    teacher_logprobs = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]], dtype=F64))
    mask = torch.ones(1, 1, dtype=torch.bool)
    expected = 5 / 4 * LOG2 - 3 / 4 * LOG3
    jsd = generalized_jsd(student_logits, teacher_logprobs, mask, beta=0.5)
    assert jsd.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.042475, abs=1e-6)


def explicit_mixture_jsd(student_logits, teacher_logprobs, mask, beta):
    """The textbook formula with M formed explicitly (float64 oracle for interior beta)."""
    p_s = torch.softmax(student_logits[mask], -1)
    p_t = teacher_logprobs[mask].exp()
    m = beta * p_t + (1 - beta) * p_s
    kl_t_m = (p_t * (p_t.log() - m.log())).sum(-1)
    kl_s_m = (p_s * (p_s.log() - m.log())).sum(-1)
    return (beta * kl_t_m + (1 - beta) * kl_s_m).mean()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_interior_matches_explicit_mixture(beta):
    student_logits, teacher_logprobs, mask = random_case(seed=2)
    got = generalized_jsd(student_logits, teacher_logprobs, mask, beta=beta)
    expected = explicit_mixture_jsd(student_logits, teacher_logprobs, mask, beta)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    student_logits, teacher_logprobs, mask = random_case(seed=4)
    args = (student_logits, teacher_logprobs, mask)
    assert torch.equal(generalized_jsd(*args, beta=0.0), forward_kl(*args))
    assert torch.equal(generalized_jsd(*args, beta=1.0), reverse_kl(*args))
    # the mixture form itself vanishes at the ends, which is why they are defined separately
    assert explicit_mixture_jsd(student_logits, teacher_logprobs, mask, 0.0).item() == pytest.approx(0.0, abs=1e-15)
    assert explicit_mixture_jsd(student_logits, teacher_logprobs, mask, 1.0).item() == pytest.approx(0.0, abs=1e-15)


def test_jsd_limits_approach_forward_and_reverse_kl_without_nan():
    """JSD_beta / beta -> KL(p_T || p_S) as beta -> 0; JSD_beta / (1 - beta) -> KL(p_S || p_T) as beta -> 1."""
    student_logits, teacher_logprobs, mask = random_case(seed=5)
    fkl = forward_kl(student_logits, teacher_logprobs, mask).item()
    rkl = reverse_kl(student_logits, teacher_logprobs, mask).item()
    errors_forward, errors_reverse = [], []
    for eps in (1e-2, 1e-4, 1e-6):
        near_zero = generalized_jsd(student_logits, teacher_logprobs, mask, beta=eps).item()
        near_one = generalized_jsd(student_logits, teacher_logprobs, mask, beta=1 - eps).item()
        errors_forward.append(abs(near_zero / eps - fkl))
        errors_reverse.append(abs(near_one / eps - rkl))
    assert errors_forward[-1] < 1e-5 * fkl and errors_reverse[-1] < 1e-5 * rkl
    assert errors_forward == sorted(errors_forward, reverse=True)
    assert errors_reverse == sorted(errors_reverse, reverse=True)

    for dtype in (torch.float32, F64):  # finite values and gradients right next to both ends
        for beta, limit in ((1e-6, fkl), (1 - 1e-6, rkl)):
            logits = student_logits.to(dtype).requires_grad_(True)
            value = generalized_jsd(logits, teacher_logprobs.to(dtype), mask, beta=beta)
            value.backward()
            scale = beta if beta < 0.5 else 1 - beta
            assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
            assert value.item() / scale == pytest.approx(limit, rel=1e-4 if dtype == torch.float32 else 1e-5)


def test_temperature_applies_to_both_distributions():
    """tau divides the student logits and the teacher log-probs (renormalised): TRL's convention."""
    student_logits, teacher_logprobs, mask = random_case(seed=6)
    tau = 2.5
    rescaled_teacher = torch.log_softmax(teacher_logprobs / tau, -1)
    torch.testing.assert_close(
        forward_kl(student_logits, teacher_logprobs, mask, temperature=tau),
        forward_kl(student_logits / tau, rescaled_teacher, mask),
        rtol=1e-12, atol=0,
    )
    torch.testing.assert_close(
        generalized_jsd(student_logits, teacher_logprobs, mask, beta=0.4, temperature=tau),
        generalized_jsd(student_logits / tau, rescaled_teacher, mask, beta=0.4),
        rtol=1e-12, atol=0,
    )
    assert forward_kl(student_logits, teacher_logprobs, mask, temperature=tau) != forward_kl(
        student_logits, teacher_logprobs, mask
    )


def test_teacher_is_a_constant():
    student_logits, teacher_logprobs, mask = random_case(seed=7)
    teacher_logprobs.requires_grad_(True)
    forward_kl(student_logits.requires_grad_(True), teacher_logprobs, mask).backward()
    assert teacher_logprobs.grad is None and student_logits.grad is not None


def test_bad_inputs_raise_with_a_message():
    student_logits, teacher_logprobs, mask = random_case()
    with pytest.raises(ValueError, match="top k"):
        forward_kl(student_logits, teacher_logprobs[..., :3], mask)
    with pytest.raises(ValueError, match="mask has shape"):
        forward_kl(student_logits, teacher_logprobs, mask[:, :2])
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student_logits, teacher_logprobs, mask, beta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(student_logits, teacher_logprobs, mask, reduction="batchmean")
