"""A KD teacher with its own chat template and special tokens (rollout/teachers.py
TeacherChatTemplate): its prompt ids are the template built by hand in the teacher's tokenizer, the
student's response ids follow them unchanged and are scored exactly as the default (Phi template)
path scores the same ids; the default is today's Phi prompt; a tokenizer that lacks the template's
markers, or whose vocabulary gives the student's ids other text, is found out.

The teacher's tokenizer here is a second toy SentencePiece model trained on the same text as the
student's, with gpt-oss's harmony role markers as its five special tokens where the student's has
Phi-4's: the ordinary pieces, and their ids, are the same (checked), as o200k_harmony's are
Phi-4-mini's.
"""
import pytest
import torch

from model.tokenizer import load_tokenizer, train_sentencepiece
from rollout.remote_teacher import OpenAICompatibleTeacher
from rollout.teacher_format import (
    CHAT_TEMPLATE_PRESETS,
    TEACHER_TEMPLATE,
    VOCABULARY_SAMPLE,
    TeacherChatTemplate,
    load_teacher_tokenizer,
    teacher_template_problem,
    vocabulary_mismatch,
)
from rollout.teachers import LocalTeacher, teacher_prompt_ids
from tests.rollout.tiny_checkpoint import HARMONY_MARKERS, build_tiny_checkpoint, corpus, serving, train_with_markers

HARMONY_SYSTEM = ("You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n\n"
                  "Reasoning: low\n\n# Valid channels: analysis, commentary, final. Channel must be included for "
                  "every message.")
TRANSCRIPTS = ("We agreed the remote control should cost 25 euros.", "Budget.")
INSTRUCTIONS = ("Summarize briefly.", "List the action items.")
K = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("teacher_ckpt"))


@pytest.fixture(scope="module")
def student_tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def harmony_path(tmp_path_factory):
    return train_with_markers(corpus(), tmp_path_factory.mktemp("harmony") / "tokenizer.model", HARMONY_MARKERS)


@pytest.fixture(scope="module")
def harmony(harmony_path):
    return load_teacher_tokenizer(harmony_path, "harmony")


@pytest.fixture(scope="module")
def responses(student_tokenizer):
    """The student's response ids: ordinary text, then the student's <|end|> (id 6)."""
    return [student_tokenizer.encode_response("The team agreed on 25 euros."),
            student_tokenizer.encode_response("- design next week")]


def test_the_teacher_tokenizer_shares_the_ordinary_pieces_and_has_its_own_markers(student_tokenizer, harmony):
    """The premise of the tests below: same ordinary pieces at the same ids, other special tokens."""
    student, teacher = student_tokenizer._sp, harmony._sp
    assert student.get_piece_size() == teacher.get_piece_size() == 300
    assert [student.id_to_piece(i) for i in range(9, 300)] == [teacher.id_to_piece(i) for i in range(9, 300)]
    assert [teacher.id_to_piece(i) for i in range(4, 9)] == list(HARMONY_MARKERS)
    assert [student.id_to_piece(i) for i in range(4, 9)] == ["<|endoftext11|>", "<|assistant|>", "<|end|>",
                                                             "<|user|>", "<|system|>"]
    assert harmony.special_ids == {} and harmony.bos_token_id == 1


def test_default_template_is_todays_phi_prompt(student_tokenizer):
    """"" (the default), "phi" and the Phi template written out give the ids build_chat_prompt gives:
    <|user|> (7), the user turn, <|end|> (6), <|assistant|> (5)."""
    tok = student_tokenizer
    user = TEACHER_TEMPLATE.format(transcript=TRANSCRIPTS[0], instruction=INSTRUCTIONS[0])
    expected = [7, *tok.encode(user), 6, 5]
    assert teacher_prompt_ids(tok, TRANSCRIPTS[0], INSTRUCTIONS[0]) == expected
    assert tok.build_chat_prompt(user).input_ids == expected  # what the default path called before
    for spec in ("", "phi", "<|user|>{user}<|end|><|assistant|>",
                 "<|user|>Here is the transcript of a recording.\n\n{transcript}\n\n{instruction}<|end|><|assistant|>"):
        assert teacher_prompt_ids(tok, TRANSCRIPTS[0], INSTRUCTIONS[0], chat_template=spec) == expected, spec
    with_system = teacher_prompt_ids(tok, TRANSCRIPTS[0], INSTRUCTIONS[0], system="Be brief.")
    assert with_system == [8, *tok.encode("Be brief."), 6, *expected]


