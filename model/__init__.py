"""Modules with weights and their loading: config, decoder, encoder, projector, LoRA, SpeechLM."""
from .checkpoint import load_pretrained
from .checkpoint_save import save_pretrained
from .config import DecoderConfig, EncoderConfig, SpeechLMConfig, from_hf_config, phi4mm, toy
from .speech_lm import SpeechLM

__all__ = [
    "DecoderConfig",
    "EncoderConfig",
    "SpeechLM",
    "SpeechLMConfig",
    "from_hf_config",
    "load_pretrained",
    "phi4mm",
    "save_pretrained",
    "toy",
]
