"""The teacher's format: its chat template (kd.teacher_template), its tokenizer and the check that
its vocabulary gives the student's tokens the same text, and the swap of end-of-turn ids.

A KD teacher reads the transcript in its own chat format, while the response it scores is the
student's token ids, unchanged. That works for a teacher whose ordinary text tokens are the
student's (the o200k family: Phi-4-mini, GPT-4o-class models, gpt-oss with its own special
tokens). Its special tokens differ, and the one of them inside a response is the end of the turn:
`EndOfTurnMapped` hands the teacher its own end-of-turn id where the student's stands and maps
the teacher's scores back, so the student learns to stop where the teacher would.
"""
from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


TEACHER_TEMPLATE = "Here is the transcript of a recording.\n\n{transcript}\n\n{instruction}"


# kd.teacher_template presets. None: the tokenizer's own Phi-4 template (build_chat_prompt), the
# default; the other strings are templates as described in TeacherChatTemplate.
CHAT_TEMPLATE_PRESETS: dict[str, str | None] = {
    "phi": None,
    # ChatML, the common <|im_start|> / <|im_end|> format; without a system turn, like the default
    "chatml": "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
    # gpt-oss's harmony format. Chosen: a system message in the form the format documents (identity,
    # knowledge cutoff, reasoning effort, valid channels) with reasoning effort low and no date, and the
    # assistant turn opened in the final channel, so the teacher scores the summary as its answer
    # rather than as its reasoning (the analysis channel).
    "harmony": ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                "Knowledge cutoff: 2024-06\n\nReasoning: low\n\n# Valid channels: analysis, commentary, final. "
                "Channel must be included for every message.<|end|>"
                "<|start|>user<|message|>{user}<|end|><|start|>assistant<|channel|>final<|message|>"),
}
# How each preset's assistant turn ends: ChatML closes it with <|im_end|>; a gpt-oss answer in the
# final channel ends the generation with <|return|>.
END_MARKERS = {"chatml": "<|im_end|>", "harmony": "<|return|>"}
TEMPLATE_FIELDS = ("user", "transcript", "instruction")
# Role markers in a template string: special-token text such as <|im_start|> or <|start|>.
MARKER = re.compile(r"<\|[^\s<>|]+\|>")
PHI_ROLE_TOKENS = ("user", "end", "assistant")  # model.tokenizer.SPECIAL_TOKENS names the Phi template needs
TEMPLATE_HELP = ('kd.teacher_template is "" or "phi" (the student\'s Phi-4 template), "chatml", "harmony", or a '
                 "template string with {user} (the user turn: transcript and instruction) or both {transcript} and "
                 "{instruction}, other braces doubled ({{ }}), and the role markers written as the teacher "
                 "tokenizer's special-token text, e.g. "
                 "\"<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n\"")


