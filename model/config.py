"""Configuration dataclasses for the decoder, the speech encoder and the whole SpeechLM.

`phi4mm()` gives the sizes of microsoft/Phi-4-multimodal-instruct; `toy()` a model that trains
on a laptop. `from_hf_config(config_json_dict)` reads the config.json of either checkpoint
layout:

* original remote-code layout (`model_type: "phi4mm"`): decoder fields at the top level,
  `rope_scaling` (transformers 4.x style), the encoder under `audio_processor.config` with its
  own names (`attention_dim`, `linear_units`, ...), the speech LoRA under `speech_lora`;
* transformers-native layout (`model_type: "phi4_multimodal"`): decoder fields at the top
  level, `rope_parameters` (transformers 5.x) or `rope_scaling` (4.x), encoder under
  `audio_config` with transformers' names.

Only what the text decoder and the speech path need is read; the vision tower is not part of
this project (its keys are skipped by the checkpoint loader, see model/checkpoint.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class DecoderConfig:
    """Phi-4-mini text decoder (Phi-3 family: fused qkv, GQA, partial LongRoPE, SwiGLU)."""

    vocab_size: int = 200064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_layers: int = 32
    num_heads: int = 24
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.75
    rope_type: str = "longrope"  # "default" or "longrope"
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    short_factor: list[float] | None = None  # LongRoPE factors, len = rotary_dim // 2
    long_factor: list[float] | None = None
    rope_attention_factor: float | None = None  # None: sqrt(1 + ln(s) / ln(L_orig)), s = L_max / L_orig
    tie_word_embeddings: bool = True
    bos_token_id: int = 199999
    eos_token_ids: tuple[int, ...] = (199999, 200020)
    pad_token_id: int = 199999

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"DecoderConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.rope_type not in ("default", "longrope"):
            raise ValueError(f"DecoderConfig.rope_type must be 'default' or 'longrope', got {self.rope_type!r}")
        half = self.rotary_dim // 2
        for name in ("short_factor", "long_factor"):
            factors = getattr(self, name)
            if factors is not None and len(factors) != half:
                raise ValueError(
                    f"DecoderConfig.{name} has {len(factors)} entries; LongRoPE needs rotary_dim // 2 = {half}"
                )
        if self.rope_type == "longrope" and (self.short_factor is None or self.long_factor is None):
            self.short_factor = self.short_factor or [1.0] * half
            self.long_factor = self.long_factor or [1.0] * half
        self.eos_token_ids = tuple(self.eos_token_ids)

    @property
    def rotary_dim(self) -> int:
        """Number of leading channels of each head that are rotated (int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_factor(self) -> float:
        """LongRoPE's scale on cos/sin; sqrt(1 + ln(32)/ln(4096)) for the real model."""
        if self.rope_type != "longrope":
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))


@dataclass
class EncoderConfig:
    """Conformer speech encoder of Phi-4MM (names follow transformers' Phi4MultimodalAudioConfig)."""

    input_size: int = 80  # log-mel bins
    hidden_size: int = 1024
    intermediate_size: int = 1536
    num_blocks: int = 24
    num_heads: int = 16
    kernel_size: int = 3  # depthwise conv of the conv module
    nemo_conv_channels: int = 1024
    time_reduction: int = 8
    bias_max_distance: int = 500  # T5 relative bias; the real checkpoint uses 500
    bias_symmetric: bool = False
    ext_pw_out_channel: int = 1024
    depthwise_separable_out_channel: int = 1024
    depthwise_multiplier: int = 1
    chunk_size: int = -1
    left_chunk: int = 18
    max_window_frames: int = 500  # encoder frames per independently encoded window
    downsample_rate: int = 1  # projector input = hidden_size * downsample_rate
    mask_padding: bool = False  # False: the reference's +1/+0 bias quirk (parity); True: real masking


