"""Fused (hidden states + LM head, chunked over tokens) distillation equals the plain form."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from losses import kd_chunk, linear_head
from losses.kd import forward_kl, generalized_jsd, reverse_kl
from losses.kd_fused import TeacherHead, TeacherLogprobs, TeacherTopK, fused_kd_loss
from losses.kd_topk import forward_kl_topk

F64 = torch.float64


def make_case(dtype=F64, seed=0, batch=3, length=7, hidden=6, vocab=11, teacher_hidden=5):
    """By default 13 response tokens out of 21 (chunk sizes 2, 5 do not divide the token count)."""
    gen = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(batch, length, hidden, generator=gen, dtype=dtype)
    weight = 0.7 * torch.randn(vocab, hidden, generator=gen, dtype=dtype)
    teacher_states = torch.randn(batch, length, teacher_hidden, generator=gen, dtype=dtype)
    teacher_weight = torch.randn(vocab, teacher_hidden, generator=gen, dtype=dtype)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):  # a prompt of 1-3 tokens, then the response; row 1 also padded
        mask[row, row % 3 + 1 :] = True
    mask[1, 5:] = False
    return student_hidden, weight, teacher_states, teacher_weight, mask


def teacher_forms(teacher_states, teacher_weight, mask):
    """The same local teacher, as precomputed log-probs and as (hidden, LM head)."""
    logprobs = torch.log_softmax(teacher_states @ teacher_weight.T, -1)  # (B, T, V)
    logprobs = logprobs.masked_fill(~mask[..., None], math.nan)  # never read outside the mask
    return {"logprobs": TeacherLogprobs(logprobs), "head": TeacherHead(teacher_states, teacher_weight)}, logprobs


def value_and_grads(loss_fn, student_hidden, weight):
    student_hidden = student_hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = loss_fn(student_hidden, weight)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (student_hidden, weight))
    return loss.detach(), grad_hidden, grad_weight


def assert_same(fused, plain, student_hidden, weight, rtol, atol):
    """Value and both gradients of ``fused(h, w)`` equal those of ``plain(h, w)``."""
    expected_all = value_and_grads(plain, student_hidden, weight)
    for got, expected in zip(value_and_grads(fused, student_hidden, weight), expected_all):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def plain_divergence(logits, teacher_logprobs, mask, divergence, beta, temperature):
    """The reference form of losses/kd.py that fused_kd_loss(divergence=...) must equal."""
    if divergence == "forward":
        return forward_kl(logits, teacher_logprobs, mask, temperature=temperature)
    if divergence == "reverse":
        return reverse_kl(logits, teacher_logprobs, mask, temperature=temperature)
    return generalized_jsd(logits, teacher_logprobs, mask, beta, temperature=temperature)


@pytest.mark.parametrize("dtype, atol", [(F64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("teacher_kind", ["logprobs", "head"])
@pytest.mark.parametrize("divergence, beta, temperature",
                         [("forward", None, 1.0), ("forward", None, 2.0), ("jsd", 0.3, 1.0), ("reverse", None, 0.7)])
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 13, 64])
def test_full_vocab_fused_equals_plain(dtype, atol, teacher_kind, divergence, beta, temperature, chunk_size):
    student_hidden, weight, teacher_states, teacher_weight, mask = make_case(dtype)
    teachers, teacher_logprobs = teacher_forms(teacher_states, teacher_weight, mask)

    def plain(h, w):
        return plain_divergence(h @ w.T, teacher_logprobs, mask, divergence, beta, temperature)

    def fused(h, w):
        teacher = teachers[teacher_kind]
        return fused_kd_loss(h, w, teacher, mask, divergence=divergence, beta=beta, temperature=temperature,
                             chunk_size=chunk_size)

    assert_same(fused, plain, student_hidden, weight, 1e-5, atol)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 13, 64])
def test_topk_fused_equals_plain(tail, chunk_size):
    student_hidden, weight, teacher_states, teacher_weight, mask = make_case()
    top = torch.log_softmax(teacher_states @ teacher_weight.T, -1).topk(4, dim=-1)
    ids, logprobs = top.indices.clone(), top.values.clone()
    logprobs[0, 3, 3] = -math.inf  # padding
    ids[1, 2, 2] = ids[1, 2, 0]  # duplicate

    def plain(h, w):
        return forward_kl_topk(h @ w.T, ids, logprobs, mask, tail=tail)

    def fused(h, w):
        return fused_kd_loss(h, w, TeacherTopK(ids, logprobs, tail), mask, chunk_size=chunk_size)

    assert_same(fused, plain, student_hidden, weight, 1e-5, 1e-12)


def test_sum_reduction_frozen_head_and_no_grad():
    student_hidden, weight, teacher_states, teacher_weight, mask = make_case()
    teacher = TeacherHead(teacher_states, teacher_weight)
    teacher_logprobs = teacher_forms(teacher_states, teacher_weight, mask)[1]
    plain_sum = forward_kl(student_hidden @ weight.T, teacher_logprobs, mask, reduction="sum")
    hidden = student_hidden.clone().requires_grad_(True)
    fused_sum = fused_kd_loss(hidden, weight, teacher, mask, reduction="sum", chunk_size=4)  # weight frozen
    torch.testing.assert_close(fused_sum, plain_sum, rtol=1e-12, atol=0)
    fused_sum.backward()
    assert hidden.grad is not None and torch.all(hidden.grad[~mask] == 0)
    with torch.no_grad():
        no_grad_mean = fused_kd_loss(student_hidden, weight, teacher, mask)
        torch.testing.assert_close(no_grad_mean, plain_sum / mask.sum(), rtol=1e-12, atol=0)


def test_no_response_tokens_gives_zero():
    student_hidden, weight, teacher_states, teacher_weight, _ = make_case()
    empty = torch.zeros(student_hidden.shape[:2], dtype=torch.bool)
    hidden = student_hidden.clone().requires_grad_(True)
    loss = fused_kd_loss(hidden, weight, TeacherHead(teacher_states, teacher_weight), empty)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)


def small_case():
    """2 x 4 positions (5 response tokens), hidden 3, vocabulary 5: small enough for gradcheck."""
    return make_case(batch=2, length=4, hidden=3, vocab=5, teacher_hidden=2)


@pytest.mark.parametrize("divergence, beta, temperature", [("forward", None, 1.0), ("forward", None, 1.5),
                                                      ("jsd", 0.4, 1.0), ("reverse", None, 1.0)],
                         ids=["kl", "kl-tau", "jsd", "reverse"])
def test_gradcheck_float64_full_vocab(divergence, beta, temperature):
    """The forward KL uses the closed-form chunk gradient (eq. 2 on the logits), the others
    autograd; for those two, a teacher with exact zeros (-inf log-probs) exercises the 0 log 0
    terms (the reverse KL is infinite there, as the true KL is, so it gets a teacher without)."""
    student_hidden, weight, teacher_states, teacher_weight, mask = small_case()
    teacher_logprobs = torch.log_softmax(teacher_states @ teacher_weight.T, -1)
    if divergence != "reverse":
        teacher_logprobs[..., 0] = -math.inf
        teacher_logprobs = torch.log_softmax(teacher_logprobs, -1)  # renormalised with p_T(token 0) = 0
    teacher = TeacherLogprobs(teacher_logprobs)
    inputs = (student_hidden.requires_grad_(True), weight.requires_grad_(True))
    assert torch.autograd.gradcheck(
        lambda h, w: fused_kd_loss(h, w, teacher, mask, divergence=divergence, beta=beta, temperature=temperature,
                                   chunk_size=2), inputs
    )


@pytest.mark.parametrize("tail", [True, False])
def test_gradcheck_float64_topk(tail):
    """The closed-form top-k gradient, with a padded entry, a duplicate and an all-padding row."""
    student_hidden, weight, teacher_states, teacher_weight, mask = small_case()
    top = torch.log_softmax(teacher_states @ teacher_weight.T, -1).topk(3, dim=-1)
    ids, logprobs = top.indices.clone(), top.values.clone()
    logprobs[0, 1, 2] = -math.inf
    ids[0, 2, 1] = ids[0, 2, 0]
    logprobs[1, 0, :] = -math.inf
    teacher = TeacherTopK(ids, logprobs, tail)
    inputs = (student_hidden.requires_grad_(True), weight.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda h, w: fused_kd_loss(h, w, teacher, mask, chunk_size=2), inputs)


def test_topk_covering_the_vocabulary_equals_full_forward_kl():
    """k = V: the tail is empty on both sides and the fused top-k form is the full forward KL."""
    student_hidden, weight, teacher_states, teacher_weight, mask = make_case()
    teacher_logprobs = torch.log_softmax(teacher_states @ teacher_weight.T, -1)
    ids = torch.argsort(torch.rand(teacher_logprobs.shape, generator=torch.Generator().manual_seed(0)), dim=-1)
    teacher = TeacherTopK(ids, teacher_logprobs.gather(-1, ids))

    def plain(h, w):
        return forward_kl(h @ w.T, teacher_logprobs, mask)

    def fused(h, w):
        return fused_kd_loss(h, w, teacher, mask, chunk_size=4)

    assert_same(fused, plain, student_hidden, weight, 1e-10, 1e-13)


@pytest.mark.parametrize("tail", [True, False])
def test_topk_with_huge_logits_stays_finite_and_equal(tail):
    """Logits of magnitude ~500 in float32: the tail mass is far below float32's smallest number
    in linear space, but both forms work in log space and agree."""
    student_hidden, weight, teacher_states, teacher_weight, mask = make_case(torch.float32)
    weight = 80 * weight
    assert (student_hidden @ weight.T).abs().max() > 300
    top = torch.log_softmax(teacher_states @ teacher_weight.T, -1).topk(3, dim=-1)
    teacher = TeacherTopK(top.indices, top.values, tail)
    fused = value_and_grads(lambda h, w: fused_kd_loss(h, w, teacher, mask, chunk_size=4), student_hidden, weight)
    plain = value_and_grads(
        lambda h, w: forward_kl_topk(h @ w.T, top.indices, top.values, mask, tail), student_hidden, weight
    )
    assert all(torch.isfinite(t).all() for t in fused)
    for got, expected in zip(fused, plain):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any *new* tensor an operator returns (views of
    existing storage, such as a reshape of an input, are not new memory)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def counts(self, value: torch.Tensor) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        existing = {t.untyped_storage().data_ptr() for t in inputs}
        for value in tree_flatten(out)[0]:
            if (isinstance(value, torch.Tensor) and self.counts(value)
                    and value.untyped_storage().data_ptr() not in existing):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("teacher_kind", ["logprobs", "head", "topk"])
def test_never_materialises_all_logits(teacher_kind):
    """40 response tokens, vocabulary 50, chunks of 8: no tensor may exceed 8 x 50 elements
    (the weight gradient is 50 x 4 = 200), while the plain form builds 40 x 50 = 2000."""
    batch, length, hidden, vocab, chunk = 2, 20, 4, 50, 8
    student_hidden, weight, teacher_states, teacher_weight, _ = make_case(
        torch.float32, batch=batch, length=length, hidden=hidden, vocab=vocab, teacher_hidden=3
    )
    mask = torch.ones(batch, length, dtype=torch.bool)
    if teacher_kind == "topk":
        top = torch.log_softmax(teacher_states @ teacher_weight.T, -1).topk(5, dim=-1)
        teacher = TeacherTopK(top.indices, top.values)
    elif teacher_kind == "head":
        teacher = TeacherHead(teacher_states, teacher_weight)
    else:
        # a [B, T, V] input is itself that size; what matters is that nothing *new* is
        teacher = TeacherLogprobs(torch.log_softmax(teacher_states @ teacher_weight.T, -1))
    hidden_states = student_hidden.requires_grad_(True)
    weight = weight.requires_grad_(True)
    with LargestTensor() as probe:
        fused_kd_loss(hidden_states, weight, teacher, mask, chunk_size=chunk).backward()
    assert probe.largest <= chunk * vocab < batch * length * vocab

    with LargestTensor() as probe:  # the probe does see the plain form's (N, V) tensors
        teacher_logprobs = torch.log_softmax(teacher_states @ teacher_weight.T, -1)
        forward_kl(hidden_states @ weight.T, teacher_logprobs, mask).backward()
    assert probe.largest == batch * length * vocab


def test_bad_teacher_raises_with_a_message():
    student_hidden, weight, teacher_states, teacher_weight, mask = make_case()
    with pytest.raises(TypeError, match="TeacherLogprobs, TeacherHead or TeacherTopK"):
        fused_kd_loss(student_hidden, weight, teacher_states, mask)
    top = torch.log_softmax(teacher_states @ teacher_weight.T, -1).topk(2, dim=-1)
    with pytest.raises(ValueError, match="forward KL only"):
        fused_kd_loss(student_hidden, weight, TeacherTopK(top.indices, top.values), mask, divergence="jsd", beta=0.5)
    teacher = TeacherHead(teacher_states, teacher_weight)
    with pytest.raises(ValueError, match="takes none"):  # a beta beside a KL is refused, not ignored
        fused_kd_loss(student_hidden, weight, teacher, mask, beta=0.5)
    with pytest.raises(ValueError, match="needs 0 < beta < 1"):
        fused_kd_loss(student_hidden, weight, teacher, mask, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="expected one of"):
        fused_kd_loss(student_hidden, weight, teacher, mask, divergence="kl")
    with pytest.raises(ValueError, match=r"\[V, H_T\]"):
        fused_kd_loss(student_hidden, weight, TeacherHead(teacher_states, teacher_weight[:3]), mask)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_kd_loss(student_hidden, weight, TeacherHead(teacher_states, teacher_weight), mask, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# An LM head stored in bf16 (as a bf16 model holds it), computed in float32


BF16 = torch.bfloat16


def bf16_case():
    """make_case in float32 with both heads rounded to bf16: (hidden, head bf16, head as float32,
    teacher states, teacher head bf16, teacher head as float32, mask). Upcasting bf16 is exact,
    so the float32 copies hold the very numbers the bf16 heads store."""
    student_hidden, weight, teacher_states, teacher_weight, mask = make_case(torch.float32)
    weight, teacher_weight = weight.to(BF16), teacher_weight.to(BF16)
    return (student_hidden, weight, weight.float(), teacher_states, teacher_weight,
            teacher_weight.float(), mask)


def teacher_of(kind, teacher_states, teacher_weight, mask, tail=True):
    """The local teacher in the form `kind` (its head in the dtype given), or its top 4 + tail."""
    if kind == "head":
        return TeacherHead(teacher_states, teacher_weight)
    logprobs = torch.log_softmax(teacher_states @ teacher_weight.float().T, -1)  # (B, T, V)
    if kind == "logprobs":
        return TeacherLogprobs(logprobs)
    top = logprobs.topk(4, dim=-1)
    return TeacherTopK(top.indices, top.values, tail)


@pytest.mark.parametrize("teacher_kind, divergence, beta, temperature, tail", [
    ("logprobs", "forward", None, 1.0, True), ("head", "forward", None, 1.0, True),
    ("head", "forward", None, 2.0, True), ("head", "jsd", 0.3, 1.0, True),
    ("head", "reverse", None, 0.7, True), ("topk", "forward", None, 1.0, True),
    ("topk", "forward", None, 1.0, False),
])
@pytest.mark.parametrize("chunk_size, vocab_chunk_size", [(5, 3), (13, None), (2, 11)])
def test_bf16_head_equals_float32_path_on_the_same_weights(teacher_kind, divergence, beta, temperature,
                                                           tail, chunk_size, vocab_chunk_size):
    """Student (and TeacherHead) LM heads stored in bf16, hidden states float32: the value and the
    gradient w.r.t. the hidden states equal the float32 path given float32 copies of the same bf16
    heads. Tolerance (rtol 1e-5, atol 1e-6, as the float32 tests above): upcasting bf16 is exact,
    so both sides multiply the same float32 numbers; they differ only in the order of float32
    sums (the logits by vocabulary blocks of 3 rows, the hidden-state gradient summed over those
    blocks, the teacher's log-softmax in place), a reassociation of at most V = 11 terms of O(1)
    at a time: a few ulp, ~1e-6 relative. The weight gradient, still supported for a bf16 head,
    is accumulated in float32 and rounded once to bf16: it equals the float32 path's rounded to
    bf16 within bf16's own tolerance (rtol 1.6e-2: one bf16 ulp, for an element whose float32
    value falls near a rounding boundary)."""
    hidden, weight, weight_f32, teacher_states, teacher_weight, teacher_weight_f32, mask = bf16_case()
    kwargs = dict(divergence=divergence, beta=beta, temperature=temperature, chunk_size=chunk_size)

    def run(head, teacher_head, **extra):
        teacher = teacher_of(teacher_kind, teacher_states, teacher_head, mask, tail)
        h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
        loss = fused_kd_loss(h, w, teacher, mask, **kwargs, **extra)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    loss, grad_hidden, grad_weight = run(weight, teacher_weight, vocab_chunk_size=vocab_chunk_size)
    loss_f32, grad_hidden_f32, grad_weight_f32 = run(weight_f32, teacher_weight_f32)
    assert loss.dtype == grad_hidden.dtype == torch.float32 and grad_weight.dtype == BF16
    torch.testing.assert_close(loss, loss_f32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hidden, grad_hidden_f32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, grad_weight_f32.to(BF16))


def test_bf16_hidden_and_head_on_a_cpu_without_bf16_kernels(monkeypatch):
    """A bf16 model on a CPU without bf16 matmul kernels (this one): hidden states and head both
    bf16. The matmuls run in float32 on upcast blocks, so the value equals the float32 path on the
    upcast inputs (rtol 1e-5, atol 1e-6: float32 reassociation only, as above); the hidden-state
    gradient comes back in the hidden states' dtype, bf16, i.e. that float32 gradient rounded
    once (bf16's own tolerance)."""
    monkeypatch.setattr(linear_head, "native_matmul", lambda dtype, device: False)
    hidden, weight, weight_f32, teacher_states, teacher_weight, teacher_weight_f32, mask = bf16_case()
    hidden = hidden.to(BF16)
    results = []
    for h, w, teacher_w in ((hidden, weight, teacher_weight), (hidden.float(), weight_f32, teacher_weight_f32)):
        h = h.clone().requires_grad_(True)
        loss = fused_kd_loss(h, w, TeacherHead(teacher_states, teacher_w), mask, chunk_size=4, vocab_chunk_size=4)
        loss.backward()
        results.append((loss.detach(), h.grad))
    (loss, grad), (loss_f32, grad_f32) = results
    assert loss.dtype == torch.float32 and grad.dtype == BF16
    torch.testing.assert_close(loss, loss_f32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_f32.to(BF16))


def test_bf16_matmul_where_the_device_has_kernels(monkeypatch):
    """Where bf16 matmuls are native (a GPU; here pretended), bf16 hidden states and head multiply
    in bf16 as the model's own LM head does: equal to the plain form on those bf16 logits, upcast.
    The value: the same bf16 products on both sides, then float32 (rtol 1e-5). The hidden-state
    gradient is a bf16 matmul on both sides, but d loss / d logits is rounded to bf16 before the
    1/N of the mean in the plain form and after it here, so an element differs by about one bf16
    ulp (2^-8) of the largest terms it sums: atol 2^-7 of the largest gradient, rtol 1.6e-2."""
    monkeypatch.setattr(linear_head, "native_matmul", lambda dtype, device: True)
    hidden, weight, _, teacher_states, teacher_weight, _, mask = bf16_case()
    hidden = hidden.to(BF16)
    teacher_logprobs = teacher_forms(teacher_states, teacher_weight.float(), mask)[1]

    def plain(h, w):
        return forward_kl(h @ w.T, teacher_logprobs, mask)  # (B, T, V) bf16 logits, upcast inside

    def fused(h, w):
        return fused_kd_loss(h, w, TeacherLogprobs(teacher_logprobs), mask, chunk_size=4, vocab_chunk_size=4)

    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    loss, expected = fused(h1, weight), plain(h2, weight)
    (loss + expected).backward()
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1.6e-2, atol=2**-7 * h2.grad.abs().max().item())


