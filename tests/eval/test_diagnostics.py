"""Judge-free diagnostics on hand-written outputs whose repetition, format and length are known
by counting (the expected numbers are derived in the comments)."""
import math

import pytest

from data.text import repeated_ngram_fraction, tokens
from eval.diagnostics import (
    count,
    diagnose,
    format_valid,
    longest_repeated_span,
    requested_format,
    requested_length,
)
from eval.report import summarize


def test_the_how_to_get_away_loop():
    d = diagnose("- How to Get Away - How to Get Away - How to Get Away", "Give the meeting a title.")
    # tokens: how to get away x3 = 12; 4-grams: 9, distinct: 4 (the four rotations) -> 1 - 4/9
    assert d.words == 12
    assert d.repeated_ngram_fraction == pytest.approx(5 / 9)
    # longest span occurring twice: positions 0-7 equal positions 4-11 (overlapping) -> 8 tokens
    assert (d.longest_repeated_span, d.repeated_span) == (8, "how to get away how to get away")
    assert (d.requested_format, d.format_valid, d.requested_length, d.empty) == (None, None, None, False)


def test_repetition_of_clean_and_degenerate_text():
    clean = tokens("The team agreed on a price of 25 euros and a yellow case.")
    assert repeated_ngram_fraction(clean) == 0.0
    assert longest_repeated_span(clean) == (1, 4)  # "a" at 4 and 10: nothing longer repeats
    assert repeated_ngram_fraction(["a", "b", "c", "d"]) == 0.0  # one 4-gram: nothing to repeat
    looped = tokens("the the the the the the")  # 6 tokens, 3 identical 4-grams -> 2/3; span 5 (shift 1)
    assert repeated_ngram_fraction(looped) == pytest.approx(2 / 3)
    assert longest_repeated_span(looped) == (5, 0)
    assert longest_repeated_span([]) == (0, 0) and longest_repeated_span(["x"]) == (0, 0)
    assert tokens("Mm-hmm, it's 25€ — 会议") == ["mm-hmm", "it's", "25", "会", "议"]


@pytest.mark.parametrize("output, valid", [
    ('{"decisions": ["price: 25 euros"], "actions": []}', True),
    ('```json\n{"decisions": ["price"]}\n```', True),
    ('[1, 2]', True),
    ('{"decisions": ["price"],}', False),  # trailing comma
    ('Here is the JSON: {"decisions": []}', False),  # prose around it
    ('"just a string"', False),
    ("", False),
])
def test_json_validity(output, valid):
    assert diagnose(output, "Return the decisions as JSON.").format_valid is valid


def test_bullets_and_numbered_lists():
    assert requested_format("List the decisions as bullet points.") == "bullets"
    assert requested_format("Give a numbered list of actions.") == "numbered"
    assert requested_format("Return JSON with bullet points inside.") == "json"
    assert requested_format("Summarize.", {"format": "bullets"}) == "bullets"
    assert requested_format("Write prose, not bullet points.", {"format": "prose"}) is None  # metadata decides
    assert format_valid("Decisions:\n- price 25 euros\n- yellow case\n", "bullets")  # heading + 2 bullets
    assert format_valid("* one\n• two", "bullets")
    assert not format_valid("The team agreed on the price. Then they left.", "bullets")
    assert not format_valid("Intro.\nMore prose.\n- one bullet", "bullets")  # 1 of 3 lines
    assert format_valid("1. open\n2) close", "numbered") and not format_valid("- open\n- close", "numbered")


def test_requested_lengths():
    cases = {
        "Summarize in at most 50 words.": ("words", 0, 50, 50),
        "Summarize in under fifty words.": None,  # beyond twenty, numbers must be digits
        "Write between 2 and 4 sentences.": ("sentences", 2, 4, 3),
        "Write 50-80 words.": ("words", 50, 80, 65),
        "Give 3 bullet points.": ("bullets", 3, 3, 3),
        "Give about three key points.": ("bullets", 2, 4, 3),
        "Summarize in about 100 words.": ("words", 75, 125, 100),
        "Summarize in two sentences.": ("sentences", 2, 2, 2),
        "Write at least 5 sentences.": ("sentences", 5, math.inf, 5),
        "Summarize in one paragraph.": ("paragraphs", 1, 1, 1),
        "Summarize the first 10 minutes.": None,
    }
    for instruction, expected in cases.items():
        got = requested_length(instruction)
        assert (None if got is None else (got.unit, got.low, got.high, got.target)) == expected, instruction
    given = requested_length("Summarize.", {"requested_length": {"unit": "words", "min": 10, "max": 20}})
    assert (given.unit, given.low, given.high, given.target) == ("words", 10, 20, 20)
    assert requested_length("Summarize in 3 sentences.", {"requested_length": None}) is None


def test_length_against_the_request():
    text = "The team met. They agreed on 25 euros! Next week: the design?"
    assert count(text, "sentences") == 3 and count(text, "words") == 12
    assert count("- a\n- b\n1. c\nnot a bullet", "bullets") == 3
    assert count("First part.\n\nSecond part.\n  \nThird.", "paragraphs") == 3
    d = diagnose(text, "Summarize in at most 10 words.")
    assert (d.length, d.length_ok, d.length_ratio) == (12, False, 1.2)
    d = diagnose("- price\n- case\n- date", "Give 3 bullet points.")
    assert (d.length, d.length_ok, d.length_ratio, d.format_valid) == (3, True, 1.0, True)
    d = diagnose("One. Two. Three.", "Summarize in two sentences.")
    assert (d.length, d.length_ok) == (3, False)


def test_empty_outputs():
    assert diagnose("", "Summarize.").empty and diagnose("  \n - ... ", "Summarize.").empty
    assert not diagnose("ok", "Summarize.").empty


def test_cell_summary_of_diagnostics_without_a_judge():
    outputs = ["- How to Get Away - How to Get Away - How to Get Away", '{"a": 1}', "not json", ""]
    instructions = ["Title?", "Answer in JSON.", "Answer in JSON.", "Summarize in at most 5 words."]
    samples = [{"diagnostics": diagnose(o, i).to_json(), "hit_max_tokens": k == 0, "judged": False}
               for k, (o, i) in enumerate(zip(outputs, instructions))]
    cell = summarize(samples)
    assert (cell["n_items"], cell["n"], cell["mean"], cell["judge_invalid"]) == (4, 0, None, None)
    assert cell["repetition"] == pytest.approx(5 / 9 / 4)  # only the loop repeats
    assert cell["longest_repeated_span"] == pytest.approx(8 / 4) and cell["max_repeated_span"] == 8
    assert (cell["format_valid"], cell["n_format"]) == (0.5, 2)
    assert (cell["length_ok"], cell["n_length"]) == (1.0, 1)  # "" has 0 <= 5 words
    assert (cell["empty"], cell["hit_max_tokens"]) == (0.25, 0.25)
