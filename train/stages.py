"""The stages' losses on a model and a batch, in the form train/loop.py runs.

Each stage returns a *sum* over its loss units and the number of units comes from
`loss_units`; the loop divides by the units of the global batch (see train/loop.py).
Metrics are sums over the same units, so the loop's division turns them into means.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from data.batching import Batch, collate
from data.text import repeated_ngram_fraction, repetition
from losses.dpo import dpo_loss, sequence_logprobs
from losses.kd import check_divergence
from losses.kd_fused import fused_kd_loss
from losses.sft import masked_cross_entropy
from model.lora import lora_disabled
from rollout.sampler import Sampler, SamplingParams, generate
from rollout.teachers import FullLogprobs, TopKLogprobs

from .config import ConfigError
from .fsdp2 import copy_into, full_tensor

def batch_hidden(model, batch: Batch) -> torch.Tensor:
    """Final hidden states (B, T, H) of a right-padded batch (`collate`'s layout).

    No attention mask is passed: causal attention already keeps every real token from seeing
    the padding after it, and the default positions 0..T-1 are right for right padding. That
    keeps the fused attention kernels usable (a mask would force the math path on CUDA, far
    too big for 30-minute prompts).
    """
    return model.hidden_states(batch.input_ids, None, batch.audio_features, batch.audio_lengths)


class SFTStage:
    """Stage 1: teacher-forced cross-entropy on (audio, instruction) -> reference summary."""

    name = "sft"
    prepare_uses_model = False  # nothing to gather for it under fsdp2 (train/loop.py whole_model)

    def prepare(self, model, batch: Batch) -> Batch:
        return batch

    def loss_units(self, batch: Batch) -> int:
        return int(batch.loss_mask.sum())

    def loss(self, model, batch: Batch):
        logits, labels, mask = response_window(model, batch)  # (B, L, V), (B, L), (B, L)
        return masked_cross_entropy(logits, labels, mask, reduction="sum"), {}


def response_hidden(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row response states in a right-padded window: hidden (B, L, H), labels (B, L), mask (B, L).

    L is the longest response of the batch; row b's window starts at the position that predicts
    its first response token (prompt_length - 1). The layout is that of the sampler's Rollout
    and of the teachers' scores, so the three line up position by position.
    """
    hidden = batch_hidden(model, batch)
    response_lengths = batch.loss_mask.sum(-1)  # (B,)
    width = max(int(response_lengths.max()), 1)
    offsets = torch.arange(width, device=hidden.device)  # (L,)
    positions = (batch.prompt_lengths[:, None] - 1 + offsets).clamp(max=hidden.shape[1] - 2)  # (B, L)
    window = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, L, H)
    labels = batch.input_ids.gather(1, positions + 1)  # (B, L) the token each position predicts
    mask = offsets[None, :] < response_lengths[:, None]  # (B, L)
    return window, labels, mask


