"""toy/report.py: REPORT.md and results.json from the cells, with the verdicts, the skipped
stages, the validation section from the `validation` cells and pretrain.json, and "not measured"
where an input is missing (cells: tests/toy/report_cells.py; the verdicts themselves:
tests/toy/test_report_verdicts.py)."""
import json

import pytest

from tests.toy.report_cells import CELLS, PRETRAIN
from toy.report import write_report


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
