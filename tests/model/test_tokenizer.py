"""Tokenizers and the Phi-4MM chat prompt: fixed toy ids, exact prompt id sequences, parity of
the tokenizer.json path with transformers' PreTrainedTokenizerFast, and the error messages."""
import random
import sys

import pytest
import sentencepiece

from model.tokenizer import (
    SPECIAL_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    config_token_ids,
    load_tokenizer,
    train_sentencepiece,
)

WORDS = (
    "the meeting team budget project design remote control we decided agreed next week price "
    "battery button marketing manager said that should cost euros and user interface"
).split()

# Toy ids documented in model/tokenizer.py: <pad> 0, <s> 1, <|endoftext|> 2, <unk> 3, then the
# chat tokens in the order of the real ids.
PAD, BOS, ENDOFTEXT, UNK, AUDIO, ASSISTANT, END, USER, SYSTEM = range(9)


def make_corpus(num_sentences=300, seed=0):
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ", 25 euros."]))
    return sentences


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return train_sentencepiece(make_corpus(), tmp_path_factory.mktemp("spm") / "toy", vocab_size=160)


# ---------------------------------------------------------------------------------------------
# SentencePiece


def test_toy_special_ids_are_fixed(toy):
    assert toy.special_ids == {
        "endoftext": ENDOFTEXT, "audio": AUDIO, "assistant": ASSISTANT, "end": END, "user": USER, "system": SYSTEM,
    }
    assert (toy.pad_token_id, toy.bos_token_id, toy.eos_token_ids, toy.audio_token_id) == (PAD, BOS, (2, 6), AUDIO)
    assert config_token_ids(toy) == {
        "vocab_size": 160, "bos_token_id": 1, "eos_token_ids": (2, 6), "pad_token_id": 0, "audio_token_id": 4,
    }


def test_toy_training_is_reproducible(tmp_path):
    first = train_sentencepiece(make_corpus(), tmp_path / "a" / "toy", vocab_size=160)
    second = train_sentencepiece(make_corpus(), tmp_path / "b" / "toy", vocab_size=160)
    assert first.path.read_bytes() == second.path.read_bytes()


@pytest.mark.parametrize("text", [
    "The budget meeting agreed.",
    "we decided  that the price should cost 25 euros, next week!",  # double space is kept
    "",
])
def test_toy_encode_decode_round_trip(toy, text):
    ids = toy.encode(text)
    assert toy.decode(ids) == text
    assert not set(ids) & {PAD, BOS, UNK, *toy.special_ids.values()}  # encode adds no special token
    assert len(ids) <= len(text) / 2  # real merges, not one id per character


def test_toy_decode_special_tokens(toy):
    ids = [USER, *toy.encode("Budget."), END, ENDOFTEXT, PAD]
    assert toy.decode(ids) == "Budget."
    assert toy.decode(ids, skip_special=False) == "<|user|>Budget.<|end|><|endoftext|><pad>"


def test_toy_chat_prompt_one_clip(toy):
    instruction = "Summarize the meeting."
    prompt = toy.build_chat_prompt(instruction, num_audio_tokens=[5])
    expected = [USER, AUDIO, AUDIO, AUDIO, AUDIO, AUDIO, *toy.encode(instruction), END, ASSISTANT]
    assert prompt.input_ids == expected
    assert prompt.prompt_length == len(expected)
    assert prompt.response_ids == []


def test_toy_chat_prompt_system_two_clips_and_response(toy):
    """Two clips give two adjacent placeholder runs (3 then 2 ids): the model splits them by the
    per-clip counts, as `<|audio_1|><|audio_2|>` in the original template."""
    system, instruction, response = "You are the manager.", "Summarize both meetings.", "The team agreed."
    prompt = toy.build_chat_prompt(instruction, [3, 2], system=system, response=response, add_eos=True)
    expected_prompt = [SYSTEM, *toy.encode(system), END, USER, *[AUDIO] * 5, *toy.encode(instruction), END, ASSISTANT]
    expected_response = [*toy.encode(response), END, ENDOFTEXT]
    assert prompt.input_ids == expected_prompt + expected_response
    assert prompt.prompt_length == len(expected_prompt)
    assert prompt.prompt_ids == expected_prompt
    assert prompt.response_ids == expected_response
    assert toy.decode(prompt.response_ids) == response


