"""The oracle judge: references score 7, hand-made bad answers score what the formula says.

Every expected value below is derived from the formula of toy/oracle.py,
    overall = clip(1 + 6 R P - 3 (1 - C) - L - min(3, 6 Q) - H, 1, 7),
on the hand-made meeting of tests/toy/meeting.py (Alice and Bruno; the budget: cut the travel
costs, 4500 euros, Bruno sends the draft by Friday; the website: add a search bar).
"""
from __future__ import annotations

import json

import pytest

from toy.corpus import PRESETS, plan_corpus
from toy.tasks import FAMILIES, Task, applicable, reference
from eval.judge import Judge
from toy.oracle import OracleJudge, normalize
from tests.toy.meeting import MEETING, source

judge = OracleJudge()
WHO = Task("who", {"task": "send the draft"})
BULLETS = Task("bullets")
JSON = Task("json", {"keys": ["topics", "decisions", "action_items"]})
BRIEF = Task("brief")


def overall(task: Task, summary: str) -> float:
    return judge.score(source(task), "ignored: the task is in the source", summary).overall


def test_implements_the_judge_protocol():
    assert isinstance(judge, OracleJudge) and callable(Judge.score) and callable(judge.prefer)


def test_reference_scores_exactly_7_for_every_family_and_split():
    """Over the quick corpus plan (every split, both phrasing styles) and every applicable task of
    the hand-made meeting: overall 7, adherence 7, no hallucination."""
    seen = set()
    for planned_split in plan_corpus(0, PRESETS["quick"]).values():
        for planned in planned_split:
            for item in planned.items:
                src = json.dumps({"meeting": planned.meeting.to_dict(), "task": item.task.to_dict()})
                result = judge.score(src, item.instruction, item.reference)
                assert (result.overall, result.adherence, result.hallucination) == (7.0, 7.0, 0), (item, result)
                seen.add(item.task.family)
    for task in applicable(MEETING):
        assert overall(task, reference(MEETING, task)) == 7.0, task
        seen.add(task.family)
    assert seen == set(FAMILIES)


@pytest.mark.parametrize("summary", ["", "   \n\t "])
def test_empty_scores_1(summary):
    result = judge.score(source(BRIEF), "", summary)
    assert (result.overall, result.adherence, result.hallucination) == (1.0, 1.0, 0)


def test_matching_ignores_case_punctuation_and_digit_commas():
    """Upper case, extra punctuation and "4,500" still match the atoms: the reference's score."""
    assert normalize("4,500 Euros -- BRUNO!!") == "4500 euros bruno"
    assert overall(WHO, "BRUNO is responsible for it -- due friday!!") == 7.0
    assert overall(Task("list_every", {"what": "figures"}), "* remaining budget: 4,500 euros") == 7.0


def test_repeated_reference_scores_4():
    """The bullets reference (n words) three times: R = P = C = 1, L = 0 (no limit), and distinct
    4-grams are the n - 3 inside one copy plus 3 across a boundary = n of 3n - 3, so
    Q = 1 - n / (3n - 3) >= 1/2 for n >= 3 and min(3, 6Q) = 3: overall 1 + 6 - 3 = 4."""
    text = reference(MEETING, BULLETS)
    assert overall(BULLETS, "\n".join([text] * 3)) == 4.0


def test_degenerate_loop_scores_1():
    """The paper's KD failure, one phrase looped: "- Bruno will send the draft" x 10. Facts of the
    bullets family: 2 topics, 2 decisions, 1 figure, 1 action; only the action's owner and task
    are mentioned: R = (2/3) / 6 = 1/9; P = 1; Q = 1 - 6/46 (6 distinct of 46 4-grams) -> 3;
    overall = 1 + 6/9 - 3 < 1 -> 1."""
    assert overall(BULLETS, " ".join(["- Bruno will send the draft"] * 10)) == 1.0


