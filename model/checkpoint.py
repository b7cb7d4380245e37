"""load_pretrained / save_pretrained: safetensors checkpoints in both Phi-4MM key layouts.

A checkpoint directory holds `config.json` and either one `*.safetensors` file or shards listed
in `model.safetensors.index.json`. Two key layouts are read:

* transformers-native (`Phi4MultimodalForCausalLM`, hub `refs/pr/70`):
  `model.layers.N.self_attn.qkv_proj.weight`, `model.embed_tokens_extend.audio_embed.encoder.*`,
  `...audio_embed.up_proj_for_speech.*`;
* original remote-code (hub main of microsoft/Phi-4-multimodal-instruct): LoRA-wrapped decoder
  projections `...qkv_proj.base_layer.weight` + `lora_A.speech.weight` / `lora_B.speech.weight`
  (and `.vision`), encoder names `feed_forward_in.net.0.linear`, `self_attn.linear_q`,
  `linear_out`, projector `audio_projection.speech.0` / `.2`.

The speech LoRA of the original layout is merged as W + (alpha / r) B A when
`merge_speech_lora=True`, or kept as separate LoRALinear adapters otherwise. Vision weights
(the image tower, the vision LoRA, the vision-speech projector) are skipped by design: this
project is speech-only. Every other key must map onto the model: a missing, unexpected or
mis-shaped tensor is an error naming the key and its file. Weights are read with safetensors
only; nothing is ever unpickled. A weights file safetensors refuses (truncated by an interrupted
download, a header length past the end of the file, not safetensors at all) is a CheckpointError
naming the file, comparing the size its header promises with the size on disk, and saying to
re-download or re-export it; safetensors' own error is kept only as a last resort detail.

`save_pretrained` writes the transformers-native layout (so transformers can read the
weights) with a config.json that also carries this project's exact config under "speechsum",
into a temporary directory that then replaces the target whole.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import SpeechLMConfig, from_hf_config
from .lora import apply_lora, lora_modules
from .safeio import atomic_save_safetensors, atomic_write_text
from .speech_lm import SpeechLM

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers
AUDIO = "model.embed_tokens_extend.audio_embed."

# Keys of the reference model this project does not implement (vision).
SKIPPED_KEYS = re.compile(
    r"model\.embed_tokens_extend\.image_embed\..*"
    r"|model\.embed_tokens_extend\.audio_embed\.(up|down)_proj_for_vision_speech\..*"
    r"|model\.embed_tokens_extend\.audio_embed\.audio_projection\.vision\..*"
    r"|.*\.lora_[AB]\.vision\.weight"
)

# (pattern, replacement) applied in order to every checkpoint key; the first match wins.
KEY_RULES = [
    # original remote-code encoder names -> native names
    (r"(.*\.encoders\.\d+\.feed_forward_(?:in|out))\.net\.0\.linear\.(.*)", r"\1.gate_up_proj.\2"),
    (r"(.*\.encoders\.\d+\.feed_forward_(?:in|out))\.net\.2\.(.*)", r"\1.down_proj.\2"),
    (r"(.*\.encoders\.\d+\.self_attn)\.linear_([qkv])\.(.*)", r"\1.\2_proj.\3"),
    (r"(.*\.encoders\.\d+\.self_attn)\.linear_out\.(.*)", r"\1.o_proj.\2"),
    # original projector names -> native names
    (re.escape(AUDIO) + r"audio_projection\.speech\.0\.(.*)", AUDIO + r"up_proj_for_speech.\1"),
    (re.escape(AUDIO) + r"audio_projection\.speech\.2\.(.*)", AUDIO + r"down_proj_for_speech.\1"),
]

# native name -> this project's module name
NATIVE_TO_OURS = [
    (re.escape(AUDIO) + r"encoder\.(.*)", r"encoder.\1"),
    (re.escape(AUDIO) + r"up_proj_for_speech\.(.*)", r"projector.up_proj.\1"),
    (re.escape(AUDIO) + r"down_proj_for_speech\.(.*)", r"projector.down_proj.\1"),
    (r"model\.(embed_tokens|layers|norm)\.(.*)", r"decoder.\1.\2"),
    (r"lm_head\.(.*)", r"decoder.lm_head.\1"),
]
SPEECH_LORA = re.compile(r"(.*)\.lora_([AB])\.speech\.weight")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key."""


