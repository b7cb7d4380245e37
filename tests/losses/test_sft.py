"""Masked cross-entropy for SFT: prompt and padding excluded."""
import math

import pytest
import torch

from losses.sft import masked_cross_entropy

LOG2 = math.log(2.0)
F64 = torch.float64


def hand_example():
    """Logits (0, 0, log 2) everywhere give p = (1/4, 1/4, 1/2) over a vocabulary of 3.

    Row 0: position 0 is prompt (label -100, NaN logits: ignored); positions 1, 2 are response
    with labels 2 and 0: -log(1/2) - log(1/4) = 3 log 2.
    Row 1: position 0 response with label 1: -log(1/4) = 2 log 2; positions 1, 2 padding.
    N = 3 response tokens, mean = 5/3 log 2 = 1.155245.
    """
    logits = torch.tensor([0.0, 0.0, LOG2], dtype=F64).repeat(2, 3, 1)
    logits[0, 0] = math.nan
    labels = torch.tensor([[-100, 2, 0], [1, -100, -100]])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    return logits, labels, mask


def test_hand_values():
    logits, labels, mask = hand_example()
    assert masked_cross_entropy(logits, labels, mask).item() == pytest.approx(5 / 3 * LOG2, rel=1e-12)
    assert 5 / 3 * LOG2 == pytest.approx(1.155245, abs=1e-6)
    assert masked_cross_entropy(logits, labels, mask, reduction="sum").item() == pytest.approx(5 * LOG2, rel=1e-12)


def test_gradient_is_probabilities_minus_one_hot_over_n_on_response_only():
    logits, labels, mask = hand_example()
    logits.requires_grad_(True)
    masked_cross_entropy(logits, labels, mask).backward()
    p = torch.tensor([0.25, 0.25, 0.5], dtype=F64)
    expected = torch.zeros(2, 3, 3, dtype=F64)
    for b, t in mask.nonzero().tolist():
        expected[b, t] = (p - torch.nn.functional.one_hot(labels[b, t], 3)) / 3
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=0)


def test_gradcheck_and_low_precision_input():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 4), generator=gen)
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    assert torch.autograd.gradcheck(lambda x: masked_cross_entropy(x, labels, mask), (logits,))
    low = masked_cross_entropy(logits.detach().bfloat16(), labels, mask)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(masked_cross_entropy(logits.detach(), labels, mask).item(), rel=2e-2)


def test_no_response_tokens_is_zero_and_bad_shapes_raise():
    logits, labels, _ = hand_example()
    assert masked_cross_entropy(logits[:, 1:], labels[:, 1:], torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        masked_cross_entropy(logits, labels[:, :2], torch.ones(2, 2, dtype=torch.bool))
