"""The toy demo's report: REPORT.md, results.json and results.png from the demo's eval.run folder.

    write_report(work, out, corpus, models, timings, quick=False) -> OUT/REPORT.md
    python -m toy.report --work runs/toy --out results/toy   # again, from a finished run (WORK/run.json)

This module reads the inputs (eval.run's cells, the oracle's fact recall re-derived from the
samples, corpus.json, pretrain.json, the DPO pairs, the stage timings) and writes the files;
the tables are toy/report_tables.py and the claims' verdicts toy/report_verdicts.py. Inputs,
outputs and how a verdict is decided: docs/demo.md ("The report").
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from model.encoder_cache import read_usage
from model.safeio import atomic_write_text

from .report_tables import (LABELS, SPLITS, TABLE1, TABLE3, VALIDATION, _mean, _rate, pretrain_asr, pretrain_text,
                            table, validation_results, validation_section)
from .report_verdicts import _claim_line, _verdict, bottom_line, claims

RUN_FILE = "run.json"  # written by toy/demo.py in WORK: corpus, models, quick
SKIPPABLE = {"sft_kd_dpo": "dpo", "sft_dpo": "dpo_sft"}  # report name -> demo stage folder


def fact_scores(work: Path, corpus: Path, cells: dict) -> None:
    """Add `fact_recall`, `fact_precision` and `at_floor` to every cell, in place: the oracle's
    recall R and precision P terms (toy/oracle.py) of each output, re-derived from
    WORK/eval/samples and the manifests' `judge_source` (validation and the test splits), and the share of outputs whose
    score is the floor 1.0. The overall score clips at 1, so at the floor it cannot tell a model
    that gets a fifth of the facts from one that gets none; R and P can."""
    from .oracle import OracleJudge

    judge = OracleJudge()
    for split in (VALIDATION, *SPLITS):
        manifest = corpus / f"{split}.jsonl"
        if not manifest.exists():
            continue
        rows_in = map(json.loads, manifest.read_text(encoding="utf-8").splitlines())
        sources = {row["id"]: row["judge_source"] for row in rows_in}
        for name, by_split in cells.items():
            samples = work / "eval" / "samples" / name / f"{split}.jsonl"
            if split not in by_split or not samples.exists():
                continue
            rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
            details = [judge.details(sources[r["id"]], r["instruction"], r["output"])
                       for r in rows if r["id"] in sources]
            if details:
                by_split[split]["fact_recall"] = sum(d.recall for d in details) / len(details)
                by_split[split]["fact_precision"] = sum(d.precision for d in details) / len(details)
                by_split[split]["at_floor"] = sum(r.get("overall") == 1.0 for r in rows) / len(rows)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _pairs(work: Path) -> dict[str, int]:
    counts = {}
    for name in ("pairs", "pairs_sft"):
        path = work / name / "pairs.jsonl"
        if (work / name / "DONE").exists():
            counts[name] = 0
        if path.exists():
            counts[name] = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return counts


def write_report(work: Path, out: Path, corpus: Path, models: Path, timings: dict[str, float], *,
                 quick: bool = False) -> Path:
    """Write OUT/REPORT.md, OUT/results.json and OUT/results.png (docs/demo.md); returns REPORT.md."""
    cells = _read_json(work / "eval" / "results.json")
    fact_scores(work, corpus, cells)
    corpus_info = _read_json(corpus / "corpus.json")
    pretrain_info = _read_json(models / "pretrain.json")
    checked = claims(cells)
    pairs = _pairs(work)
    usage = read_usage(work / "encoder_cache")
    notes = {name: "skipped: the judge kept no preference pair" for name, folder in SKIPPABLE.items()
             if (work / folder / "skipped.txt").exists()}
    out.mkdir(parents=True, exist_ok=True)
    plot = work / "eval" / "results.png"
    if plot.exists():
        shutil.copy2(plot, out / "results.png")
    else:  # never link a plot left by an earlier run
        (out / "results.png").unlink(missing_ok=True)
    results = {
        "scores": {name: {s: _mean(cells, name, s) for s in SPLITS} for name in LABELS},
        "cells": cells,
        "claims": [{**c, "verdict": _verdict(c)} for c in checked],
        "timings_seconds": timings,
        "encoder_cache": usage,
        "dpo_pairs": pairs,
        "corpus": corpus_info.get("sizes"),
        "validation": validation_results(cells),
        "pretrain_asr": pretrain_asr(pretrain_info),
        "pretrain_text": pretrain_text(pretrain_info),
        "pretrain": pretrain_info,
        "quick": quick,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))

    sizes = corpus_info.get("splits", {})
    lines = ["# speechsum toy demo: SFT -> on-policy KD -> DPO on synthetic spoken meetings", ""]
    if quick:
        lines += ["**Quick mode**: the quick corpus and a few steps per stage. This run checks that the pipeline "
                  "works end to end; its numbers say nothing about the paper's claims. Run `make demo` for those.", ""]
    lines += [
        "Scores are the oracle judge's (toy/oracle.py, 1-7, deterministic, formula in its docstring), mean and "
        "95% bootstrap interval over the items of each test split; greedy decoding (eval.run). test_in: training "
        "voices and phrasings; test_voices: unseen voices, training phrasings; test_shifted: unseen voices and "
        "phrasings (dialogue and instructions) never used in training. Every choice (sizes, steps, learning "
        "rates) was made on the validation split; the test splits are read only by this final evaluation. "
        "Repetition: fraction of repeated word 4-grams (eval/diagnostics.py); hallucination: share of outputs "
        "naming a person, place, figure or day not in the meeting.",
        "",
        "Corpus: " + ", ".join(f"{name} {info.get('meetings', '-')} meetings / {info.get('rows', '-')} rows"
                               for name, info in sizes.items() if "meetings" in info) + "." + _left_out(corpus_info),
        f"DPO pairs kept by the oracle judge (ties dropped): {pairs.get('pairs', '-')} from the KD student, "
        f"{pairs.get('pairs_sft', '-')} from the SFT student.",
    ]
    floors = [f"{name} " + " / ".join(_rate(_mean(cells, name, s, "at_floor")) for s in SPLITS)
              for name in LABELS if name in cells]
    lines += ["", "## Bottom line", "", *bottom_line(cells, checked, pretrain_info)]
    lines += ["", "## Table 1: stages", "", table(cells, TABLE1, notes), "",
              f"Share of outputs at the floor score 1.0 ({' / '.join(SPLITS)}): " + ", ".join(floors) + ". "
              "Fact recall is the oracle's R term (share of the asked facts mentioned), which still moves "
              "where the clipped score sits at its floor.", "",
              "## Table 3: teacher choice, DPO without KD, full vocabulary vs top-20", "",
              table(cells, TABLE3, notes), "",
              "## The paper's claims, checked", "", *(_claim_line(c) for c in checked), "",
              *validation_section(cells, pretrain_info),
              "## Wall time of each stage (seconds, as first run, from its DONE stamp)", "",
              ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()) + ".", "",
              encoder_cache_line(usage), ""]
    if (out / "results.png").exists():
        lines += ["![scores](results.png)", ""]
    else:
        lines += ["(No plot: matplotlib is not installed; `pip install -e .[demo]`.)", ""]
    report = out / "REPORT.md"
    atomic_write_text(report, "\n".join(lines))
    return report



def _left_out(corpus_info: dict) -> str:
    """The corpus line's note on splits built without audio (toy.corpus `leave_out`)."""
    left_out = corpus_info.get("left_out")
    if not left_out:
        return ""
    return f" Not rendered: {', '.join(left_out)} (read only by toy/pretrain.py; this run used the shipped checkpoints)."

