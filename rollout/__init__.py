"""Producing experience: the static KV cache, the batched sampler, teachers and the server."""
from .sampler import Rollout, SamplingParams, generate

__all__ = ["Rollout", "SamplingParams", "generate"]
