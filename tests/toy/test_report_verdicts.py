"""toy/report_verdicts.py: the claims' verdicts are computed from the cells, per test split, and
the floor paragraph from the numbers (cells: tests/toy/report_cells.py)."""
import copy

from tests.toy.report_cells import CELLS, PRETRAIN
from toy.report_verdicts import _verdict, claims, floor_paragraph


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