def native_to_ours(native_key: str) -> str | None:
    for pattern, replacement in NATIVE_TO_OURS:
        if re.fullmatch(pattern, native_key):
            return re.sub(pattern, replacement, native_key)
    return None


def ours_to_native(our_key: str) -> str:
    for prefix, native in (
        ("encoder.", AUDIO + "encoder."),
        ("projector.up_proj.", AUDIO + "up_proj_for_speech."),
        ("projector.down_proj.", AUDIO + "down_proj_for_speech."),
        ("decoder.lm_head.", "lm_head."),
        ("decoder.", "model."),
    ):
        if our_key.startswith(prefix):
            return native + our_key[len(prefix):]
    raise KeyError(f"no native name for {our_key!r}")


def classify_key(checkpoint_key: str):
    """One checkpoint key -> ("skip", None) | ("speech_lora", (native module, "A"|"B")) | ("weight", our key).

    Our key is None when the key maps to nothing this project knows (the caller reports it).
    """
    if SKIPPED_KEYS.fullmatch(checkpoint_key):
        return "skip", None
    lora_match = SPEECH_LORA.fullmatch(checkpoint_key)
    if lora_match:
        module = canonical_key(lora_match.group(1) + ".weight")[: -len(".weight")]
        return "speech_lora", (module, lora_match.group(2))
    return "weight", native_to_ours(canonical_key(checkpoint_key))


def canonical_key(checkpoint_key: str) -> str:
    """Any checkpoint key -> its native-layout name (base_layer dropped, old names renamed)."""
    key = checkpoint_key.replace(".base_layer.", ".")
    for pattern, replacement in KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


@dataclass
class _Source:
    key: str
    file: str


def checkpoint_files(path: Path) -> dict[str, list[str]]:
    """file name -> keys, from the index if sharded, else every *.safetensors in the directory."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err}); expected a 'weight_map'") from None
        files: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            files.setdefault(file, []).append(key)
        for file in files:
            if not (path / file).is_file():
                raise CheckpointError(f"{path / file}: shard listed in {INDEX_FILE} is missing (holds e.g. "
                                      f"{files[file][0]!r}); re-download or re-save the checkpoint")
        return files
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no *.safetensors file and no {INDEX_FILE}; only safetensors "
                              "checkpoints are read (never pickled .bin files)")
    files = {}
    for name in found:
        with open_weights(path / name) as handle:
            files[name] = list(handle.keys())
    return files


def open_weights(file: Path):
    """safe_open on the CPU; a file safetensors refuses is a CheckpointError that names it."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as err:
        raise CheckpointError(f"{file}: {safetensors_damage(file, err)}; re-download or re-export "
                              "the checkpoint") from None


