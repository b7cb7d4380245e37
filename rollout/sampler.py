"""Batched KV-cached sampling from a SpeechLM: the experience of on-policy KD and DPO.

    rollout = generate(model, prompts, SamplingParams(max_new_tokens=256, eos_token_ids=(200020,)),
                       audio_features=features, audio_lengths=lengths)

Prompts share one static KV cache in the left-padded layout (prefilled right-padded on the fused
causal attention path, then shifted: `prefill`); the audio is encoded and the prompt prefilled
once per prompt, whatever `num_samples`; decoding stops a row at its first EOS and checks for
the end of the batch only every `stop_check_interval` steps. The procedure: docs/sampling.md.

Sampling. The audio placeholder id is never sampled (a response holding it would be read as
audio by the next forward). Logits are divided by the temperature, then top-k (exactly k tokens kept, ties
broken by index) and top-p (the smallest set of most likely tokens whose mass reaches p) are
applied, and the token is the argmax of (filtered logits + Gumbel noise), which is an exact
draw from the filtered softmax. temperature 0 means greedy (argmax of the raw logits).

`Rollout.logprobs` (with `SamplingParams(logprobs=True)`; None otherwise, because no stage of
training reads them and a log-softmax over the whole vocabulary at every step is not free) is
the log-probability of each sampled token under the model's *unmodified*
distribution (temperature 1, no top-k/top-p): the quantity the KD and DPO losses need, equal to
a teacher-forced forward over prompt + response (tests check 1e-5). One caveat with LongRoPE: the
cache fixes the rotary factors by its capacity, prompt + max_new_tokens (model/decoder.py), so
if that capacity exceeds original_max_position_embeddings (4096) while the actual sequence does
not, the rollout used the long factors and a teacher-forced forward of the same tokens uses the
short ones.

Randomness and what is guaranteed. The Gumbel noise is counter-based: a 32-bit integer hash of
(row stream, step, token id), with the row stream of sample n of prompt i derived from
(seed + n, i). Hence:
* the same call with the same seed gives the same tokens (on the same device and dtype);
* sample n of prompt i does not depend on the other prompts in the batch, on their lengths, or
  on `num_samples`, except through floating-point differences of the logits themselves (batched
  matmuls of other shapes may round differently, which can flip a near-tie);
* the N samples of a prompt (num_samples=N, seed s) equal N separate calls with num_samples=1
  and seeds s, s+1, ..., s+N-1, the prompt at the same index;
* seed=None draws a seed from torch's global generator.
Uniforms have 24 bits, so Gumbel noise is exact up to a resolution of 2^-24 in probability.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .kv_cache import StaticKVCache


class GenerationCancelled(Exception):
    """`generate`'s `cancelled()` said stop; nothing of the call is returned."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0  # 1.0: no nucleus filtering
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's (config.decoder.eos_token_ids); (): never stop
    num_samples: int = 1
    seed: int | None = None
    logprobs: bool = False  # fill Rollout.logprobs (one log-softmax over the vocabulary per step)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: need top_k >= 0 and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")
        if self.num_samples < 1:
            raise ValueError(f"SamplingParams.num_samples must be >= 1, got {self.num_samples}")
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))


@dataclass
class Rollout:
    """Row r = sample r % N of prompt r // N (N = num_samples)."""

    tokens: torch.Tensor  # (B*N, L) generated ids, pad_token_id after a row stopped
    logprobs: torch.Tensor | None  # (B*N, L) log p(token) under the unmodified model, 0 where masked; None
    # unless SamplingParams.logprobs
    mask: torch.Tensor  # (B*N, L) True on generated tokens up to and including the EOS
    lengths: torch.Tensor  # (B*N,) number of True entries of each mask row
    prompt_index: torch.Tensor  # (B*N,) which prompt each row continues


class Sampler(Protocol):
    """A sampling engine as on-policy KD calls it (train.stages.KDStage's `sampler`): `generate`
    below is one; another (a vLLM engine, a sampler over raw audio) plugs in by returning a
    Rollout whose `tokens` / `lengths` hold each prompt's sampled response."""

    def __call__(self, model, prompts: list[torch.Tensor], params: SamplingParams, *,
                 audio_features: torch.Tensor | None = None,
                 audio_lengths: torch.Tensor | None = None) -> Rollout: ...