@dataclass(frozen=True)
class TeacherChatTemplate:
    """The teacher's chat format (config `kd.teacher_template`), parsed and checked once.

    `spec` is what was given: "" or "phi" (the default: the tokenizer's own Phi-4 template,
    `build_chat_prompt`, exactly the prompts of the student's format), a preset name of
    CHAT_TEMPLATE_PRESETS, or a template string. A template string has the fields {user} (the user
    turn, `TEACHER_TEMPLATE` filled with transcript and instruction) or {transcript} and
    {instruction}, literal braces doubled as in `str.format`, and its role markers written as the
    special-token text of the teacher's tokenizer (`<|im_start|>`), which encodes each as one id.
    Ids are built piece by piece, as `build_chat_prompt` does: the template's literal text and each
    field's text are encoded separately and joined, so no marker can arise from the text inside a
    field and the ids at a boundary do not depend on the text across it.
    """

    spec: str
    text: str | None  # the template string; None for "phi"
    parts: tuple[tuple[str, str | None], ...] = ()  # (literal text, field name or None after it)

    @classmethod
    def parse(cls, spec: "str | TeacherChatTemplate") -> "TeacherChatTemplate":
        """The template `spec` names or is; ValueError saying what is wrong (TEMPLATE_HELP)."""
        if isinstance(spec, TeacherChatTemplate):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"expected a string, got {spec!r}; {TEMPLATE_HELP}")
        text = CHAT_TEMPLATE_PRESETS.get(spec or "phi", spec)
        if text is None:
            return cls(spec=spec, text=None)
        try:
            pieces = list(string.Formatter().parse(text))
        except ValueError as error:  # a lone brace
            raise ValueError(f"{_short(spec)} is not a template string ({error}); {TEMPLATE_HELP}") from None
        parts = []
        for literal, field, format_spec, conversion in pieces:
            if field is not None and (field not in TEMPLATE_FIELDS or format_spec or conversion):
                shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{format_spec}" if format_spec
                                                                                  else "") + "}"
                raise ValueError(f"{_short(spec)} has the placeholder {shown}; the placeholders are "
                                 f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}, without format specs; "
                                 f"{TEMPLATE_HELP}")
            parts.append((literal, field))
        fields = {field for _, field in parts if field}
        if "user" not in fields and not {"transcript", "instruction"} <= fields:
            what = f"the placeholders {sorted(fields)}" if fields else "no placeholder"
            preset = "" if fields else f" and is not a preset ({', '.join(CHAT_TEMPLATE_PRESETS)})"
            raise ValueError(f"{_short(spec)} has {what}{preset}, so the teacher would not read the transcript and "
                             f"the instruction; {TEMPLATE_HELP}")
        return cls(spec=spec, text=text, parts=tuple(parts))

    @property
    def name(self) -> str:
        """The preset's name, or "custom" for a template string of one's own."""
        return (self.spec or "phi") if (self.spec or "phi") in CHAT_TEMPLATE_PRESETS else "custom"

    @property
    def markers(self) -> tuple[str, ...]:
        """The special-token texts in the template's literal text, in order of first appearance."""
        found = [m for literal, _ in self.parts for m in MARKER.findall(literal)]
        return tuple(dict.fromkeys(found))

    @property
    def end_marker(self) -> str | None:
        """The special-token text that ends a turn in this format: a preset's own (END_MARKERS), else
        the first marker after the last field (the one closing the user turn); None for "phi", whose
        end-of-turn id is the student's."""
        if self.text is None:
            return None
        if self.name in END_MARKERS:
            return END_MARKERS[self.name]
        last_field = max(index for index, (_, field) in enumerate(self.parts) if field)
        # parts[i] is (the literal before field i, field i): the literals after the last field
        found = [m for literal, _ in self.parts[last_field + 1:] for m in MARKER.findall(literal)]
        return found[0] if found else None

    def tokenizer_problem(self, tokenizer) -> str | None:
        """Why `tokenizer` cannot build this template's prompts, or None: the Phi template needs
        the Phi role tokens among its special ids; a template string needs every marker encoded
        as exactly one id (else the tokenizer has no such special token and would spell it out)."""
        if self.text is None:
            missing = [name for name in PHI_ROLE_TOKENS if name not in getattr(tokenizer, "special_ids", {})]
            if missing:
                return (f"the teacher's tokenizer has no Phi-4 role tokens {missing} for the \"phi\" template; "
                        "set kd.teacher_template to the teacher's own chat template")
            return None
        for marker in self.markers:
            ids = tokenizer.encode(marker)
            if len(ids) != 1:
                return (f"the marker {marker!r} of kd.teacher_template is not one token of the teacher's tokenizer "
                        f"(it encodes as {len(ids)} ids {ids[:8]}), so the tokenizer has no such special token: "
                        "set kd.teacher_tokenizer to the teacher's own tokenizer, or write the markers the "
                        "teacher's tokenizer has")
        return None

    def prompt_ids(self, tokenizer, transcript: str, instruction: str, *, user_template: str = TEACHER_TEMPLATE,
                   system: str | None = None) -> list[int]:
        """Token ids of the teacher's prompt for one (transcript, instruction), ending where the
        teacher's answer starts (the student's response ids are appended to it, unchanged)."""
        user = user_template.format(transcript=transcript, instruction=instruction)
        if self.text is None:
            return tokenizer.build_chat_prompt(user, system=system).input_ids
        if system is not None:
            raise ValueError("a kd.teacher_template string carries its own system turn; write it into the "
                             "template instead of passing system=")
        values = {"user": user, "transcript": transcript, "instruction": instruction}
        ids: list[int] = []
        for literal, field in self.parts:
            if literal:
                ids += tokenizer.encode(literal)
            if field is not None:
                ids += tokenizer.encode(values[field])
        return ids


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def teacher_template_problem(spec) -> str | None:
    """What is wrong with a kd.teacher_template value, or None (train/config.py checks it)."""
    try:
        TeacherChatTemplate.parse(spec)
    except ValueError as error:
        return str(error)
    return None


def load_teacher_tokenizer(path: str | Path, chat_template: "str | TeacherChatTemplate" = ""):
    """The teacher's tokenizer at `path` (what model.tokenizer.load_tokenizer reads): with the Phi-4
    chat's special tokens required for the "phi" template (as the student's); for a template string
    none are, since the teacher has its own (its markers are checked by `tokenizer_problem`)."""
    from model.tokenizer import load_tokenizer

    if TeacherChatTemplate.parse(chat_template).text is None:
        return load_tokenizer(path)
    return load_tokenizer(path, special_tokens={})