class LargestFloat32Tensor(LargestTensor):
    """LargestTensor counting float32 tensors only."""

    def counts(self, value: torch.Tensor) -> bool:
        return value.dtype == torch.float32


@pytest.mark.parametrize("teacher_kind", ["logprobs", "head", "topk"])
def test_bf16_head_is_never_copied_whole_to_float32(teacher_kind):
    """Heads [V, H] = [64, 16] in bf16, 40 response tokens in chunks of 8, vocabulary blocks of 16
    rows: no float32 tensor created may reach V x H = 1024 elements (the largest are the (40, 16)
    response hidden states and their gradient, 640, the (8, 64) chunk logits, 512, and the
    (16, 16) upcast block, 256). The plain form, which needs the float32 head, does create it; so
    does a weight gradient, whose float32 (V, H) accumulator exists only when the head requires
    grad."""
    batch, length, hidden, vocab, chunk, vocab_chunk = 2, 20, 16, 64, 8, 16
    student_hidden, weight, teacher_states, teacher_weight, _ = make_case(
        torch.float32, batch=batch, length=length, hidden=hidden, vocab=vocab, teacher_hidden=hidden
    )
    weight, teacher_weight = weight.to(BF16), teacher_weight.to(BF16)
    mask = torch.ones(batch, length, dtype=torch.bool)
    teacher = teacher_of(teacher_kind, teacher_states, teacher_weight, mask)
    hidden_states = student_hidden.requires_grad_(True)

    def fused():
        fused_kd_loss(hidden_states, weight, teacher, mask, chunk_size=chunk, vocab_chunk_size=vocab_chunk).backward()

    with LargestFloat32Tensor() as probe:
        fused()
    assert probe.largest <= max(batch * length * hidden, chunk * vocab) < vocab * hidden

    with LargestFloat32Tensor() as probe:  # the probe does see the plain form's float32 head
        teacher_logprobs = torch.log_softmax(teacher_states @ teacher_weight.float().T, -1)
        forward_kl(hidden_states @ weight.float().T, teacher_logprobs, mask).backward()
    assert probe.largest >= vocab * hidden

    weight.requires_grad_(True)
    with LargestFloat32Tensor() as probe:
        fused()
    assert probe.largest == vocab * hidden and weight.grad.dtype == BF16


