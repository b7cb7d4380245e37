"""Tokenizers and the Phi-4MM chat prompt builder.

One small protocol, `Tokenizer`, with two implementations: `SentencePieceTokenizer` (a `.model`
file; the toy models) and `HFTokenizer` (a Hugging Face `tokenizer.json`, as the real checkpoint
ships, through the optional `tokenizers` package; transformers is never imported here).

Chat template (the original Phi-4MM one; the tokenizer adds no BOS, as in Phi-4-mini):

    [<|system|>{system}<|end|>]<|user|><|audio_1|>...<|audio_N|>{instruction}<|end|><|assistant|>
    response: {response}<|end|>[<|endoftext|>]

`<|audio_k|>` is never written as text: the builder takes the number of audio tokens of each
clip (`model.features.num_audio_tokens(num_samples)`, i.e. ceil(frames / 8)) and emits the audio
placeholder id that many times, so the ids are right whatever the backend does with literal
placeholder strings. Text pieces are encoded one by one and joined with the special ids; for a
tokenizer.json this gives the same ids as encoding the whole prompt string, because `tokenizers`
splits on added tokens before encoding the text between them (the tests check this against
transformers). `<|endoftext|>` after `<|end|>` is the answer suffix of the Phi-4MM fine-tuning
script; `build_chat_prompt(..., add_eos=True)` adds it for training targets.

Special tokens are looked up by name (`SPECIAL_TOKENS`), never hard-coded ids; `eos_token_ids`
is (endoftext, end), as in Phi-4MM's generation config, and `config_token_ids(tokenizer)` gives
the ids a model config needs, so the toy config is built from the tokenizer. The ids of both
vocabularies and the backends: docs/tokenizer.md.

Text that contains a special token literally (e.g. "<|end|>") is encoded as that special token
by both backends, as transformers does; callers that take untrusted text should strip them.
"""
from __future__ import annotations

import io
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

# In the order of the real ids; train_sentencepiece gives the toy ids in the same order.
SPECIAL_TOKENS: dict[str, str] = {  # name -> token; real id / toy id (docs/tokenizer.md)
    "endoftext": "<|endoftext|>",  # 199999 / 2 (SentencePiece's eos piece)
    "audio": "<|endoftext11|>",  # 200011 / 4
    "assistant": "<|assistant|>",  # 200019 / 5
    "end": "<|end|>",  # 200020 / 6
    "user": "<|user|>",  # 200021 / 7
    "system": "<|system|>",  # 200022 / 8
}

INSTALL_HINT = "pip install speechsum[phi4mm]"