# Ordinary text the vocabulary check always reads, besides the data's own: words, capitals, digits,
# punctuation, runs of spaces, newlines, markup, non-ASCII letters and an emoji.
VOCABULARY_SAMPLE = (
    "The team agreed that the remote control should cost 25 euros, and the budget is 1,250.75 in total.",
    "Action items: - Anna sends the design by Friday (3 June).\n- Bob checks the battery; deadline 2024-06-03.",
    'Summary in JSON: {"decisions": ["price", "colour"], "owner": "Marketing"}',
    "  Indented text\twith a tab, UPPER CASE WORDS, camelCase and snake_case_names?!",
    "Café, naïve, Zürich, São Paulo, 東京, Москва: a few words from other scripts; done \U0001F44D",
)


def vocabulary_mismatch(student_tokenizer, teacher_tokenizer, texts: Iterable[str] = ()) -> str | None:
    """Where the teacher's vocabulary gives the student's tokens other text, or None if it never
    does on `texts` + VOCABULARY_SAMPLE.

    The teacher scores the student's token ids as they are, so for ordinary text both tokenizers
    must agree: for each text, the teacher encodes it to the student's ids, decodes each of those
    ids to the student's piece, and decodes the whole sequence to the student's text. Special
    tokens may differ (ids the student's tokenizer counts as special are not compared).
    """
    special = set(getattr(student_tokenizer, "special_ids", {}).values())
    teacher_size = teacher_tokenizer.vocab_size
    for text in [*texts, *VOCABULARY_SAMPLE]:
        if not text:
            continue
        shown = _short(text, 60)
        ids = student_tokenizer.encode(text)
        ordinary = [i for i in ids if i not in special]
        beyond = [i for i in ordinary if i >= teacher_size]
        if beyond:
            return (f"on {shown} the student's tokens include id {beyond[0]}, but the teacher's tokenizer has "
                    f"{teacher_size} tokens")
        for token_id in dict.fromkeys(ordinary):
            mine = student_tokenizer.decode([token_id], skip_special=False)
            theirs = teacher_tokenizer.decode([token_id], skip_special=False)
            if mine != theirs:
                return (f"on {shown} the student's token {token_id} is {mine!r}, but the teacher's token "
                        f"{token_id} is {theirs!r}")
        teacher_ids = teacher_tokenizer.encode(text)
        if teacher_ids != ids:
            at = next((t for t, (a, b) in enumerate(zip(ids, teacher_ids)) if a != b), min(len(ids), len(teacher_ids)))
            return (f"on {shown} the student's tokenizer gives {len(ids)} ids and the teacher's {len(teacher_ids)}, "
                    f"first different at token {at} (student {ids[at:at + 3]}, teacher {teacher_ids[at:at + 3]})")
        mine = student_tokenizer.decode(ordinary, skip_special=False)
        theirs = teacher_tokenizer.decode(ordinary, skip_special=False)
        if mine != theirs:
            return (f"on {shown} the student's ids decode to {_short(mine, 60)} but the teacher's to "
                    f"{_short(theirs, 60)}")
    return None


class EndOfTurnMapped:
    """A teacher whose chat format ends a turn with its own id (`teacher_end`), scoring responses
    that end with the student's (any of `student_ends`; the student's template closes a turn with
    `student_ends[0]`).

    The teacher is handed each response with the student's end ids replaced by `teacher_end`, so it
    scores "the answer ends here" in its own terms, and its distributions are mapped back by
    swapping the two ids: the probability the teacher gives its own end of turn becomes the
    student's end-of-turn probability (the top-k ids, or the two columns of a full distribution).
    Without the swap the last position would pull the student towards whatever the student's
    vocabulary holds at the teacher's id. `prompt` and everything else are the teacher's own.
    """

    def __init__(self, teacher, student_ends: tuple[int, ...], teacher_end: int):
        if not student_ends:
            raise ValueError("EndOfTurnMapped: the student has no end-of-turn id")
        self.teacher, self.student_ends, self.teacher_end = teacher, tuple(student_ends), teacher_end
        self.top_k = teacher.top_k

    def __repr__(self) -> str:
        return f"EndOfTurnMapped({self.teacher!r}, student_ends={self.student_ends}, teacher_end={self.teacher_end})"

    def prompt(self, transcript: str, instruction: str) -> list[int]:
        return self.teacher.prompt(transcript, instruction)

    def score(self, prompts, responses):
        ends = set(self.student_ends)
        mapped = [[self.teacher_end if int(t) in ends else int(t) for t in response] for response in responses]
        scored = self.teacher.score(prompts, mapped)
        mine, theirs = self.student_ends[0], self.teacher_end
        if mine == theirs:
            return scored
        if getattr(scored, "ids", None) is not None:  # top-k: rename the two ids
            ids = scored.ids.clone()
            ids[scored.ids == theirs], ids[scored.ids == mine] = mine, theirs
            return dataclasses.replace(scored, ids=ids)
        logprobs = scored.logprobs.clone()  # (B, T, V): swap the two columns
        logprobs[..., [mine, theirs]] = scored.logprobs[..., [theirs, mine]]
        return dataclasses.replace(scored, logprobs=logprobs)