def test_toy_chat_prompt_text_only(toy):
    transcript = "We decided the price next week."
    prompt = toy.build_chat_prompt(transcript)
    assert prompt.input_ids == [USER, *toy.encode(transcript), END, ASSISTANT]
    # Encoding piece by piece equals encoding the whole template string (user-defined symbols).
    assert prompt.input_ids == toy.encode(f"<|user|>{transcript}<|end|><|assistant|>")


def test_toy_encode_response(toy):
    assert toy.encode_response("Agreed.") == [*toy.encode("Agreed."), END]
    assert toy.encode_response("Agreed.", add_eos=True) == [*toy.encode("Agreed."), END, ENDOFTEXT]


def test_bad_audio_token_counts(toy):
    with pytest.raises(ValueError, match=r"num_audio_tokens\[1\] \(clip <\|audio_2\|>\) is 0"):
        toy.build_chat_prompt("Summarize.", [4, 0])
    with pytest.raises(TypeError, match=r"pass \[7\] for a single clip"):
        toy.build_chat_prompt("Summarize.", 7)


def test_sentencepiece_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found: .*missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_text("not a model")
    with pytest.raises(ValueError, match="garbage.model is not a valid SentencePiece model"):
        SentencePieceTokenizer(garbage)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(make_corpus()), model_prefix=str(tmp_path / "plain"), vocab_size=100, minloglevel=2
    )
    with pytest.raises(ValueError, match=r"plain.model: the vocabulary has no piece '<\|endoftext\|>'"):
        SentencePieceTokenizer(tmp_path / "plain.model")
    with pytest.raises(ValueError, match=r"training the SentencePiece model .*tiny.model failed: .*Vocabulary size"):
        train_sentencepiece(make_corpus(), tmp_path / "tiny", vocab_size=12)


# ---------------------------------------------------------------------------------------------
# tokenizer.json


