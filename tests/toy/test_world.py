"""The toy world's records, dialogue, instructions, references and manifest rows (no audio)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re

from toy import dialogue, speech, tasks
from toy.corpus import (ASR_INSTRUCTION, PRESETS, SPLITS, Sizes, corpus_key, manifest_rows, plan_corpus,
                             plan_meeting, text_items)
from toy.tasks import FAMILIES, Task, applicable, instruction, reference
from toy.world import Meeting, sample_meeting
from toy.oracle import normalize

QUICK = PRESETS["quick"]
# sha256 of the quick plan for seed 0 (records, turns, instructions, references): changes only
# together with toy.corpus.GENERATOR_VERSION.
QUICK_PLAN_SHA256 = "393dd680c530759464ba83b6192bba69a558eed9ba2d040cbc811a6e76b61a31"


def fingerprint(plans) -> str:
    blob = json.dumps({split: [[p.meeting.to_dict(), [dataclasses.asdict(t) for t in p.turns],
                                [[i.task.to_dict(), i.instruction, i.reference] for i in p.items]]
                               for p in planned] for split, planned in plans.items()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def test_same_seed_same_plan_other_seed_other_plan():
    assert fingerprint(plan_corpus(0, QUICK)) == fingerprint(plan_corpus(0, QUICK))
    assert fingerprint(plan_corpus(0, QUICK)) != fingerprint(plan_corpus(1, QUICK))


def test_plan_fingerprint():
    """Pins the generator's output across machines and Python versions (string seeds go through
    SHA-512, not hash()): bump GENERATOR_VERSION and this value together."""
    assert fingerprint(plan_corpus(0, QUICK)) == QUICK_PLAN_SHA256


def test_a_meeting_does_not_depend_on_the_sizes_of_other_splits():
    small, large = plan_corpus(0, QUICK), plan_corpus(0, dataclasses.replace(QUICK, pretrain=40, kd=2))
    assert fingerprint({"sft": small["sft"]}) == fingerprint({"sft": large["sft"]})
    assert fingerprint({"p": small["pretrain"]}) == fingerprint({"p": large["pretrain"][:24]})


def test_record_round_trips_through_json():
    meeting = sample_meeting(random.Random("x"), "m")
    assert Meeting.from_dict(json.loads(json.dumps(meeting.to_dict()))) == meeting


def test_every_fact_is_spoken_and_no_other_number():
    """The oracle scores against the record, so the transcript must contain every entity of the
    record, and no digits but the record's."""
    for planned in (p for split in plan_corpus(3, QUICK).values() for p in split):
        spoken = f" {normalize(planned.transcript)} "
        for entity in planned.meeting.entities():
            assert f" {normalize(entity)} " in spoken, (planned.id, entity)
        numbers = {e for e in planned.meeting.entities() if e.isdigit()}
        assert set(re.findall(r"\d+", planned.transcript)) == numbers


def test_every_family_renders_in_both_styles():
    seen = {style: set() for style in dialogue.STYLES}
    for index in range(40):
        meeting = sample_meeting(random.Random(f"families/{index}"), f"m{index}")
        for task in applicable(meeting):
            for style in dialogue.STYLES:
                text = instruction(meeting, task, style, random.Random(0))
                assert text.strip() and "{" not in text.replace('{"', ""), (task, text)
                seen[style].add(task.family)
            assert reference(meeting, task).strip()
    assert seen == {style: set(FAMILIES) for style in dialogue.STYLES}


def test_shifted_phrasings_and_voices_are_unseen_in_training():
    for slot in dialogue.PHRASES.values():
        assert not set(slot["train"]) & set(slot["shifted"])
    for family in tasks.PHRASINGS.values():
        assert not set(family["train"]) & set(family["shifted"])
    train, unseen = speech.voice_pool("train"), speech.voice_pool("unseen")
    assert len(train) == len(set(train)) >= 300 and not set(train) & set(unseen)
    variants = lambda pool: {v.split("+")[1] for v in pool}  # noqa: E731
    assert not variants(train) & variants(unseen)  # no unseen voice shares its variant with a training one
    plans = plan_corpus(0, QUICK)
    assert {p.style for p in plans["test_shifted"]} == {"shifted"}
    assert {p.style for s in SPLITS if s != "test_shifted" for p in plans[s]} == {"train"}
    unseen_splits = ("validation_voices", "test_voices", "test_shifted")
    assert {p.voice_set for s in unseen_splits for p in plans[s]} == {"unseen"}
    assert {p.voice_set for s in SPLITS if s not in unseen_splits for p in plans[s]} == {"train"}


def test_sample_tasks_draws_distinct_families():
    meeting = sample_meeting(random.Random("tasks"), "m")
    chosen = tasks.sample_tasks(meeting, random.Random(1), 4)
    assert len({t.family for t in chosen}) == 4


def test_manifest_rows_per_split():
    """pretrain: one ASR row per turn + teacher rows with references; sft and tests keep the
    reference; kd and dpo drop it (paper sections 2.2, 2.3); judge_source names the task."""
    plans = plan_corpus(0, QUICK)
    for split in SPLITS:
        planned = plans[split][0]
        segments = [(float(k), k + 0.5) for k in range(len(planned.turns))]
        rows = manifest_rows(planned, 60.0, segments)
        if split == "pretrain":
            assert set(rows) == {"pretrain", "teacher"}
            assert [r["summary"] for r in rows["pretrain"]] == [t.text for t in planned.turns]
            assert {r["instruction"] for r in rows["pretrain"]} == {ASR_INSTRUCTION}
            assert rows["pretrain"][1]["offset"] == 1.0 and rows["pretrain"][1]["duration"] == 0.5
            rows = rows["teacher"]
        else:
            rows = rows[split]
        assert len(rows) == QUICK.instructions
        for row, item in zip(rows, planned.items):
            assert ("summary" in row) == (split not in ("kd", "dpo"))
            assert row["transcript"] == planned.transcript and row["instruction"] == item.instruction
            payload = json.loads(row["judge_source"])
            assert Meeting.from_dict(payload["meeting"]) == planned.meeting
            assert Task.from_dict(payload["task"]) == item.task
            limit = tasks.spec(item.task).max_words
            assert row["format"] == tasks.spec(item.task).format
            assert row["requested_length"] == (None if limit is None else {"unit": "words", "min": 0, "max": limit})


def test_ids_are_unique_across_splits_and_text_meetings_are_disjoint():
    plans = plan_corpus(0, QUICK)
    ids = [p.id for split in plans.values() for p in split]
    assert len(ids) == len(set(ids))
    transcripts = {p.transcript for split in plans.values() for p in split}
    text = text_items(0, 30, QUICK.instructions)
    assert len(text) == 30 * QUICK.instructions and not {t for t, _, _ in text} & transcripts


def test_cache_key_depends_on_seed_and_sizes():
    assert corpus_key(0, QUICK) == corpus_key(0, Sizes(**dataclasses.asdict(QUICK)))
    assert len({corpus_key(0, QUICK), corpus_key(1, QUICK), corpus_key(0, PRESETS["demo"])}) == 3


def test_plan_meeting_rejects_unknown_split():
    try:
        plan_meeting(0, "train", 0, 2)
    except ValueError as error:
        assert "unknown split" in str(error)
    else:
        raise AssertionError("expected a ValueError")