@pytest.mark.parametrize("teacher_kind", ["logprobs", "head"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_row_blocks_equal_plain(monkeypatch, teacher_kind, temperature):
    """The (C, V) work runs a few rows at a time (kd_chunk.ROW_BLOCK_ELEMENTS, 10 rows at V = 200064, the
    whole chunk at the sizes above): with 2-row blocks the forward KL still equals the plain form
    in float64, value and both gradients, to 1e-12."""
    monkeypatch.setattr(kd_chunk, "ROW_BLOCK_ELEMENTS", 2 * 11)
    student_hidden, weight, teacher_states, teacher_weight, mask = make_case()
    teachers, teacher_logprobs = teacher_forms(teacher_states, teacher_weight, mask)

    def plain(h, w):
        return forward_kl(h @ w.T, teacher_logprobs, mask, temperature=temperature)

    def fused(h, w):
        return fused_kd_loss(h, w, teachers[teacher_kind], mask, temperature=temperature, chunk_size=5)

    assert_same(fused, plain, student_hidden, weight, 1e-10, 1e-12)


def test_bad_vocab_chunk_size_raises():
    student_hidden, weight, teacher_states, teacher_weight, mask = make_case()
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        fused_kd_loss(student_hidden, weight, TeacherHead(teacher_states, teacher_weight), mask, vocab_chunk_size=0)