def encoder_cache_line(usage: dict | None) -> str:
    """What the frozen-encoder output cache saved over the run (model/encoder_cache.py `read_usage`)."""
    if not usage:
        return "Frozen-encoder output cache: no usage recorded."
    return (f"Frozen-encoder output cache (WORK/encoder_cache): {usage['hits']:.0f} clips read from it and "
            f"{usage['misses']:.0f} encoded ({usage['encode_seconds']:.0f} s of encoding) by "
            f"{usage['processes']:.0f} processes; the reads saved about {usage['saved_seconds']:.0f} s of encoding "
            "(each process's reads at its own measured encoding speed).")


def stage_timings(work: Path) -> dict[str, float]:
    """Stage -> seconds, from the DONE stamps toy/demo.py writes."""
    timings = {}
    for done in sorted(work.glob("*/DONE"), key=lambda p: p.stat().st_mtime):
        try:
            seconds = json.loads(done.read_text()).get("seconds")
        except ValueError:
            continue
        if isinstance(seconds, (int, float)):
            timings[done.parent.name] = float(seconds)
    return timings


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write the toy demo's report again from a finished run.")
    parser.add_argument("--work", default="runs/toy")
    parser.add_argument("--out", default="results/toy")
    args = parser.parse_args(argv)
    work = Path(args.work)
    try:
        run = json.loads((work / RUN_FILE).read_text())
    except (OSError, ValueError) as error:
        print(f"error: {work / RUN_FILE}: {error}; is {work} a folder written by python -m toy.demo?")
        return 1
    print(write_report(work, Path(args.out), Path(run["corpus"]), Path(run["models"]), stage_timings(work),
                       quick=bool(run.get("quick"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