def write_tokenizer_json(path, special_tokens, plain_added_tokens=()):
    """A small byte-level BPE tokenizer.json with `special_tokens` added after the learned vocab,
    as in the real file (there the chat tokens sit at ids 199999-200022); `plain_added_tokens`
    are added tokens not flagged special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(make_corpus(), trainer)
    tokenizer.add_special_tokens(list(special_tokens))
    tokenizer.add_tokens(list(plain_added_tokens))
    tokenizer.save(str(path))
    return tokenizer


# Real names, in a shuffled order (plus the image placeholder) so ids differ from the toy's.
PHI4MM_ADDED = ["<|system|>", "<|endoftext10|>", "<|end|>", "<|endoftext|>", "<|user|>", "<|endoftext11|>", "<|assistant|>"]


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    reference = write_tokenizer_json(directory / "tokenizer.json", PHI4MM_ADDED)
    return directory, reference


def test_hf_special_ids_come_from_added_tokens(hf_files):
    directory, reference = hf_files
    tokenizer = HFTokenizer(directory)  # a checkpoint directory works as well as the file
    expected = {name: reference.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    base = reference.get_vocab_size(with_added_tokens=False)
    assert expected == {  # added in PHI4MM_ADDED order right after the learned vocabulary
        "system": base, "end": base + 2, "endoftext": base + 3, "user": base + 4, "audio": base + 5, "assistant": base + 6,
    }
    assert tokenizer.special_ids == expected
    assert tokenizer.vocab_size == base + len(PHI4MM_ADDED)
    assert tokenizer.eos_token_ids == (base + 3, base + 2)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.audio_token_id) == (base + 3, base + 3, base + 5)


def test_hf_encode_decode_match_transformers(hf_files):
    from transformers import PreTrainedTokenizerFast

    directory, _ = hf_files
    tokenizer = HFTokenizer(directory / "tokenizer.json")
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    for text in ["The budget meeting agreed.", "we decided  that the price should cost 25 euros!", "zebra ünïcode"]:
        ids = tokenizer.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text == oracle.decode(ids)
    ids = [tokenizer.special_ids["user"], *tokenizer.encode("Budget."), tokenizer.special_ids["end"]]
    assert tokenizer.decode(ids) == "Budget."
    assert tokenizer.decode(ids, skip_special=False) == "<|user|>Budget.<|end|>"


def test_hf_chat_prompt_matches_transformers_on_the_template_string(hf_files):
    from transformers import PreTrainedTokenizerFast

    directory, _ = hf_files
    tokenizer = HFTokenizer(directory / "tokenizer.json")
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    ids = tokenizer.special_ids
    system, instruction, response = "You are the manager.", "Summarize the meeting.", "The team agreed."

    prompt = tokenizer.build_chat_prompt(instruction, [3, 2], system=system, response=response, add_eos=True)
    expected_prompt = [
        ids["system"], *tokenizer.encode(system), ids["end"], ids["user"], *[ids["audio"]] * 5,
        *tokenizer.encode(instruction), ids["end"], ids["assistant"],
    ]
    assert prompt.input_ids == expected_prompt + [*tokenizer.encode(response), ids["end"], ids["endoftext"]]
    assert prompt.prompt_length == len(expected_prompt)
    template = (
        f"<|system|>{system}<|end|><|user|>{'<|endoftext11|>' * 5}{instruction}<|end|><|assistant|>"
        f"{response}<|end|><|endoftext|>"
    )
    assert prompt.input_ids == oracle.encode(template, add_special_tokens=False)

    text_only = tokenizer.build_chat_prompt(instruction)
    assert text_only.input_ids == oracle.encode(f"<|user|>{instruction}<|end|><|assistant|>", add_special_tokens=False)


def test_hf_missing_special_token(tmp_path):
    write_tokenizer_json(tmp_path / "tokenizer.json", [t for t in PHI4MM_ADDED if t != "<|endoftext11|>"])
    with pytest.raises(ValueError, match=r"tokenizer.json: the added tokens have no '<\|endoftext11\|>' \(special token 'audio'\)"):
        HFTokenizer(tmp_path / "tokenizer.json")


def test_hf_decode_skips_chat_tokens_not_flagged_special(tmp_path):
    write_tokenizer_json(tmp_path / "tokenizer.json", [t for t in PHI4MM_ADDED if t != "<|user|>"], ["<|user|>"])
    tokenizer = HFTokenizer(tmp_path / "tokenizer.json")
    ids = [tokenizer.special_ids["user"], *tokenizer.encode("Budget."), tokenizer.special_ids["end"]]
    assert tokenizer.decode(ids) == "Budget."
    assert tokenizer.decode(ids, skip_special=False) == "<|user|>Budget.<|end|>"


def test_hf_missing_tokenizers_package(hf_files, monkeypatch):
    directory, _ = hf_files
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(ImportError, match=r"needs the optional `tokenizers` package.*pip install speechsum\[phi4mm\]"):
        HFTokenizer(directory / "tokenizer.json")


def test_hf_missing_and_invalid_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer file not found: .*nowhere.tokenizer.json"):
        HFTokenizer(tmp_path / "nowhere" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer file not found: .*tokenizer.json"):
        HFTokenizer(tmp_path)  # a directory without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json"):
        HFTokenizer(tmp_path)


def test_load_tokenizer_picks_the_backend(toy, hf_files, tmp_path):
    directory, _ = hf_files
    assert isinstance(load_tokenizer(toy.path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(directory), HFTokenizer)
    assert isinstance(load_tokenizer(directory / "tokenizer.json"), HFTokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path)
