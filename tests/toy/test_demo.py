"""`python -m toy.demo --quick`: the whole pipeline (corpus, SFT, KD local and through
rollout.server's top-20 API, KD with the weak teacher, oracle preferences, DPO, eval.run on
validation and the three test splits, the report) runs end to end, and a rerun reuses every
finished stage.

Quick mode checks the plumbing, not the paper's claims (few steps on a small corpus); the
claims are `make demo`'s report. Needs espeak-ng (CI installs it); skipped without it.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EVALUATED = ("teacher_text", "student_text", "pretrain", "sft", "sft_kd", "sft_kd_dpo", "sft_dpo", "sft_kd_weak",
             "sft_kd_top20")
STAGES = ("sft", "kd", "kd_top20", "kd_weak", "pairs", "dpo", "pairs_sft", "dpo_sft",
          *(f"eval_{name}" for name in EVALUATED), "eval")
ROWS = {"validation": 8, "test_in": 12, "test_voices": 8, "test_shifted": 12}  # quick preset: meetings x 2 instructions


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_quick_demo_end_to_end_and_rerun(tmp_path):
    work, out = tmp_path / "runs", tmp_path / "results"
    command = [sys.executable, "-m", "toy.demo", "--quick", "--work", str(work), "--out", str(out),
               "--corpus-root", str(tmp_path / "corpus"), "--jobs", "2", "--threads", "1"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in STAGES:
        assert (work / stage / "DONE").exists(), stage
    assert "2 stage(s) at a time, 1 torch thread(s) each" in first.stdout
    assert "$ " in (work / "sft" / "log.txt").read_text()  # with two jobs, each stage's output goes to its log

    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True
    cells = results["cells"]
    for name in ("teacher_text", "student_text", "pretrain", "sft", "sft_kd", "sft_kd_weak", "sft_kd_top20"):
        for split, rows in ROWS.items():
            cell = cells[name][split]
            assert cell["n_items"] == rows and cell["n"] == rows, (name, split, cell)
            assert 1.0 <= cell["mean"] <= 7.0
    for name, folder in (("sft_kd_dpo", "dpo"), ("sft_dpo", "dpo_sft")):  # trained, or skipped for want of pairs
        assert (work / folder / "merged" / "config.json").exists() != (work / folder / "skipped.txt").exists()
        assert (name in cells) == (work / folder / "merged" / "config.json").exists()
    verdicts = [c["verdict"] for c in results["claims"]]
    known = ("reproduced on all three splits", "holds in the means", "mixed: holds on", "no difference",
             "NOT reproduced", "not measured")
    assert len(verdicts) == 13 and all(v.startswith(known) for v in verdicts), verdicts
    report = (out / "REPORT.md").read_text()
    assert "Quick mode" in report and "## Table 1: stages" in report and "## The paper's claims, checked" in report
    assert "## Validation (choices and the pre-training checks)" in report
    assert set(results["validation"]["models"]) >= {"teacher_text", "student_text", "sft"}
    assert (work / "encoder_cache").is_dir()  # training and eval share the frozen-encoder outputs

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in STAGES[:-1]:
        assert f"[demo] {stage}: done before, reused" in second.stdout
    assert "[demo] eval: running" in second.stdout  # eval.run always runs; its own caches make it a no-op here
    assert json.loads((out / "results.json").read_text())["cells"] == cells

    other = subprocess.run([*command, "--pretrain"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and "holds stages of a run with other inputs" in other.stderr
    assert "Traceback" not in other.stderr