def response_window(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`response_hidden` through the LM head: logits (B, L, V), labels (B, L), mask (B, L);
    only B x L positions ever reach the LM head."""
    window, labels, mask = response_hidden(model, batch)
    return model.decoder.logits(window), labels, mask


class DPOStage:
    """Stage 3: DPO (eq. 3) on judged pairs, the reference being the model with LoRA disabled.

    Batches hold pairs as consecutive rows: row 2i is y+ and row 2i+1 is y- of pair i, with the
    same prompt and clip. Reference log-probabilities are computed once per pair (in `prepare`,
    no gradient) and kept for the rest of the run.

    pi_ref is the starting checkpoint (the KD model). The stage's adapters are switched off for
    it, and every other parameter that trains (the projector) is swapped back to its value at
    construction, so a pair first met after some steps is still scored by pi_ref, and a resumed
    run computes the same references.

    Under run.strategy = "fsdp2" the values kept are whole (taken before sharding, or gathered if
    the stage is built after it). The loop runs `prepare` and the held-out evaluation on the model
    gathered whole (train/loop.py whole_model), so the swap writes into the gathered weights the
    reference forward uses, and the shards, which the training forward gathers from, are never
    touched; called on the sharded model, each rank writes its own shard (`copy_into`) and the
    next gathering of the projector sees it.
    """

    name = "dpo"

    def __init__(self, model, beta: float = 0.1, label_smoothing: float = 0.0):
        self.beta, self.label_smoothing = beta, label_smoothing
        self.reference_logps: dict[str, tuple[float, float]] = {}
        self.reference_computations = 0
        self.reference_params = {  # trainable tensors outside the LoRA adapters, whole, as pi_ref has them
            name: full_tensor(param.detach()).clone() for name, param in model.named_parameters()
            if param.requires_grad and not name.endswith((".lora_a", ".lora_b"))
        }

    @contextlib.contextmanager
    def reference_model(self, model):
        """The model as pi_ref inside the block: adapters off, other trainable tensors at their start."""
        params = dict(model.named_parameters())
        current = {name: params[name].detach().clone() for name in self.reference_params}  # whole, or shards
        for name, value in self.reference_params.items():
            copy_into(params[name], value)
        try:
            with lora_disabled(model):
                yield model
        finally:
            for name, value in current.items():
                copy_into(params[name], value)

    def prepare(self, model, batch: Batch) -> Batch:
        pair_ids = batch.ids[0::2]
        if any(pid not in self.reference_logps for pid in pair_ids):
            with self.reference_model(model):
                logits, labels, mask = response_window(model, batch)
                logps = sequence_logprobs(logits, labels, mask).tolist()  # (2P,)
            self.reference_computations += 1
            for i, pid in enumerate(pair_ids):
                self.reference_logps[pid] = (logps[2 * i], logps[2 * i + 1])
        return batch

    def loss_units(self, batch: Batch) -> int:
        return len(batch.ids) // 2

    def loss(self, model, batch: Batch):
        logits, labels, mask = response_window(model, batch)
        policy = sequence_logprobs(logits, labels, mask)  # (2P,) log pi(y|x)
        reference = torch.tensor([self.reference_logps[pid] for pid in batch.ids[0::2]],
                                 dtype=policy.dtype, device=policy.device)  # (P, 2)
        loss_sum, metrics = dpo_loss(policy[0::2], policy[1::2], reference[:, 0], reference[:, 1],
                                     beta=self.beta, label_smoothing=self.label_smoothing, reduction="sum")
        return loss_sum, {key: value.sum() for key, value in metrics.items()}


@dataclass
class KDBatch:
    batch: Batch  # prompt + the response being distilled (the student's sample or the reference)
    teacher: TopKLogprobs | FullLogprobs  # the teacher's log-probs on that response, (B, L, ...)
    on_policy: bool
    ended_with_eos: list[bool]
    repetition: list[float]


class KDStage:
    """Stage 2: on-policy distillation (eq. 1; gradient eq. 2) from a teacher reading the transcript.

    prepare: with probability `on_policy_fraction` (lambda; 1 in the paper) the student samples
    its own responses (eval mode, no dropout, a seed drawn from the run's RNG so that a resumed
    run samples the same); otherwise the reference responses are used (supervised KD). The
    teacher scores those responses given *its* prompt (transcript + instruction).
    loss: the divergence between teacher and student at every response position, from the
    student's hidden states and LM-head weight (losses.kd_fused.fused_kd_loss: no [tokens, V]
    logits), by name: "forward" KL by default (the paper), "reverse" KL or "jsd" (generalized
    JSD with 0 < beta < 1, `beta` is used by it alone) for full-vocabulary teachers; plus
    `ce_weight` times the cross-entropy of the same tokens. The sampling engine is injected like
    the teacher (`sampler`, rollout.generate by default), so another engine needs no change here.
    """

    name = "kd"

    def __init__(self, teacher, *, pad_token_id: int, eos_token_ids=(), max_new_tokens: int = 256,
                 temperature: float = 1.0,
                 on_policy_fraction: float = 1.0, divergence: str = "forward", beta: float | None = None,
                 ce_weight: float = 0.0, decode: Callable[[list[int]], str] | None = None,
                 sampler: Sampler = generate):
        try:
            check_divergence(divergence, beta)
        except ValueError as error:
            raise ConfigError(f"kd.divergence / kd.beta: {error}") from None
        if divergence != "forward" and getattr(teacher, "top_k", None) is not None:
            raise ConfigError(f"kd.divergence={divergence!r} needs a full-vocabulary teacher; a top-k (API) "
                             "teacher supports the forward KL only (top-k reverse KL is unstable, verl PR #5041)")
        self.teacher, self.pad_token_id = teacher, pad_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.on_policy_fraction, self.ce_weight = on_policy_fraction, ce_weight
        self.divergence, self.beta = divergence, beta
        self.decode = decode  # token ids -> text, for the repetition the eval table reports; None: token 4-grams
        self.sampler = sampler  # draws the on-policy responses, injected as the teacher is (rollout.sampler.Sampler)

    def prepare(self, model, batch: Batch) -> KDBatch:
        on_policy = bool(torch.rand(()) < self.on_policy_fraction)
        if on_policy:
            params = SamplingParams(self.max_new_tokens, temperature=self.temperature,
                                    eos_token_ids=self.eos_token_ids, seed=int(torch.randint(0, 2**31 - 1, ())))
            rollout = self.sampler(model, batch.prompts, params, audio_features=batch.audio_features,
                                   audio_lengths=batch.audio_lengths)
            responses = [rollout.tokens[i, :n].tolist() for i, n in enumerate(rollout.lengths.tolist())]
        else:
            responses = [e.response_ids for e in batch.examples]
        examples = [replace(e, response_ids=r) for e, r in zip(batch.examples, responses)]
        new_batch = collate(examples, self.pad_token_id).to(batch.input_ids.device)
        teacher_prompts = [self.teacher.prompt(e.transcript, e.instruction) for e in examples]
        scored = self.teacher.score(teacher_prompts, responses)
        return KDBatch(new_batch, scored, on_policy,
                       ended_with_eos=[bool(r) and r[-1] in self.eos_token_ids for r in responses],
                       repetition=[self.repetition(r) for r in responses])

    def repetition(self, response: list[int]) -> float:
        """data.text.repetition of the decoded response (the "- How to Get Away - How to Get
        Away ..." loop the paper reports after KD): the number eval.run's table shows."""
        return repetition(self.decode(response)) if self.decode else repeated_ngram_fraction(response)

    def loss_units(self, kd_batch: KDBatch) -> int:
        return int(kd_batch.batch.loss_mask.sum())

    def loss(self, model, kd_batch: KDBatch):
        hidden, labels, mask = response_hidden(model, kd_batch.batch)  # (B, L, H), (B, L), (B, L)
        scored = kd_batch.teacher
        device = hidden.device
        teacher = scored.for_loss(device)  # the distribution fused_kd_loss takes
        if scored.mask.shape != mask.shape or not torch.equal(scored.mask.to(device), mask):
            raise ValueError("the teacher's response positions do not line up with the student's batch")
        weight = model.decoder.lm_head.weight
        kd_sum = fused_kd_loss(hidden, weight, teacher, mask, divergence=self.divergence, beta=self.beta,
                               reduction="sum")
        loss_sum = kd_sum
        if self.ce_weight:
            ce_sum = masked_cross_entropy(model.decoder.logits(hidden), labels, mask, reduction="sum")
            loss_sum = loss_sum + self.ce_weight * ce_sum
        rows = len(kd_batch.ended_with_eos)
        metrics = {
            "divergence": kd_sum.detach(),
            "response_length": (float(mask.sum()), rows),
            "eos_rate": (float(sum(kd_batch.ended_with_eos)), rows),
            "repetition_rate": (float(sum(kd_batch.repetition)), rows),
            "on_policy": (float(kd_batch.on_policy), 1),
        }
        return loss_sum, metrics