@dataclass(frozen=True)
class ChatPrompt:
    """Token ids of one chat turn; `input_ids[:prompt_length]` is the prompt, the rest the response."""

    input_ids: list[int]
    prompt_length: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_length]

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.prompt_length :]


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    audio_token_id: int
    special_ids: Mapping[str, int]  # SPECIAL_TOKENS name -> id

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; no BOS/EOS or other special tokens are added."""

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    def build_chat_prompt(
        self,
        instruction: str,
        num_audio_tokens: Sequence[int] = (),
        system: str | None = None,
        response: str | None = None,
        add_eos: bool = False,
    ) -> ChatPrompt: ...

    def encode_response(self, text: str, add_eos: bool = False) -> list[int]: ...


class _ChatTemplate:
    """The Phi-4MM template on top of `encode` and `special_ids`, which each tokenizer defines;
    shared by both tokenizers."""

    special_ids: dict[str, int]
    encode: Callable[[str], list[int]]

    @property
    def audio_token_id(self) -> int:
        return self.special_ids["audio"]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.special_ids["endoftext"], self.special_ids["end"])

    def encode_response(self, text: str, add_eos: bool = False) -> list[int]:
        """`{text}<|end|>`, plus `<|endoftext|>` when `add_eos` (training targets)."""
        ids = self.encode(text) + [self.special_ids["end"]]
        if add_eos:
            ids.append(self.special_ids["endoftext"])
        return ids

    def build_chat_prompt(
        self,
        instruction: str,
        num_audio_tokens: Sequence[int] = (),
        system: str | None = None,
        response: str | None = None,
        add_eos: bool = False,
    ) -> ChatPrompt:
        """Ids of `[<|system|>{system}<|end|>]<|user|>{audio runs}{instruction}<|end|><|assistant|>`.

        `num_audio_tokens` holds one count per clip, in clip order; clip k becomes a run of that
        many audio placeholder ids where the original template has `<|audio_k|>`. With no clips
        the prompt is text only. With `response`, its ids (see `encode_response`) follow the prompt.
        """
        ids: list[int] = []
        if system is not None:
            ids += [self.special_ids["system"], *self.encode(system), self.special_ids["end"]]
        ids.append(self.special_ids["user"])
        for count in _audio_token_counts(num_audio_tokens):
            ids += [self.audio_token_id] * count
        ids += [*self.encode(instruction), self.special_ids["end"], self.special_ids["assistant"]]
        prompt_length = len(ids)
        if response is not None:
            ids += self.encode_response(response, add_eos=add_eos)
        return ChatPrompt(input_ids=ids, prompt_length=prompt_length)


def _audio_token_counts(num_audio_tokens: Sequence[int]) -> list[int]:
    if isinstance(num_audio_tokens, int):
        raise TypeError(
            f"num_audio_tokens must be a sequence with one count per clip, got the int {num_audio_tokens}; "
            f"pass [{num_audio_tokens}] for a single clip"
        )
    counts = [operator.index(count) for count in num_audio_tokens]
    for clip, count in enumerate(counts, start=1):
        if count < 1:
            raise ValueError(
                f"num_audio_tokens[{clip - 1}] (clip <|audio_{clip}|>) is {count}; every clip needs at least one "
                "audio token (model.features.num_audio_tokens(num_samples); clips need >= 400 samples at 16 kHz)"
            )
    return counts


def config_token_ids(tokenizer: Tokenizer) -> dict[str, Any]:
    """Ids a model config must agree with: DecoderConfig's vocab_size, bos_token_id,
    eos_token_ids, pad_token_id and SpeechLMConfig's audio_token_id.

    For the toy models build the config from these. The real checkpoint's embedding table is
    padded (200064 rows) beyond the tokenizer's vocabulary, so its vocab_size comes from config.json.
    """
    return {
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": tuple(tokenizer.eos_token_ids),
        "pad_token_id": tokenizer.pad_token_id,
        "audio_token_id": tokenizer.audio_token_id,
    }


# ---------------------------------------------------------------------------------------------
# SentencePiece (toy models)


class SentencePieceTokenizer(_ChatTemplate):
    """A SentencePiece `.model` whose pieces include `SPECIAL_TOKENS` (see `train_sentencepiece`)."""

    def __init__(self, model_file: str | Path, special_tokens: Mapping[str, str] = SPECIAL_TOKENS):
        import sentencepiece

        self.path = Path(model_file)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"SentencePiece model not found: {self.path}; train one with "
                "model.tokenizer.train_sentencepiece(texts, model_prefix) or pass the path of an existing .model file"
            )
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except RuntimeError as error:
            raise ValueError(f"{self.path} is not a valid SentencePiece model: {error}") from error
        self.special_ids = {}
        for name, piece in special_tokens.items():
            piece_id = self._sp.piece_to_id(piece)
            if piece_id == self._sp.unk_id() and piece != self._sp.id_to_piece(piece_id):
                raise ValueError(
                    f"{self.path}: the vocabulary has no piece {piece!r} (special token '{name}'); "
                    "train the model with model.tokenizer.train_sentencepiece, which adds the chat special tokens"
                )
            self.special_ids[name] = piece_id
        self.vocab_size = self._sp.vocab_size()
        self.bos_token_id = self._sp.bos_id()
        self.pad_token_id = self._sp.pad_id()
        controls = {i for i in range(self.vocab_size) if self._sp.is_control(i)}
        self._special_id_set = controls | set(self.special_ids.values())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            return self._sp.decode([i for i in ids if i not in self._special_id_set])
        # sentencepiece renders control pieces (<pad>, <s>, <|endoftext|>) as ''; show their text.
        parts, run = [], []
        for token_id in ids:
            if self._sp.is_control(token_id):
                parts += [self._sp.decode(run), self._sp.id_to_piece(token_id)]
                run = []
            else:
                run.append(token_id)
        return "".join(parts) + self._sp.decode(run)


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int = 512,
    model_type: str = "bpe",
    byte_fallback: bool = False,
) -> SentencePieceTokenizer:
    """Train a toy SentencePiece model on `texts` and write it to `{model_prefix}.model`.

    Ids: `<pad>` 0, `<s>` 1, `<|endoftext|>` 2 (eos), `<unk>` 3, then the chat special tokens as
    user-defined symbols (fixed ids 4-8, SPECIAL_TOKENS), then the learned pieces.
    Normalisation is the identity, whitespace is kept and no dummy prefix is added, so
    `decode(encode(text)) == text` for text made of characters seen in training (others become
    `<unk>` unless `byte_fallback`, which spends 256 ids on bytes). One thread, no sampling of the
    input, no path stored in the file: the same texts and arguments give the same bytes.
    """
    import sentencepiece

    model_file = Path(f"{model_prefix}.model")
    model_bytes = io.BytesIO()
    user_defined = [token for name, token in SPECIAL_TOKENS.items() if name != "endoftext"]
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_writer=model_bytes,  # a model_prefix would be stored in the file, making it path-dependent
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            eos_piece=SPECIAL_TOKENS["endoftext"],
            user_defined_symbols=user_defined,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=byte_fallback,
            character_coverage=1.0,
            max_sentence_length=1 << 20,  # the default (4192 bytes) silently drops long transcripts
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(f"training the SentencePiece model {model_file} failed: {error}") from error
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model_file.write_bytes(model_bytes.getvalue())
    return SentencePieceTokenizer(model_file)


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (the real checkpoint)


class HFTokenizer(_ChatTemplate):
    """A `tokenizer.json` read with the optional `tokenizers` package.

    `path` is the file or a directory holding it (e.g. the Phi-4-multimodal-instruct checkpoint).
    Special ids are looked up among the file's added tokens. `vocab_size` counts the tokenizer's
    tokens (added ones included); the model's embedding table may be larger. pad and bos are
    `<|endoftext|>`, as in Phi-4MM's config.json (None when `special_tokens` leaves it out: a KD
    teacher's tokenizer read for its text only, rollout/teachers.py).
    """

    def __init__(self, path: str | Path, special_tokens: Mapping[str, str] = SPECIAL_TOKENS):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.json"
        if not self.path.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {self.path}; pass a tokenizer.json or the checkpoint directory "
                "that contains it (e.g. a download of microsoft/Phi-4-multimodal-instruct)"
            )
        try:
            import tokenizers
        except ImportError as error:
            raise ImportError(
                f"reading {self.path} needs the optional `tokenizers` package, which is not installed; "
                f"install it with `{INSTALL_HINT}` (or `pip install tokenizers`)"
            ) from error
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as error:  # tokenizers raises a bare Exception for unreadable files
            raise ValueError(f"{self.path} is not a valid tokenizer.json: {error}") from error
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        added = {token.content: token_id for token_id, token in self._tokenizer.get_added_tokens_decoder().items()}
        self.special_ids = {}
        for name, token in special_tokens.items():
            if token not in added:
                raise ValueError(
                    f"{self.path}: the added tokens have no {token!r} (special token '{name}'), so this is not a "
                    "Phi-4-mini / Phi-4-multimodal tokenizer; use the checkpoint's own tokenizer.json or pass "
                    "special_tokens={name: token} naming tokens this file has"
                )
            self.special_ids[name] = added[token]
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self.special_ids.get("endoftext")
        self.pad_token_id = self.special_ids.get("endoftext")
        self._special_id_set = set(self.special_ids.values())

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_id_set]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special)


def load_tokenizer(path: str | Path, special_tokens: Mapping[str, str] = SPECIAL_TOKENS) -> Tokenizer:
    """A `.model` file -> SentencePiece; a `.json` file or a directory with tokenizer.json -> HF.

    `special_tokens` are the tokens the file must have (name -> text); the default is the Phi-4MM
    chat's. `{}` reads a tokenizer with other special tokens for its ordinary text alone (a KD
    teacher with its own chat template: rollout/teachers.py `load_teacher_tokenizer`); its chat
    builder (`build_chat_prompt`) then cannot be used.
    """
    path = Path(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, special_tokens)
    if path.suffix == ".json" or (path.is_dir() and (path / "tokenizer.json").is_file()):
        return HFTokenizer(path, special_tokens)
    if path.is_dir() and (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model", special_tokens)
    raise FileNotFoundError(
        f"no tokenizer at {path}: expected a SentencePiece .model file, a tokenizer.json, "
        "or a directory containing tokenizer.json or tokenizer.model"
    )
