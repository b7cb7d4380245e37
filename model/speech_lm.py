"""SpeechLM = Conformer speech encoder + projector + Phi-4-mini decoder.

The audio placeholder id stands in `input_ids` once per audio token of its clip. Each clip's
log-mel features go through the encoder (one frame per 80 ms) and the projector into the
decoder's width; those embeddings replace the placeholder embeddings, clip after clip in the
order the placeholder runs appear, row by row. The decoder then runs as on text.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import SpeechLMConfig
from .decoder import Phi4MiniDecoder
from .projector import standardize_clips


class SpeechLM(nn.Module):
    def __init__(self, config: SpeechLMConfig):
        super().__init__()
        self.config = config
        self.decoder = Phi4MiniDecoder(config.decoder)
        self.encoder = None
        self.projector = None
        if config.encoder is not None:
            from .encoder import ConformerEncoder
            from .projector import AudioProjector

            if config.encoder.downsample_rate != 1:
                raise ValueError("SpeechLM: only encoder.downsample_rate = 1 is supported (as in Phi-4MM)")
            self.encoder = ConformerEncoder(config.encoder)
            self.projector = AudioProjector(config.encoder.hidden_size, config.decoder.hidden_size)
        self.encoder_cache = None  # a model.encoder_cache.EncoderOutputCache: frozen-encoder outputs from disk

    def embed(
        self,
        input_ids: torch.Tensor,
        audio_features: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each clip's projected audio written at its placeholders. (B, T, hidden)"""
        embeds = self.decoder.embed_tokens(input_ids)  # (B, T, hidden)
        placeholder = input_ids == self.config.audio_token_id  # (B, T)
        if audio_features is None:
            return embeds
        if self.encoder is None:
            raise ValueError("audio_features given, but this SpeechLM has no speech encoder (config.encoder is None)")
        # audio_lengths None: every clip fills all frames (the reference passes no mask then).
        # A frozen encoder keeps no activations for backward: 30-minute clips stay affordable.
        # A clip repeated in consecutive rows (the two responses of a DPO pair, the N samples of a
        # prompt) is encoded once.
        first, copy_of = consecutive_repeats(audio_features, audio_lengths)  # (U,), (N,)
        lengths = None if audio_lengths is None else audio_lengths[first]
        if self.encoder_cache is not None:  # refuses a trainable encoder
            encoded, token_counts = self.encoder_cache.encode(
                self.encoder, audio_features[first].to(embeds.dtype), lengths, mask_padding=self.config.encoder.mask_padding
            )  # (U, T', D_enc), (U,)
        else:
            encoder_trains = any(p.requires_grad for p in self.encoder.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
                encoded, token_counts = self.encoder(
                    audio_features[first].to(embeds.dtype), lengths, mask_padding=self.config.encoder.mask_padding
                )  # (U, T', D_enc), (U,)
        audio_embeds = self.projector(encoded.to(self.projector.up_proj.weight.dtype))  # (U, T', hidden)
        if self.config.standardize_audio_embeddings:
            audio_embeds = standardize_clips(audio_embeds, token_counts)
        audio_embeds, token_counts = audio_embeds[copy_of], token_counts[copy_of]  # (N, T', hidden), (N,)
        clip_tokens = torch.cat([audio_embeds[i, :n] for i, n in enumerate(token_counts.tolist())])  # (sum n, hidden)
        num_placeholders = int(placeholder.sum())
        if num_placeholders != clip_tokens.shape[0]:
            raise ValueError(
                f"input_ids hold {num_placeholders} audio placeholders (id {self.config.audio_token_id}) but the "
                f"{len(token_counts)} clip(s) give {clip_tokens.shape[0]} audio tokens "
                f"({token_counts.tolist()}); build prompts with num_audio_tokens() per clip"
            )
        return embeds.masked_scatter(placeholder[..., None], clip_tokens.to(embeds.dtype))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        *,
        kv_cache=None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normed decoder states (B, T, hidden), for losses fused with the LM head."""
        embeds = self.embed(input_ids, audio_features, audio_lengths)
        return self.decoder(embeds, attention_mask, positions, kv_cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        *,
        kv_cache=None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). See Phi4MiniDecoder.forward for the masks."""
        hidden = self.hidden_states(
            input_ids, attention_mask, audio_features, audio_lengths, kv_cache=kv_cache, positions=positions
        )
        return self.decoder.logits(hidden)


def consecutive_repeats(features: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips equal to the one before them: (indices of the distinct clips (U,), for every clip
    the position of its distinct copy among those (N,))."""
    first, copy_of = [0], [0]
    for i in range(1, features.shape[0]):
        same_length = lengths is None or bool(lengths[i] == lengths[i - 1])
        if not (same_length and torch.equal(features[i], features[i - 1])):
            first.append(i)
        copy_of.append(len(first) - 1)
    device = features.device
    return torch.tensor(first, device=device), torch.tensor(copy_of, device=device)