@dataclass
class SpeechLMConfig:
    """Encoder + projector + decoder. `encoder` is None for a text-only model."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    encoder: EncoderConfig | None = field(default_factory=EncoderConfig)
    audio_token_id: int = 200011
    speech_lora_rank: int = 0  # rank/alpha of the checkpoint's own speech LoRA (original layout)
    speech_lora_alpha: float = 0.0
    # Not in Phi-4MM: standardise each clip's projected audio over its own tokens (subtract the
    # time mean, divide by the RMS; model/projector.py `standardize_clips`). The toy world
    # (toy/pretrain.py) aligns a tiny encoder from scratch on CPU, where without it the
    # projector output collapses to one constant vector; real checkpoints leave it False. It is
    # saved only under config.json's "speechsum" key: transformers or vLLM loading such a
    # checkpoint would silently skip it.
    standardize_audio_embeddings: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SpeechLMConfig":
        values = dict(values)
        decoder = DecoderConfig(**_known(DecoderConfig, values.pop("decoder", {}), "decoder"))
        encoder_values = values.pop("encoder", None)
        encoder = None if encoder_values is None else EncoderConfig(**_known(EncoderConfig, encoder_values, "encoder"))
        return cls(decoder=decoder, encoder=encoder, **_known(cls, values, "speech_lm"))


def _known(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in the {where} config; known fields: {sorted(names)}")
    return values


def phi4mm() -> SpeechLMConfig:
    """The real Phi-4-multimodal-instruct sizes (LongRoPE factors come from its config.json)."""
    return SpeechLMConfig(
        decoder=DecoderConfig(),
        encoder=EncoderConfig(),
        audio_token_id=200011,
        speech_lora_rank=320,
        speech_lora_alpha=640.0,
    )


def toy(vocab_size: int = 512, *, bos_token_id: int = 1, eos_token_ids: tuple[int, ...] = (2, 6),
        pad_token_id: int = 0, audio_token_id: int = 4) -> SpeechLMConfig:
    """A model small enough to train on CPU in minutes; same architecture, tiny sizes.

    The default special ids are those of the toy SentencePiece tokenizer
    (model.tokenizer.train_sentencepiece): pad 0, bos 1, eos <|endoftext|> 2 and <|end|> 6,
    audio placeholder 4; pass `**model.tokenizer.config_token_ids(tokenizer)` to take them
    from a tokenizer instead.
    """
    return SpeechLMConfig(
        decoder=DecoderConfig(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            partial_rotary_factor=0.75,
            rope_type="default",
            max_position_embeddings=8192,
            original_max_position_embeddings=8192,
            bos_token_id=bos_token_id,
            eos_token_ids=tuple(eos_token_ids),
            pad_token_id=pad_token_id,
        ),
        encoder=EncoderConfig(
            hidden_size=96,
            intermediate_size=192,
            num_blocks=2,
            num_heads=4,
            nemo_conv_channels=32,
            ext_pw_out_channel=96,
            depthwise_separable_out_channel=96,
            bias_max_distance=100,
        ),
        audio_token_id=audio_token_id,
    )


# ---------------------------------------------------------------------------------------------
# config.json readers


def from_hf_config(config: dict[str, Any]) -> SpeechLMConfig:
    """Read a config.json dict of either checkpoint layout into a SpeechLMConfig."""
    model_type = config.get("model_type")
    if model_type == "phi4mm" or "audio_processor" in config or "embd_layer" in config:
        encoder = _encoder_from_original(config)
        lora = config.get("speech_lora") or {}
        lora_rank, lora_alpha = int(lora.get("r", 0)), float(lora.get("lora_alpha", 0.0))
    else:
        encoder = _encoder_from_native(config)
        lora_rank, lora_alpha = 0, 0.0
    audio_cfg = config.get("audio_config") or {}
    return SpeechLMConfig(
        decoder=_decoder_from_hf(config),
        encoder=encoder,
        audio_token_id=int(audio_cfg.get("audio_token_id", config.get("audio_token_id", 200011))),
        speech_lora_rank=lora_rank,
        speech_lora_alpha=lora_alpha,
    )


def _decoder_from_hf(config: dict[str, Any]) -> DecoderConfig:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    # transformers 5.x: rope_parameters; 4.x and the original layout: rope_scaling + rope_theta.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "su":  # the name early Phi-3 configs used for LongRoPE
        rope_type = "longrope"
    if rope_type not in ("default", "longrope"):
        raise ValueError(f"rope type {rope_type!r} is not supported (Phi-4-mini uses 'longrope'); Phi-3's 'yarn' "
                         "scales attention differently and would give wrong logits")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    max_pos = int(config.get("max_position_embeddings", 131072))
    eos = config.get("eos_token_id", [199999, 200020])
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    if config.get("model_type") == "phi4mm" or "embd_layer" in config:
        # The original generation_config.json stops at <|end|> (200020) and <|endoftext|> (199999).
        eos_ids = tuple(dict.fromkeys((*eos_ids, 200020)))
    return DecoderConfig(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        partial_rotary_factor=float(partial),
        rope_type=rope_type,
        max_position_embeddings=max_pos,
        original_max_position_embeddings=int(
            config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos
        ),
        short_factor=_floats(rope.get("short_factor")),
        long_factor=_floats(rope.get("long_factor")),
        rope_attention_factor=_attention_factor(rope, max_pos, config),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_token_id=_int_or(config.get("bos_token_id"), 199999),
        eos_token_ids=eos_ids,
        pad_token_id=_int_or(config.get("pad_token_id"), 199999),
    )


def _attention_factor(rope: dict, max_pos: int, config: dict) -> float | None:
    """An explicit LongRoPE attention factor, or one implied by an explicit `factor` (else None)."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    if rope.get("factor") is None:
        return None  # derived from max / original max positions (DecoderConfig.attention_factor)
    original = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos
    factor = float(rope["factor"])
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _int_or(value, default: int) -> int:
    return default if value is None else int(value)