def safetensors_damage(file: Path, err: Exception) -> str:
    """Why safetensors refused `file`, in words: the size its header promises against the size on disk."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"truncated or not a safetensors file: {size} bytes, too short for the 8-byte header length"
        header_bytes = int.from_bytes(head, "little")
        if header_bytes > MAX_HEADER_BYTES or 8 + header_bytes > size:
            return (f"truncated or not a safetensors file: its header says at least {8 + header_bytes} bytes, "
                    f"the file has {size}")
        try:
            header = json.loads(handle.read(header_bytes))
            data_bytes = max((int(entry["data_offsets"][1]) for key, entry in header.items()
                              if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"not a safetensors file: its header is not a safetensors header ({err})"
    if 8 + header_bytes + data_bytes != size:
        return (f"truncated or not a safetensors file: its header says {8 + header_bytes + data_bytes} bytes, "
                f"the file has {size}")
    return f"not a readable safetensors file ({err})"


def read_config(path: Path) -> SpeechLMConfig:
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a checkpoint directory with config.json")
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found; a checkpoint directory needs config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}, line {err.lineno}: invalid JSON ({err.msg})") from None
    try:
        return SpeechLMConfig.from_dict(raw["speechsum"]) if "speechsum" in raw else from_hf_config(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: cannot read the model config ({err})") from None


def load_pretrained(path, *, dtype: torch.dtype | None = None, device=None, merge_speech_lora: bool = True) -> SpeechLM:
    """Build a SpeechLM from a checkpoint directory (see the module docstring for the layouts).

    dtype: None keeps the checkpoint's floating dtype. device: where the weights end up.
    """
    path = Path(path)
    config = read_config(path)
    with torch.device("meta"):
        model = SpeechLM(config)
    expected = {k: v for k, v in model.state_dict().items()}
    if config.decoder.tie_word_embeddings:
        expected.pop("decoder.lm_head.weight")

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, _Source] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}  # module (native name) -> {"A": ..., "B": ...}
    unexpected: list[str] = []
    for file, keys in checkpoint_files(path).items():
        with open_weights(path / file) as handle:
            for key in keys:
                kind, ours = classify_key(key)
                if kind == "skip":
                    continue
                if kind == "speech_lora":
                    module, which = ours
                    lora.setdefault(module, {})[which] = handle.get_tensor(key)
                    continue
                if ours == "decoder.lm_head.weight" and config.decoder.tie_word_embeddings:
                    continue  # tied to the embedding
                if ours is None or ours not in expected:
                    unexpected.append(f"{key} (in {file})")
                    continue
                tensor = handle.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[ours].shape):
                    raise CheckpointError(
                        f"{path / file}: tensor {key!r} has shape {tuple(tensor.shape)} but the model built "
                        f"from config.json needs {tuple(expected[ours].shape)} for {ours}; the config and "
                        "weights do not belong together"
                    )
                if ours in state:
                    raise CheckpointError(f"{path / file}: {key!r} duplicates {origin[ours].key!r} "
                                          f"from {origin[ours].file}")
                state[ours], origin[ours] = tensor, _Source(key, file)
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected key(s) that map to nothing in the model, "
                              f"e.g. {unexpected[:5]}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} key(s) missing from the checkpoint, e.g. "
                              f"{[ours_to_native(k) for k in missing[:5]]} (our names {missing[:5]})")

    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    lora_weights = _speech_lora_deltas(config, lora, path) if lora else {}
    if merge_speech_lora:
        for module, (lora_a, lora_b, scale) in lora_weights.items():
            key = native_to_ours(module + ".weight")
            state[key] = (state[key].float() + scale * (lora_b.float() @ lora_a.float())).to(dtype)

    model.load_state_dict(state, strict=False, assign=True)
    if config.decoder.tie_word_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    model.decoder.rotary.reset_buffers()
    if lora_weights and not merge_speech_lora:
        _attach_speech_lora(model, lora_weights, dtype)
    return model.to(device) if device is not None else model


def _speech_lora_deltas(config: SpeechLMConfig, lora: dict, path: Path) -> dict:
    """module -> (A, B, alpha / r) for the checkpoint's speech LoRA; checks pairs and ranks."""
    if config.speech_lora_rank <= 0:
        raise CheckpointError(f"{path}: the weights hold speech LoRA tensors but config.json has no "
                              "speech_lora {r, lora_alpha}; cannot scale them")
    scale = config.speech_lora_alpha / config.speech_lora_rank
    deltas = {}
    for module, pair in sorted(lora.items()):
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{path}: {module} has lora_{'A' if 'A' in pair else 'B'}.speech "
                                  "but not its partner; the checkpoint is incomplete")
        if native_to_ours(module + ".weight") is None:
            raise CheckpointError(f"{path}: speech LoRA on {module}, which is not a module of this model")
        deltas[module] = (pair["A"], pair["B"], scale)
    return deltas


def _attach_speech_lora(model: SpeechLM, lora_weights: dict, dtype: torch.dtype) -> None:
    """Keep the checkpoint's speech LoRA as separate adapters instead of merging it."""
    config = model.config
    names = [native_to_ours(module + ".weight")[: -len(".weight")] for module in lora_weights]
    apply_lora(model, "|".join(re.escape(n) for n in names), config.speech_lora_rank, config.speech_lora_alpha)
    adapters = lora_modules(model)
    with torch.no_grad():
        for module, name in zip(lora_weights, names):
            lora_a, lora_b, _ = lora_weights[module]
            adapters[name].lora_a.copy_(lora_a.to(dtype))
            adapters[name].lora_b.copy_(lora_b.to(dtype))


# ---------------------------------------------------------------------------------------------
# saving

VISION_PLACEHOLDER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 28, "crop_size": 28, "patch_size": 14}