def left_pad(prompts: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompts -> input_ids (B, P) left-padded with pad_token_id, attention mask (B, P)."""
    return _pad(prompts, pad_token_id, left=True)


def right_pad(prompts: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompts -> input_ids (B, P) right-padded with pad_token_id, attention mask (B, P)."""
    return _pad(prompts, pad_token_id, left=False)


def _pad(prompts: list[torch.Tensor], pad_token_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts:
        raise ValueError("generate: no prompts given")
    for i, prompt in enumerate(prompts):
        if prompt.dim() != 1 or prompt.numel() == 0 or prompt.dtype.is_floating_point:
            raise ValueError(f"generate: prompt {i} must be a non-empty 1-D tensor of token ids, "
                             f"got shape {tuple(prompt.shape)} and dtype {prompt.dtype}")
    length = max(p.numel() for p in prompts)
    device = prompts[0].device
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        slots = slice(length - prompt.numel(), length) if left else slice(0, prompt.numel())
        input_ids[i, slots] = prompt
        mask[i, slots] = 1
    return input_ids, mask


def prefill(model, prompts: list[torch.Tensor], pad_token_id: int, cache: StaticKVCache,
            audio_features: torch.Tensor | None, audio_lengths: torch.Tensor | None) -> torch.Tensor:
    """Prefill `prompts` into `cache` in the left-padded layout decoding uses; returns the hidden
    state of each prompt's last token (B, hidden).

    Prompts of different lengths are prefilled right-padded, then each row's keys and values are
    moved right by its padding (StaticKVCache.shift_rows). Right-padded from slot 0, plain causal
    attention already gives every real token the keys it may see (model/decoder.py,
    build_attention_mask), the fused path of scaled_dot_product_attention; left-padded prompts
    need an explicit (B, 1, P, P) mask, which on CPU made the prefill attention 1.7x slower
    (16 prompts of 971 tokens) and on GPU rules out the flash kernel. Rotary positions count real
    tokens either way, so each real token gets the same position and sees the same keys: the
    cache equals a left-padded prefill's up to rounding, and so do the outputs."""
    if cache.offset != 0:
        raise ValueError(f"prefill needs an empty cache (slot 0), this one holds {cache.offset} slots")
    sizes = [p.numel() for p in prompts]
    if len(set(sizes)) == 1:  # no padding (known on the host): no mask, no shift
        input_ids = torch.stack(prompts)
        return model.hidden_states(input_ids, None, audio_features, audio_lengths, kv_cache=cache)[:, -1]
    lengths = torch.tensor(sizes, device=cache.keys[0].device)
    input_ids, mask = right_pad(prompts, pad_token_id)
    hidden = model.hidden_states(input_ids, mask, audio_features, audio_lengths, kv_cache=cache)  # (B, P, hidden)
    cache.shift_rows(input_ids.shape[1] - lengths)
    return hidden[torch.arange(len(prompts), device=hidden.device), lengths - 1]


# ---------------------------------------------------------------------------------------------
# counter-based Gumbel noise

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2^32) (no int64 overflow)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def gumbel_noise(row_streams: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise (rows, vocab) that depends only on (row stream, step, token id)."""
    step_keys = _hash32((row_streams + step * 0x9E3779B1) & _MASK32)  # (rows,)
    token_ids = torch.arange(vocab_size, device=row_streams.device, dtype=torch.long)
    bits = _hash32((step_keys[:, None] ^ (token_ids * 0x85EBCA6B & _MASK32)[None, :]) & _MASK32)
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (rows, vocab), in (0, 1)
    return -torch.log(-torch.log(uniform))


def row_streams(seed: int, num_prompts: int, num_samples: int, device) -> torch.Tensor:
    """Stream id of sample n of prompt i: hash(hash(seed + n) ^ i), (B*N,), row-major by prompt."""
    prompt = torch.arange(num_prompts, device=device).repeat_interleave(num_samples)
    sample = torch.arange(num_samples, device=device).repeat(num_prompts)
    seeds = _hash32((seed + sample) & _MASK32)
    return _hash32((seeds ^ (prompt * 0x27D4EB2F & _MASK32)) & _MASK32)


# ---------------------------------------------------------------------------------------------
# token selection


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(rows, V) logits / temperature with excluded tokens at -inf (top-k, then top-p)."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kept = torch.topk(logits, params.top_k, dim=-1).indices  # exactly k ids
        logits = torch.full_like(logits, float("-inf")).scatter(-1, kept, logits.gather(-1, kept))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= params.top_p  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_tokens(logits: torch.Tensor, params: SamplingParams, streams: torch.Tensor, step: int) -> torch.Tensor:
    """(rows, V) raw logits -> (rows,) token ids."""
    if params.temperature == 0:
        return logits.argmax(-1)
    filtered = filter_logits(logits, params)
    return (filtered + gumbel_noise(streams, step, logits.shape[-1])).argmax(-1)


# ---------------------------------------------------------------------------------------------
# the loop


@torch.no_grad()
def generate(
    model,
    prompts: list[torch.Tensor],
    params: SamplingParams,
    *,
    audio_features: torch.Tensor | None = None,
    audio_lengths: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    stop_check_interval: int = 8,
    cancelled: Callable[[], bool] | None = None,
) -> Rollout:
    """Sample `params.num_samples` continuations of every prompt (module docstring; docs/sampling.md).
    `cancelled()` is asked at every stop check: True ends the call with `GenerationCancelled`
    (a server whose client has gone, or whose deadline has passed)."""
    decoder = model.decoder
    pad_token_id = decoder.config.pad_token_id if pad_token_id is None else pad_token_id
    device = decoder.embed_tokens.weight.device
    dtype = decoder.embed_tokens.weight.dtype
    prompts = [p.to(device) for p in prompts]
    _, prompt_mask = left_pad(prompts, pad_token_id)  # the decode mask; `prefill` pads the ids itself
    num_prompts, prompt_length = prompt_mask.shape
    num_samples, max_new = params.num_samples, params.max_new_tokens
    rows = num_prompts * num_samples
    total = prompt_length + max_new
    seed = int(torch.randint(0, 2**31 - 1, ())) if params.seed is None else params.seed
    streams = row_streams(seed, num_prompts, num_samples, device)

    # 1-2. prefill once per prompt (audio encoded once), then give each sample its own cache rows
    cache = StaticKVCache.for_model(decoder.config, num_prompts, total, dtype=dtype, device=device)
    padded = len({p.numel() for p in prompts}) > 1  # known on the host: no mask, no sync, when unpadded
    logits = decoder.logits(prefill(model, prompts, pad_token_id, cache, audio_features, audio_lengths)).float()  # (B, V)
    if num_samples > 1:
        cache = cache.repeat_rows(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)  # (B*N, V)

    attention_mask = torch.ones(rows, total, dtype=torch.long, device=device)
    attention_mask[:, :prompt_length] = prompt_mask.repeat_interleave(num_samples, dim=0)
    next_position = prompt_mask.sum(-1).repeat_interleave(num_samples)  # (B*N,) real prompt tokens
    eos_ids = decoder.config.eos_token_ids if params.eos_token_ids is None else params.eos_token_ids
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)

    tokens = torch.full((rows, max_new), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new, dtype=torch.float32, device=device) if params.logprobs else None
    mask = torch.zeros(rows, max_new, dtype=torch.bool, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)

    # 3. decode
    placeholder = getattr(model.config, "audio_token_id", None)
    banned = None if placeholder is None else torch.tensor([placeholder], device=device)
    for step in range(max_new):
        allowed = logits if banned is None else logits.index_fill(-1, banned, float("-inf"))
        token = select_tokens(allowed, params, streams, step)  # (B*N,)
        active = ~stopped
        tokens[:, step] = torch.where(active, token, pad_token_id)
        if logprobs is not None:
            token_logprob = logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]  # log p(token), T = 1
            logprobs[:, step] = torch.where(active, token_logprob, 0.0)
        mask[:, step] = active
        stopped = stopped | (active & torch.isin(token, eos))
        if step + 1 == max_new or ((step + 1) % stop_check_interval == 0 and bool(stopped.all())):
            break
        if cancelled is not None and (step + 1) % stop_check_interval == 0 and cancelled():
            raise GenerationCancelled(f"generation cancelled after {step + 1} of {max_new} steps")
        hidden = model.hidden_states(
            tokens[:, step : step + 1],
            attention_mask[:, : prompt_length + step + 1] if padded else None,
            kv_cache=cache,
            positions=(next_position + step)[:, None],
        )
        logits = decoder.logits(hidden[:, -1]).float()

    lengths = mask.sum(-1)
    steps = int(lengths.max())  # >= 1: every row is active at step 0
    return Rollout(
        tokens=tokens[:, :steps],
        logprobs=None if logprobs is None else logprobs[:, :steps],
        mask=mask[:, :steps],
        lengths=lengths,
        prompt_index=torch.arange(num_prompts, device=device).repeat_interleave(num_samples),
    )
