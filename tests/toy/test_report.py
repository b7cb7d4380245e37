"""toy/report.py: the claims' verdicts are computed from the cells, per test split, and the
validation section from the `validation` cells and pretrain.json.

Hand-made cells: SFT 3.0, SFT+KD 4.0 on test_in and test_voices and 2.5 on test_shifted (so "KD >
SFT" holds on test_in and test_voices only), repetition 0.20 after KD and 0.08 after DPO on
test_in (0.08 <= 0.10: "at most half" holds there only), intervals [mean - 0.5, mean + 0.5]
(3.0 vs 4.0 touch at 3.5: they overlap). Validation: the SFT student recalls 0.10 of the facts
from the audio, its backbone 0.40 from the transcript (ratio 0.25); 80% of SFT's outputs sit at
the floor.
"""
import copy
import json

import pytest

from toy.report import _verdict, claims, floor_paragraph, write_report


def cell(mean, repetition=0.0, hallucination=0.0, **extra):
    return {"mean": mean, "ci_low": mean - 0.5, "ci_high": mean + 0.5, "repetition": repetition,
            "hallucination_rate": hallucination, "n": 60, **extra}


CELLS = {
    "teacher_text": {"test_in": cell(6.0), "test_voices": cell(6.0), "test_shifted": cell(5.5),
                     "validation": cell(5.0, hallucination=0.05, fact_recall=0.9, at_floor=0.0)},
    "student_text": {"validation": cell(2.0, hallucination=0.25, fact_recall=0.40, at_floor=0.3)},
    "sft": {"test_in": cell(3.0, 0.05), "test_voices": cell(3.0, 0.05), "test_shifted": cell(3.0, 0.05),
            "validation": cell(1.2, 0.05, fact_recall=0.10, at_floor=0.8)},
    "sft_kd": {"test_in": cell(4.0, 0.20), "test_voices": cell(4.0, 0.20), "test_shifted": cell(2.5, 0.20),
               "validation": cell(1.5, 0.2, fact_recall=0.15, at_floor=0.6)},
    "sft_kd_dpo": {"test_in": cell(4.5, 0.08), "test_voices": cell(4.5, 0.12), "test_shifted": cell(3.5, 0.12)},
    "sft_kd_top20": {"test_in": cell(4.0, 0.20), "test_voices": cell(4.0, 0.20),
                     "test_shifted": cell(2.5, 0.20)},  # equal to sft_kd
}

ASR_SEEN = {"meeting_word_error": 0.5, "window_word_error": 0.4, "turn_word_error": 0.3, "meetings": 30,
            "windows": 30, "turns": 40}
PRETRAIN = {  # toy/pretrain.py's pretrain.json; the student's unseen-voice check is missing (a partial run)
    "teacher": {"loss": 0.3, "validation": {"rows": 60, "score": 4.5, "floor": 0.05, "hallucination": 0.1,
                                            "recall": 0.8}},
    "encoder_ctc": {"steps": 100, "loss": 1.0, "validation": ASR_SEEN,
                    "validation_voices": {"meeting_word_error": 0.7, "window_word_error": 0.6,
                                          "turn_word_error": 0.5}},
    "student": {"loss": 0.5, "asr_train_voices": {"meeting_word_error": 0.9, "window_word_error": 0.35,
                                                  "turn_word_error": 0.25},
                "validation_text": {"rows": 60, "score": 2.0, "floor": 0.4, "hallucination": 0.3, "recall": 0.4}},
}


def by_text(start):
    return next(c for c in claims(CELLS) if c["claim"].startswith(start))


def test_verdicts_per_split():
    kd = by_text("SFT+KD scores above SFT")
    assert kd["splits"]["test_in"]["holds"] is True and kd["splits"]["test_voices"]["holds"] is True
    assert kd["splits"]["test_shifted"]["holds"] is False
    assert kd["splits"]["test_in"]["intervals_overlap"] is True
    assert _verdict(kd) == "mixed: holds on test_in and test_voices only, within the noise (95% intervals overlap)"
    gap = by_text("modality gap")
    assert gap["splits"]["test_in"]["intervals_overlap"] is False  # [5.5, 6.5] vs [2.5, 3.5]
    assert _verdict(gap) == "reproduced on all three splits, intervals apart"
    half = by_text("repetition after DPO")
    assert half["splits"]["test_in"]["holds"] is True  # 0.08 <= 0.5 * 0.20
    assert half["splits"]["test_voices"]["holds"] is False  # 0.12 > 0.10
    assert half["splits"]["test_shifted"]["holds"] is False
    assert _verdict(half) == "mixed: holds on test_in only (no interval for this measure)"
    weak = by_text("a strong teacher")
    assert weak["splits"]["test_in"]["holds"] is None  # sft_kd_weak was not evaluated
    assert _verdict(weak) == "not measured (test_in, test_voices, test_shifted missing)"
    tie = by_text("full-vocabulary KD")  # an "at least" claim: equal means do not count as holding
    assert tie["splits"]["test_in"]["equal"] and tie["splits"]["test_in"]["holds"] is False
    assert _verdict(tie) == "no difference (equal means on all three splits)"


def test_claims_use_test_splits_only():
    assert set(by_text("modality gap")["splits"]) == {"test_in", "test_voices", "test_shifted"}