def native_config(config: SpeechLMConfig) -> dict:
    """A transformers-native config.json for `config`, plus our exact config under "speechsum"."""
    dec = config.decoder
    rope: dict = {"rope_type": dec.rope_type, "rope_theta": dec.rope_theta,
                  "partial_rotary_factor": dec.partial_rotary_factor}
    if dec.rope_type == "longrope":
        rope.update(short_factor=dec.short_factor, long_factor=dec.long_factor)
        if dec.rope_attention_factor is not None:
            rope["attention_factor"] = dec.rope_attention_factor
    out = {
        "model_type": "phi4_multimodal",
        "architectures": ["Phi4MultimodalForCausalLM"],
        "vocab_size": dec.vocab_size,
        "hidden_size": dec.hidden_size,
        "intermediate_size": dec.intermediate_size,
        "num_hidden_layers": dec.num_layers,
        "num_attention_heads": dec.num_heads,
        "num_key_value_heads": dec.num_kv_heads,
        "rms_norm_eps": dec.rms_norm_eps,
        "max_position_embeddings": dec.max_position_embeddings,
        "original_max_position_embeddings": dec.original_max_position_embeddings,
        "rope_parameters": rope,
        # transformers 4.x reads these instead (without them it takes no LongRoPE and a full rotary
        # dimension, and its logits drift by ~0.5); 5.x reads rope_parameters and ignores them
        "rope_theta": dec.rope_theta,
        "partial_rotary_factor": dec.partial_rotary_factor,
        "rope_scaling": ({"type": "longrope", "short_factor": dec.short_factor, "long_factor": dec.long_factor}
                         if dec.rope_type == "longrope" else None),
        "tie_word_embeddings": dec.tie_word_embeddings,
        "bos_token_id": dec.bos_token_id,
        "eos_token_id": list(dec.eos_token_ids),
        "pad_token_id": dec.pad_token_id,
        "speechsum": config.to_dict(),
        # this project keeps no vision tower; transformers 4.57 cannot even print a config without
        # one, so a one-layer placeholder (random weights wherever it is built) stands in
        "vision_config": dict(VISION_PLACEHOLDER),
    }
    if config.encoder is not None:
        enc = config.encoder
        out["audio_config"] = {
            "hidden_size": enc.hidden_size, "intermediate_size": enc.intermediate_size,
            "num_blocks": enc.num_blocks, "num_attention_heads": enc.num_heads, "input_size": enc.input_size,
            "kernel_size": enc.kernel_size, "nemo_conv_channels": enc.nemo_conv_channels,
            "time_reduction": enc.time_reduction, "bias_max_distance": enc.bias_max_distance,
            "bias_symmetric": enc.bias_symmetric, "ext_pw_out_channel": enc.ext_pw_out_channel,
            "depthwise_separable_out_channel": enc.depthwise_separable_out_channel,
            "depthwise_multiplier": enc.depthwise_multiplier, "chunk_size": enc.chunk_size,
            "left_chunk": enc.left_chunk, "downsample_rate": enc.downsample_rate,
            "audio_token_id": config.audio_token_id,
        }
    return out


def save_pretrained(model: SpeechLM, path, *, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json and native-layout safetensors (sharded above `max_shard_bytes`)."""
    if lora_modules(model):
        raise ValueError("save_pretrained: the model has LoRA adapters; fold them in with "
                         "model.lora.merge_and_remove_lora(model) or save them with model.lora.save_adapter")
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_weights(model, tmp, max_shard_bytes)
    atomic_write_text(tmp / "config.json", json.dumps(native_config(model.config), indent=1))
    # keep what else the directory holds (a tokenizer, notes); the weights and config are replaced
    if path.is_dir():
        for item in path.iterdir():
            if not _owned_by_save(item.name):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    # swap directories: a crash leaves either the old checkpoint or the new one, never a mix
    old = path.with_name(f".old-{path.name}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _owned_by_save(name: str) -> bool:
    return name.endswith(".safetensors") or name in (INDEX_FILE, "config.json")


def _write_weights(model: SpeechLM, path: Path, max_shard_bytes: int) -> None:
    state = model.state_dict()
    if model.config.decoder.tie_word_embeddings:
        state.pop("decoder.lm_head.weight")
    tensors = {ours_to_native(k): v for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_save_safetensors(shard, path / name, metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(path / INDEX_FILE, json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=1))