def _floats(values) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _encoder_from_native(config: dict[str, Any]) -> EncoderConfig | None:
    audio = config.get("audio_config")
    if audio is None:
        return None
    defaults = EncoderConfig()
    return EncoderConfig(
        input_size=int(audio.get("input_size", 80)),
        hidden_size=int(audio.get("hidden_size", 1024)),
        intermediate_size=int(audio.get("intermediate_size", 1536)),
        num_blocks=int(audio.get("num_blocks", 24)),
        num_heads=int(audio.get("num_attention_heads", 16)),
        kernel_size=int(audio.get("kernel_size", 3)),
        nemo_conv_channels=int(audio.get("nemo_conv_channels", 1024)),
        time_reduction=int(audio.get("time_reduction", 8)),
        bias_max_distance=int(audio.get("bias_max_distance", 1000)),
        bias_symmetric=bool(audio.get("bias_symmetric", False)),
        ext_pw_out_channel=int(audio.get("ext_pw_out_channel", 1024)),
        depthwise_separable_out_channel=int(audio.get("depthwise_separable_out_channel", 1024)),
        depthwise_multiplier=int(audio.get("depthwise_multiplier", 1)),
        chunk_size=int(audio.get("chunk_size", -1)),
        left_chunk=int(audio.get("left_chunk", 18)),
        max_window_frames=defaults.max_window_frames,
        downsample_rate=int(audio.get("downsample_rate", 1)),
    )


def _encoder_from_original(config: dict[str, Any]) -> EncoderConfig | None:
    processor = config.get("audio_processor")
    if processor is None:
        return None
    audio = processor.get("config", processor)
    embd = (config.get("embd_layer") or {}).get("audio_embd_layer") or {}
    return EncoderConfig(
        input_size=int(audio.get("input_size", 80)),
        hidden_size=int(audio.get("attention_dim", 1024)),
        intermediate_size=int(audio.get("linear_units", 1536)),
        num_blocks=int(audio.get("num_blocks", 24)),
        num_heads=int(audio.get("attention_heads", 16)),
        kernel_size=int(audio.get("kernel_size", 3)),
        nemo_conv_channels=int((audio.get("nemo_conv_settings") or {}).get("conv_channels", 1024)),
        time_reduction=int(audio.get("time_reduction", 8)),
        bias_max_distance=int((audio.get("relative_attention_bias_args") or {}).get("t5_bias_max_distance", 500)),
        bias_symmetric=bool((audio.get("relative_attention_bias_args") or {}).get("t5_bias_symmetric", False)),
        ext_pw_out_channel=int(audio.get("ext_pw_out_channel", 1024)),
        depthwise_separable_out_channel=int(audio.get("depthwise_seperable_out_channel", 1024)),
        depthwise_multiplier=int(audio.get("depthwise_multiplier", 1)),
        chunk_size=int(audio.get("chunk_size", -1)),
        left_chunk=int(audio.get("left_chunk", 18)),
        downsample_rate=int(embd.get("downsample_rate", 1)),
    )