def test_report_files(tmp_path):
    work, out, corpus, models = tmp_path / "work", tmp_path / "out", tmp_path / "corpus", tmp_path / "models"
    (work / "eval").mkdir(parents=True)
    (work / "eval" / "results.json").write_text(json.dumps(CELLS))
    (work / "dpo_sft").mkdir()
    (work / "dpo_sft" / "skipped.txt").write_text("no pair\n")
    out.mkdir()
    (out / "results.png").write_bytes(b"a plot of an earlier run")
    report = write_report(work, out, corpus, models, {"sft": 12.0})
    assert not (out / "results.png").exists()  # no plot in this run's eval folder: the old one goes
    text = report.read_text()
    assert ("**mixed: holds on test_in and test_voices only, within the noise (95% intervals overlap)**: "
            "SFT+KD scores above SFT") in text
    assert "**reproduced on all three splits, intervals apart**: modality gap" in text
    assert "**holds in the means on all three splits (no interval for this measure)**: KD adds repetition" in text
    assert "- Reproduced clearly (holds on all three splits, 95% intervals apart): modality gap." in text
    assert "- Mixed (holds on some splits only): KD > SFT; DPO halves repetition." in text
    assert "SFT+DPO (no KD) (skipped: the judge kept no preference pair)" in text
    assert "test_voices score" in text  # a column per test split
    assert "At this scale the audio student sits at the judge's floor" not in text  # no floor share on the tests
    results = json.loads((out / "results.json").read_text())
    assert results["scores"]["sft_kd"] == {"test_in": 4.0, "test_voices": 4.0, "test_shifted": 2.5}
    assert results["scores"]["sft_dpo"] == {"test_in": None, "test_voices": None, "test_shifted": None}
    verdicts = {c["claim"].split(":")[0]: c["verdict"] for c in results["claims"]}
    assert verdicts["modality gap"] == "reproduced on all three splits, intervals apart"
    # no pretrain.json (an old or partial run): the pre-training table says so instead of failing
    assert "| encoder (CTC, greedy) | not measured | not measured |" in text
    assert "teacher: not measured" in text
    assert results["pretrain_asr"]["student"]["train_voices"]["meeting"] is None


def test_validation_section(tmp_path):
    work, out, corpus, models = tmp_path / "work", tmp_path / "out", tmp_path / "corpus", tmp_path / "models"
    (work / "eval").mkdir(parents=True)
    (work / "eval" / "results.json").write_text(json.dumps(CELLS))
    models.mkdir()
    (models / "pretrain.json").write_text(json.dumps(PRETRAIN))
    text = write_report(work, out, corpus, models, {}).read_text()
    assert "## Validation (choices and the pre-training checks)" in text
    # floor share and recall from the validation cells: score, at the floor, recall, hallucination
    assert "| SFT | 1.20 [0.70, 1.70] | 0.800 | 0.100 | 0.000 |" in text
    assert "| SFT+KD | 1.50 [1.00, 2.00] | 0.600 | 0.150 | 0.000 |" in text
    assert "| Student backbone, text (the weak teacher) | 2.00 [1.50, 2.50] | 0.300 | 0.400 | 0.250 |" in text
    assert "ratio audio / text 0.25" in text  # 0.10 / 0.40
    # word error: whole meetings / 6-turn windows / single turns, training then unseen voices
    assert "| encoder (CTC, greedy) | 0.500 | 0.400 | 0.300 | 0.700 | 0.600 | 0.500 |" in text
    assert ("| student (decoder, greedy) | 0.900 | 0.350 | 0.250 | not measured | not measured | not measured |"
            in text)
    assert "teacher score 4.50, hallucination 0.100" in text
    assert "weak teacher (student backbone) score 2.00, hallucination 0.300" in text
    results = json.loads((out / "results.json").read_text())
    assert results["validation"]["recall"]["ratio"] == pytest.approx(0.25)
    assert results["validation"]["models"]["sft"]["at_floor"] == 0.8
    assert "sft_kd_dpo" not in results["validation"]["models"]  # no validation cell
    assert results["pretrain_asr"]["encoder"]["unseen_voices"] == {
        "meeting": 0.7, "window": 0.6, "turn": 0.5, "meetings": None, "windows": None, "turns": None}
    assert results["pretrain_asr"]["encoder"]["train_voices"]["turns"] == 40
    assert results["pretrain_text"]["teacher"]["score"] == 4.5
    assert results["pretrain_text"]["weak_teacher"]["hallucination"] == 0.3


def test_floor_paragraph_from_numbers():
    cells = copy.deepcopy(CELLS)
    for split, share in (("test_in", 0.9), ("test_voices", 0.8), ("test_shifted", 0.7)):
        cells["sft"][split]["at_floor"] = share
    text = " ".join(floor_paragraph(cells, PRETRAIN))
    assert "after SFT 90% (test_in), 80% (test_voices) and 70% (test_shifted) of its outputs score 1.0" in text
    assert "Of the 18 comparisons between the student's stages (4 stages, all three splits)" in text
    assert "2 have 95% intervals apart: sft vs sft_kd_dpo on test_in, sft vs sft_kd_dpo on test_voices." in text
    assert "whole meetings is 0.90 with training voices and not measured with unseen voices" in text
    assert "recalls 0.10 of the asked facts from the audio, against 0.40" in text
    assert "keeps 25% of what its backbone gets" in text
    cells["sft"]["test_voices"]["at_floor"] = 0.5  # the condition: more than half at the floor on every split
    assert floor_paragraph(cells, PRETRAIN) == []
    cells["sft"]["test_voices"]["at_floor"] = 0.9
    del cells["student_text"]
    assert "ratio of the two recalls is not measured" in " ".join(floor_paragraph(cells, {}))
