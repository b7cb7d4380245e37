"""data/toy/report.py: the claims' verdicts are computed from the cells, per split.

Hand-made cells: SFT 3.0, SFT+KD 4.0 on test_in and 2.5 on test_shifted (so "KD > SFT" holds
on test_in only), repetition 0.20 after KD and 0.08 after DPO (0.08 <= 0.10: "at most half"
holds), intervals [mean - 0.5, mean + 0.5] (3.0 vs 4.0 touch at 3.5: they overlap).
"""
import json

from data.toy.report import _verdict, claims, write_report


def cell(mean, repetition=0.0, hallucination=0.0):
    return {"mean": mean, "ci_low": mean - 0.5, "ci_high": mean + 0.5, "repetition": repetition,
            "hallucination_rate": hallucination, "n": 60}


CELLS = {
    "teacher_text": {"test_in": cell(6.0), "test_shifted": cell(5.5)},
    "sft": {"test_in": cell(3.0, 0.05), "test_shifted": cell(3.0, 0.05)},
    "sft_kd": {"test_in": cell(4.0, 0.20), "test_shifted": cell(2.5, 0.20)},
    "sft_kd_dpo": {"test_in": cell(4.5, 0.08), "test_shifted": cell(3.5, 0.12)},
    "sft_kd_top20": {"test_in": cell(4.0, 0.20), "test_shifted": cell(2.5, 0.20)},  # equal to sft_kd
}


def by_text(start):
    return next(c for c in claims(CELLS) if c["claim"].startswith(start))


def test_verdicts_per_split():
    kd = by_text("SFT+KD scores above SFT")
    assert kd["splits"]["test_in"]["holds"] is True and kd["splits"]["test_shifted"]["holds"] is False
    assert kd["splits"]["test_in"]["intervals_overlap"] is True
    gap = by_text("modality gap")
    assert gap["splits"]["test_in"]["intervals_overlap"] is False  # [5.5, 6.5] vs [2.5, 3.5]
    half = by_text("repetition after DPO")
    assert half["splits"]["test_in"]["holds"] is True  # 0.08 <= 0.5 * 0.20
    assert half["splits"]["test_shifted"]["holds"] is False  # 0.12 > 0.10
    weak = by_text("a strong teacher")
    assert weak["splits"]["test_in"]["holds"] is None  # sft_kd_weak was not evaluated
    assert _verdict(weak) == "not measured (test_in, test_shifted missing)"
    tie = by_text("full-vocabulary KD")  # an "at least" claim: equal means do not count as holding
    assert tie["splits"]["test_in"]["equal"] and tie["splits"]["test_in"]["holds"] is False
    assert _verdict(tie) == "no difference (equal means on both splits)"


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
    assert "**mixed: holds on test_in only, within the noise (95% intervals overlap)**: SFT+KD scores above SFT" in text
    assert "**reproduced on both splits, intervals apart**: modality gap" in text
    assert "**holds in the means on both splits (no interval for this measure)**: KD adds repetition" in text
    assert "- Reproduced clearly (holds on both splits, 95% intervals apart): modality gap." in text
    assert "- Mixed (holds on one split only): KD > SFT; DPO halves repetition." in text
    assert "SFT+DPO (no KD) (skipped: the judge kept no preference pair)" in text
    results = json.loads((out / "results.json").read_text())
    assert results["scores"]["sft_kd"] == {"test_in": 4.0, "test_shifted": 2.5}
    assert results["scores"]["sft_dpo"] == {"test_in": None, "test_shifted": None}
    verdicts = {c["claim"].split(":")[0]: c["verdict"] for c in results["claims"]}
    assert verdicts["modality gap"] == "reproduced on both splits, intervals apart"