def test_harmony_prompt_is_the_template_built_by_hand(harmony):
    """The gpt-oss preset: the literal text and the user turn encoded piece by piece, the role markers as
    the teacher's own special ids (<|start|> 4, <|end|> 5, <|message|> 6, <|channel|> 7)."""
    enc = harmony.encode
    start, end, message, channel = 4, 5, 6, 7
    for transcript, instruction in zip(TRANSCRIPTS, INSTRUCTIONS):
        user = f"Here is the transcript of a recording.\n\n{transcript}\n\n{instruction}"
        expected = [start, *enc("system"), message, *enc(HARMONY_SYSTEM), end,
                    start, *enc("user"), message, *enc(user), end,
                    start, *enc("assistant"), channel, *enc("final"), message]
        assert teacher_prompt_ids(harmony, transcript, instruction, chat_template="harmony") == expected
    # {transcript} and {instruction} as fields of their own, in a ChatML-like template of this tokenizer's markers
    spec = "<|start|>user\n{instruction}<|message|>{transcript}<|end|>\n<|start|>assistant\n"
    ids = teacher_prompt_ids(harmony, TRANSCRIPTS[1], INSTRUCTIONS[1], chat_template=spec)
    assert ids == [start, *enc("user\n"), *enc(INSTRUCTIONS[1]), message, *enc(TRANSCRIPTS[1]), end,
                   *enc("\n"), start, *enc("assistant\n")]


def test_own_template_scores_like_the_default_path_given_the_same_prompt_ids(checkpoint, harmony, responses):
    """The response positions' log-probabilities depend on the prompt ids alone: the harmony teacher's
    scores equal the default-template teacher's on the same ids (and a plain forward), and differ
    from the default teacher's on its own (Phi) prompts."""
    own = LocalTeacher.from_pretrained(checkpoint, tokenizer=harmony, chat_template="harmony")
    default = LocalTeacher.from_pretrained(checkpoint)
    assert own.chat_template.name == "harmony" and default.chat_template.name == "phi"
    prompts = [own.prompt(t, i) for t, i in zip(TRANSCRIPTS, INSTRUCTIONS)]
    assert prompts == [teacher_prompt_ids(harmony, t, i, chat_template="harmony")
                       for t, i in zip(TRANSCRIPTS, INSTRUCTIONS)]
    scored, reference = own.score(prompts, responses), default.score(prompts, responses)
    assert scored.mask.sum(-1).tolist() == [len(r) for r in responses]
    assert torch.equal(scored.logprobs, reference.logprobs)
    assert torch.equal(scored.token_logprobs, reference.token_logprobs)
    with torch.no_grad():
        for b, (prompt, response) in enumerate(zip(prompts, responses)):
            n = len(response)
            logits = default.model(torch.tensor([prompt + response]))[0, len(prompt) - 1: -1]
            expected = logits.float().log_softmax(-1)
            torch.testing.assert_close(scored.logprobs[b, :n], expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(scored.token_logprobs[b, :n],
                                       expected.gather(-1, torch.tensor(response)[:, None])[:, 0], atol=1e-5, rtol=0)
    phi_prompts = [default.prompt(t, i) for t, i in zip(TRANSCRIPTS, INSTRUCTIONS)]
    assert phi_prompts != prompts
    on_phi = default.score(phi_prompts, responses)
    assert (on_phi.token_logprobs - scored.token_logprobs).abs().max() > 1e-3  # the template is really used


def test_remote_teacher_builds_the_same_prompt_and_the_server_scores_it_like_the_local_one(checkpoint, harmony,
                                                                                          responses):
    local = LocalTeacher.from_pretrained(checkpoint, tokenizer=harmony, chat_template="harmony", top_k=K)
    with serving(checkpoint, "tiny") as url:
        remote = OpenAICompatibleTeacher(url, "tiny", K, tokenizer=harmony, chat_template="harmony", api_key_env=None)
        prompts = [remote.prompt(t, i) for t, i in zip(TRANSCRIPTS, INSTRUCTIONS)]
        assert prompts == [local.prompt(t, i) for t, i in zip(TRANSCRIPTS, INSTRUCTIONS)]
        got, expected = remote.score(prompts, responses), local.score(prompts, responses)
    assert got.ids[got.mask].tolist() == expected.ids[expected.mask].tolist()
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.token_logprobs, expected.token_logprobs, atol=1e-5, rtol=0)


