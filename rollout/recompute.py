"""The slow, obviously-correct reference for the sampler: greedy decoding that recomputes the
full forward over prompt + generated tokens at every step (no KV cache, batch of one).

Used by the tests (the KV-cached sampler must give the same tokens) and by bench/sampler.py.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def greedy_by_recompute(model, prompt: torch.Tensor, max_new_tokens: int, eos_token_ids=(), *,
                        audio_features=None, audio_lengths=None) -> list[int]:
    """Greedy continuation of one 1-D prompt (its clips in audio_features), stopping after an EOS."""
    sequence = prompt[None]  # (1, T)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(sequence, audio_features=audio_features, audio_lengths=audio_lengths)  # (1, T, V)
        token = int(logits[0, -1].argmax())
        generated.append(token)
        if token in eos_token_ids:
            break
        sequence = torch.cat([sequence, sequence.new_tensor([[token]])], dim=1)
    return generated