def test_hallucinated_owner():
    """"Zoe is responsible for it, due Friday.": R = (0 + 1) / 2 = 1/2 (owner missing, deadline
    said); entities {zoe, friday}, zoe not in the meeting: P = 1/2, H = 1; C = 1, 7 words <= 30,
    Q = 0: overall = 1 + 6 / 4 - 1 = 1.5."""
    result = judge.score(source(WHO), "", "Zoe is responsible for it, due Friday.")
    assert (result.overall, result.hallucination) == (1.5, 1)
    assert "zoe" in result.explanation


def test_hallucinated_figure():
    """The bullets reference with 4500 replaced by 9900: the figure fact has 1 of 2 atoms, so
    R = (5 + 1/2) / 6 = 11/12; entities budget, website, the two decisions, bruno, send the draft,
    friday, 9900: P = 7/8; H = 1: overall = 1 + 6 * 77/96 - 1 = 4.8125 -> 4.81."""
    text = reference(MEETING, BULLETS).replace("4500", "9900")
    assert overall(BULLETS, text) == 4.81


def test_answer_about_another_meeting_scores_1():
    """Entities all foreign (Keiko, the newsletter, stop the print edition, Tuesday): R = 0 for the
    who family's owner and deadline, P = 0, H = 1: overall = 1 - 1 -> 1."""
    text = "Keiko is responsible for it, due Tuesday. On the newsletter we decided to stop the print edition."
    result = judge.score(source(WHO), "", text)
    assert (result.overall, result.hallucination) == (1.0, 1)


@pytest.mark.parametrize("task, expected", [
    (JSON, 4.0),     # the brief reference (all topics, decisions, actions): R = P = 1, C = 0: 1 + 6 - 3
    (Task("email"), 4.0),   # no greeting, no sign-off: C = 0; decisions and the action all there
    (BULLETS, 3.0),  # one prose line: C = 0/1; the figure fact missing: R = 5/6: 1 + 5 - 3
])
def test_wrong_format(task, expected):
    assert overall(task, reference(MEETING, BRIEF)) == expected


def test_json_with_a_missing_key_and_in_a_code_fence():
    """Fenced JSON parses; without "action_items": C = 2/3 and the action fact is missing,
    R = 4/5 (topics 2, decisions 2 of 5 facts): overall = 1 + 4.8 - 1 = 4.8."""
    payload = {"topics": ["the budget", "the website"], "decisions": ["cut the travel costs", "add a search bar"]}
    assert overall(JSON, "```json\n" + json.dumps(payload) + "\n```") == 4.8
    assert overall(JSON, "```json\n" + reference(MEETING, JSON) + "\n```") == 7.0


def test_length_limit_overrun():
    """Limit 15 words, answer = the brief reference (27 words, all decisions in it): R = P = C = 1,
    Q = 0, L = min(2, 2 (27 - 15) / 15) = 1.6: overall = 7 - 1.6 = 5.4."""
    text = reference(MEETING, BRIEF)
    assert len(text.split()) == 27
    assert overall(Task("length_limit", {"max_words": 15}), text) == 5.4


def test_prefer_is_the_score_order_and_ties_are_ties():
    good, bad = reference(MEETING, WHO), "Zoe is responsible for it, due Friday."
    src = source(WHO)
    assert judge.prefer(src, "", good, bad) == "a"
    assert judge.prefer(src, "", bad, good) == "b"
    assert judge.prefer(src, "", good, "Bruno is responsible, due Friday.") == "tie"


def test_source_that_is_not_the_toy_world_is_a_clear_error():
    with pytest.raises(ValueError, match="judge_source"):
        judge.score("Alice: hello everyone ...", "Summarize.", "A summary.")


def test_prefer_many_matches_prefer_in_both_orders():
    """The oracle's batch form for eval.preferences: the same verdict as `prefer`, identical in
    both orders (no position bias), ties kept as ties."""
    judge = OracleJudge()
    task = Task("brief")
    good = reference(MEETING, task)
    bad = (good + " ") * 3
    items = [(source(task), "", good, bad), (source(task), "", bad, good), (source(task), "", good, good)]
    verdicts = judge.prefer_many(items)
    assert [v.winner for v in verdicts] == [judge.prefer(*item) for item in items] == ["a", "b", "tie"]
    assert all(v.first == v.second == v.winner for v in verdicts)