def test_a_template_whose_markers_the_tokenizer_lacks_is_refused(checkpoint, student_tokenizer, harmony):
    model = LocalTeacher.from_pretrained(checkpoint).model
    with pytest.raises(ValueError) as caught:
        LocalTeacher(model, student_tokenizer, chat_template="harmony")
    message = str(caught.value)
    assert message.startswith("LocalTeacher: the marker '<|start|>' of kd.teacher_template is not one token of the "
                              "teacher's tokenizer (it encodes as ")
    assert "set kd.teacher_tokenizer to the teacher's own tokenizer" in message
    remote = OpenAICompatibleTeacher("http://127.0.0.1:9/v1", "m", K, tokenizer=harmony, api_key_env=None)
    with pytest.raises(ValueError) as caught:
        remote.prompt("Budget.", "Summarize.")
    assert str(caught.value) == ("OpenAICompatibleTeacher.prompt: the teacher's tokenizer has no Phi-4 role tokens "
                                 "['user', 'end', 'assistant'] for the \"phi\" template; set kd.teacher_template to "
                                 "the teacher's own chat template")
    # the Phi tokenizer read as a teacher's for a template string: no special token is required, its own still work
    phi_as_teacher = load_teacher_tokenizer(checkpoint, "<|user|>{user}<|end|><|assistant|>")
    assert phi_as_teacher.special_ids == {} and phi_as_teacher.encode("<|end|><|assistant|>") == [6, 5]


def test_the_same_vocabulary_passes_the_check(student_tokenizer, harmony):
    assert vocabulary_mismatch(student_tokenizer, harmony, corpus(8, seed=5)) is None
    assert vocabulary_mismatch(student_tokenizer, student_tokenizer) is None


def test_a_tokenizer_trained_on_other_text_is_found_out(tmp_path, student_tokenizer):
    other_words = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
                   "oscar papa quebec romeo sierra tango uniform victor whiskey").split()
    texts = [" ".join(other_words[(i * 7 + j) % len(other_words)] for j in range(9)).capitalize() + "."
             for i in range(300)]
    other = train_sentencepiece(texts, tmp_path / "other", vocab_size=300)
    message = vocabulary_mismatch(student_tokenizer, other, ["The budget."])
    first = student_tokenizer.encode("The budget.")[0]
    mine, theirs = student_tokenizer.decode([first]), other.decode([first])
    assert mine != theirs
    assert message == (f"on 'The budget.' the student's token {first} is {mine!r}, but the teacher's token {first} "
                       f"is {theirs!r}")


class Permuted:
    """The student's tokenizer with two ordinary ids swapped: the same text, other ids."""

    def __init__(self, tokenizer, a: int, b: int):
        self.tokenizer, self.swap = tokenizer, {a: b, b: a}
        self.vocab_size, self.special_ids = tokenizer.vocab_size, tokenizer.special_ids

    def encode(self, text):
        return [self.swap.get(i, i) for i in self.tokenizer.encode(text)]

    def decode(self, ids, skip_special=True):
        return self.tokenizer.decode([self.swap.get(i, i) for i in ids], skip_special=skip_special)


def test_permuted_ids_are_found_out(student_tokenizer):
    ids = student_tokenizer.encode(VOCABULARY_SAMPLE[0])
    a, b = ids[0], ids[1]
    pieces = student_tokenizer.decode([a]), student_tokenizer.decode([b])
    assert pieces[0] != pieces[1]
    message = vocabulary_mismatch(student_tokenizer, Permuted(student_tokenizer, a, b))
    assert message == (f"on {VOCABULARY_SAMPLE[0][:57] + '...'!r} the student's token {a} is {pieces[0]!r}, but the "
                       f"teacher's token {a} is {pieces[1]!r}")


def test_a_smaller_teacher_vocabulary_is_found_out(student_tokenizer):
    small = Permuted(student_tokenizer, 9, 9)  # the same tokenizer, said to have 20 tokens
    small.vocab_size = 20
    message = vocabulary_mismatch(student_tokenizer, small, ["The budget."])
    big = next(i for i in student_tokenizer.encode("The budget.") if i >= 20)
    assert message == (f"on 'The budget.' the student's tokens include id {big}, but the teacher's tokenizer has "
                       "20 tokens")


