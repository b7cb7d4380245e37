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
`merge_speech_lora=True`, or kept as separate LoRALinear adapters otherwise. A native checkpoint
made by transformers' converter has no LoRA in its weights; its speech adapter is the
`speech-lora/` folder beside them, read and merged (or kept) the same way, and its `<|end|>`
stop id comes from generation_config.json (model/native_extras.py). Without that folder the
loader warns in one line: such a model has lost its speech adapter. Vision weights
(the image tower, the vision LoRA, the vision-speech projector) are skipped by design: this
project is speech-only. Every other key must map onto the model: a missing, unexpected or
mis-shaped tensor is an error naming the key and its file. Weights are read with safetensors
only; nothing is ever unpickled. A weights file safetensors refuses (truncated by an interrupted
download, a header length past the end of the file, not safetensors at all) is a CheckpointError
naming the file, comparing the size its header promises with the size on disk, and saying to
re-download or re-export it; safetensors' own error is kept only as a last resort detail.

Writing checkpoints is model/checkpoint_save.py.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import SpeechLMConfig, from_hf_config
from .lora import apply_lora, lora_modules
from .native_extras import SPEECH_LORA_DIR, NativeExtrasError, generation_eos_ids, speech_lora_tensors
from .speech_lm import SpeechLM

logger = logging.getLogger(__name__)

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
    """The model config of a checkpoint directory (config.json, plus generation_config.json's stop ids)."""
    return _config_from_raw(path, _read_raw_config(path))


def _read_raw_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a checkpoint directory with config.json")
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found; a checkpoint directory needs config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}, line {err.lineno}: invalid JSON ({err.msg})") from None


def _config_from_raw(path: Path, raw: dict) -> SpeechLMConfig:
    try:
        if "speechsum" in raw:  # written by save_pretrained: exact, stop ids included
            return SpeechLMConfig.from_dict(raw["speechsum"])
        config = from_hf_config(raw)
        extra_eos = generation_eos_ids(path)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / 'config.json'}: cannot read the model config ({err})") from None
    eos = tuple(dict.fromkeys((*config.decoder.eos_token_ids, *extra_eos)))
    return dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, eos_token_ids=eos))


def load_pretrained(path, *, dtype: torch.dtype | None = None, device=None, merge_speech_lora: bool = True) -> SpeechLM:
    """Build a SpeechLM from a checkpoint directory (see the module docstring for the layouts).

    dtype: None keeps the checkpoint's floating dtype. device: where the weights end up.
    """
    path = Path(path)
    raw = _read_raw_config(path)
    config = _config_from_raw(path, raw)
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
    if not lora and _is_converted_native(raw):
        lora, config = _native_speech_lora(path, config)
        model.config = config
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


def _is_converted_native(raw: dict) -> bool:
    """A transformers-native checkpoint written by transformers' converter (not by save_pretrained)."""
    return "speechsum" not in raw and raw.get("model_type") != "phi4mm" and "embd_layer" not in raw


def _native_speech_lora(path: Path, config: SpeechLMConfig) -> tuple[dict, SpeechLMConfig]:
    """The speech LoRA of a converted native checkpoint, read from its speech-lora/ folder
    (model/native_extras.py), and the config with its rank and alpha; ({}, config) without one."""
    try:
        found = speech_lora_tensors(path)
    except NativeExtrasError as err:
        raise CheckpointError(str(err)) from None
    if found is None:
        if config.encoder is not None:
            logger.warning("%s: transformers-native checkpoint without its speech LoRA (no %s/ folder beside "
                           "config.json): the decoder was never tuned to this audio encoder; copy %s/ from the "
                           "converted checkpoint to hear as Phi-4-multimodal does", path, SPEECH_LORA_DIR,
                           SPEECH_LORA_DIR)
        return {}, config
    lora, scale, rank = found
    return lora, dataclasses.replace(config, speech_lora_rank=rank, speech_lora_alpha=scale * rank)


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