@pytest.mark.parametrize("spec, says", [
    ("chatlm", "'chatlm' has no placeholder and is not a preset (phi, chatml, harmony)"),
    ("<|im_start|>{transcript}<|im_end|>", "'<|im_start|>{transcript}<|im_end|>' has the placeholders ['transcript'], "
                                           "so the teacher would not read the transcript and the instruction"),
    ("<|a|>{usr}", "'<|a|>{usr}' has the placeholder {usr}; the placeholders are {user}, {transcript}, "
                   "{instruction}, without format specs"),
    ("{user!r}", "'{user!r}' has the placeholder {user!r}"),
    ("<|a|>{user}{", "'<|a|>{user}{' is not a template string (Single '{' encountered in format string)"),
])
def test_bad_template_strings_say_what_is_wrong(spec, says):
    problem = teacher_template_problem(spec)
    assert problem.startswith(says) and problem.endswith('<|im_start|>assistant\\n"')
    with pytest.raises(ValueError, match="kd.teacher_template is"):
        TeacherChatTemplate.parse(spec)


def test_presets_and_literal_braces_parse():
    assert TeacherChatTemplate.parse("").text is None and TeacherChatTemplate.parse("phi").name == "phi"
    chatml = TeacherChatTemplate.parse("chatml")
    assert chatml.text == CHAT_TEMPLATE_PRESETS["chatml"] and chatml.markers == ("<|im_start|>", "<|im_end|>")
    assert TeacherChatTemplate.parse("harmony").markers == ("<|start|>", "<|message|>", "<|end|>", "<|channel|>")
    braces = TeacherChatTemplate.parse('<|s|>{{"json": 1}} {user}<|e|>')
    assert braces.name == "custom" and braces.parts == (('<|s|>{', None), ('"json": 1}', None), (' ', 'user'),
                                                        ('<|e|>', None))


def test_end_markers_of_the_presets_and_of_a_template_string():
    assert TeacherChatTemplate.parse("").end_marker is None  # phi: the student's own end of turn
    assert TeacherChatTemplate.parse("chatml").end_marker == "<|im_end|>"
    assert TeacherChatTemplate.parse("harmony").end_marker == "<|return|>"
    custom = "<|begin|>{transcript}<|sep|>{instruction}<|eot|>\n<|assistant|>"
    assert TeacherChatTemplate.parse(custom).end_marker == "<|eot|>"  # the first marker after the last field


class RecordingTeacher:
    """Returns fixed scores and remembers the responses it was asked to score."""

    top_k = 3

    def __init__(self, scored):
        self.scored, self.seen = scored, []

    def prompt(self, transcript, instruction):
        return [1, 2]

    def score(self, prompts, responses):
        self.seen.append(responses)
        return self.scored


def test_end_of_turn_mapping_swaps_the_two_ids_both_ways():
    """Student ends (6, 2) with 6 its template's <|end|>; the teacher's end of turn is id 9. The
    teacher must see 9 where the student wrote 6 or 2, and its top-k / full distribution comes
    back with 9 and 6 exchanged, so the student's <|end|> gets the teacher's end-of-turn mass."""
    from rollout.teacher_format import EndOfTurnMapped
    from rollout.teachers import FullLogprobs, TopKLogprobs

    mask = torch.tensor([[True, True, True]])
    topk = TopKLogprobs(ids=torch.tensor([[[4, 5, 6], [9, 4, 7], [9, 6, 5]]]),
                        logprobs=torch.log(torch.tensor([[[0.5, 0.3, 0.1], [0.6, 0.2, 0.1], [0.9, 0.05, 0.02]]])),
                        token_logprobs=torch.tensor([[-0.7, -1.6, -0.1]]), mask=mask)
    teacher = RecordingTeacher(topk)
    mapped = EndOfTurnMapped(teacher, student_ends=(6, 2), teacher_end=9)
    out = mapped.score([[1, 2]], [[4, 7, 6]])
    assert teacher.seen == [[[4, 7, 9]]] and mapped.top_k == 3 and mapped.prompt("t", "i") == [1, 2]
    assert out.ids.tolist() == [[[4, 5, 9], [6, 4, 7], [6, 9, 5]]]
    assert torch.equal(out.logprobs, topk.logprobs) and torch.equal(out.token_logprobs, topk.token_logprobs)
    assert mapped.score([[1, 2]], [[2]]) is not None and teacher.seen[-1] == [[9]]  # the other stop id too

    full = torch.log_softmax(torch.arange(10.0).repeat(1, 3, 1), dim=-1)  # (1, 3, V=10)
    teacher = RecordingTeacher(FullLogprobs(logprobs=full, token_logprobs=full[..., 0], mask=mask))
    out = EndOfTurnMapped(teacher, (6, 2), 9).score([[1, 2]], [[4, 7, 6]])
    expected = full.clone()
    expected[..., 6], expected[..., 9] = full[..., 9], full[..., 6]
    assert torch.equal(out.logprobs, expected) and torch.equal(full, teacher.scored.logprobs)  # not in place
