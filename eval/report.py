"""The results table of an evaluation, as the paper's Table 1 (judge score 1-7, one row per
checkpoint, one column per benchmark) with 95% bootstrap confidence intervals, plus the
judge-free diagnostics of every (checkpoint, benchmark), as Markdown, CSV, JSON and a plot;
`Results` holds one evaluation's cells and writes them (the files of docs/evaluation.md).

Bootstrap (`bootstrap_ci`): the percentile interval of the mean. `resamples` (default 2000)
resamples of the n per-sample scores are drawn with replacement by
`numpy.random.default_rng(seed).integers(0, n, (resamples, n))`, seed 0 by default and the same
for every cell, so a table is reproducible bit for bit; the bounds are numpy's linear-interpolated
2.5th and 97.5th percentiles of the resampled means. n = 1 gives [x, x]. It treats samples as
independent, which the several instructions per recording of Golden3 and AMI are not quite:
read the interval as a lower bound on the uncertainty.

A cell (`summarize`) holds, from its per-sample records:
  n_items, n (samples with a valid judge score), judge_invalid, mean, ci_low, ci_high (overall),
  hallucination_rate (share of samples flagged, among those with a flag), adherence (mean),
  repetition (mean repeated 4-gram fraction), longest_repeated_span (mean) and
  max_repeated_span, format_valid (share valid among samples that asked for a format; None if
  none did) and n_format, length_ok / n_length likewise, length_ratio (mean), empty (share),
  hit_max_tokens (share of outputs cut by the token limit: loops end there), words (mean).
Judge-free runs leave the judge fields None.
"""
from __future__ import annotations

import csv
import io
import logging
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from model.safeio import atomic_write_text

logger = logging.getLogger(__name__)

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
DIAGNOSTIC_COLUMNS = (  # (key, header, format)
    ("n_items", "Items", "d"),
    ("n", "Scored", "d"),
    ("score", "Score [95% CI]", None),
    ("hallucination_rate", "Halluc.", ".2f"),
    ("adherence", "Adherence", ".2f"),
    ("repetition", "Rep. 4-gram", ".3f"),
    ("longest_repeated_span", "Longest rep. span", ".1f"),
    ("format_valid", "Format valid", ".2f"),
    ("length_ok", "Length OK", ".2f"),
    ("empty", "Empty", ".2f"),
    ("hit_max_tokens", "Hit max tokens", ".2f"),
    ("judge_invalid", "Judge invalid", "d"),
)


def bootstrap_ci(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap interval (module docstring)."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D sequence of numbers, got shape {data.shape}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"bootstrap_ci: need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(data.mean()), float(low), float(high)


def _mean(values: Iterable[float | int | bool | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def summarize(samples: Sequence[Mapping[str, Any]], *, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """One cell of the table from per-sample records (eval/run.py's samples files): each has
    `diagnostics` (Diagnostics.to_json), `hit_max_tokens`, `judged`, and when judged `overall`,
    `hallucination` and `adherence` (None where the judge's reply had no usable value)."""
    scores = [s["overall"] for s in samples if s.get("overall") is not None]
    judged = [s for s in samples if s.get("judged")]
    mean = low = high = None
    if scores:
        mean, low, high = bootstrap_ci(scores, resamples=resamples, seed=seed)
    diagnostics = [s["diagnostics"] for s in samples]
    spans = [d["longest_repeated_span"] for d in diagnostics]
    return {
        "n_items": len(samples),
        "n": len(scores),
        "judge_invalid": len(judged) - len(scores) if judged else None,
        "mean": mean,
        "ci_low": low,
        "ci_high": high,
        "hallucination_rate": _mean(s.get("hallucination") for s in samples),
        "adherence": _mean(s.get("adherence") for s in samples),
        "repetition": _mean(d["repeated_ngram_fraction"] for d in diagnostics),
        "longest_repeated_span": _mean(spans),
        "max_repeated_span": max(spans) if spans else None,
        "format_valid": _mean(d["format_valid"] for d in diagnostics),
        "n_format": sum(d["format_valid"] is not None for d in diagnostics),
        "length_ok": _mean(d["length_ok"] for d in diagnostics),
        "n_length": sum(d["length_ok"] is not None for d in diagnostics),
        "length_ratio": _mean(d["length_ratio"] for d in diagnostics),
        "empty": _mean(d["empty"] for d in diagnostics),
        "hit_max_tokens": _mean(s.get("hit_max_tokens") for s in samples),
        "words": _mean(d["words"] for d in diagnostics),
    }


def format_score(cell: Mapping[str, Any] | None) -> str:
    """"6.29 [6.10, 6.45]", or "-" without a judge score."""
    if not cell or cell.get("mean") is None:
        return "-"
    return f"{cell['mean']:.2f} [{cell['ci_low']:.2f}, {cell['ci_high']:.2f}]"


def _cell_text(value: Any, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt) if fmt else str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def score_table(cells: Mapping[str, Mapping[str, Mapping[str, Any]]], checkpoints: Sequence[str],
                benchmarks: Sequence[str]) -> str:
    """Table 1: one row per checkpoint, one column per benchmark, "mean [low, high]"."""
    rows = [[name, *(format_score(cells.get(name, {}).get(b)) for b in benchmarks)] for name in checkpoints]
    return _markdown(["Checkpoint", *benchmarks], rows)


def diagnostics_table(cells: Mapping[str, Mapping[str, Mapping[str, Any]]], checkpoints: Sequence[str],
                      benchmarks: Sequence[str]) -> str:
    """One row per (checkpoint, benchmark): judge sub-scores and the judge-free diagnostics."""
    rows = []
    for name in checkpoints:
        for bench in benchmarks:
            cell = cells.get(name, {}).get(bench)
            if cell is None:
                continue
            row = [name, bench]
            for key, _, fmt in DIAGNOSTIC_COLUMNS:
                row.append(format_score(cell) if key == "score" else _cell_text(cell.get(key), fmt))
            rows.append(row)
    return _markdown(["Checkpoint", "Benchmark", *(header for _, header, _ in DIAGNOSTIC_COLUMNS)], rows)


def scores_csv(cells, checkpoints: Sequence[str], benchmarks: Sequence[str]) -> str:
    """Wide CSV of Table 1: checkpoint, then {bench}, {bench}_ci_low, {bench}_ci_high, {bench}_n."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    suffixes = ("", "_ci_low", "_ci_high", "_n")
    writer.writerow(["checkpoint", *(f"{b}{suffix}" for b in benchmarks for suffix in suffixes)])
    for name in checkpoints:
        row: list[Any] = [name]
        for bench in benchmarks:
            cell = cells.get(name, {}).get(bench) or {}
            row += [_csv_value(cell.get(k)) for k in ("mean", "ci_low", "ci_high", "n")]
        writer.writerow(row)
    return out.getvalue()


def diagnostics_csv(cells, checkpoints: Sequence[str], benchmarks: Sequence[str]) -> str:
    """Long CSV: one row per (checkpoint, benchmark), every field of `summarize`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys: list[str] = []
    for name in checkpoints:
        for bench in benchmarks:
            for key in cells.get(name, {}).get(bench, {}):
                if key not in keys:
                    keys.append(key)
    writer.writerow(["checkpoint", "benchmark", *keys])
    for name in checkpoints:
        for bench in benchmarks:
            cell = cells.get(name, {}).get(bench)
            if cell is not None:
                writer.writerow([name, bench, *(_csv_value(cell.get(k)) for k in keys)])
    return out.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def plot(cells, checkpoints: Sequence[str], benchmarks: Sequence[str], path: Path) -> Path | None:
    """Grouped bars of the judge score per benchmark, one bar per checkpoint, 95% CI as error bars.

    Needs matplotlib; without it (or without any judge score) nothing is written and a note is
    logged. Returns the PNG's path, or None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipped the plot %s (pip install matplotlib)", path)
        return None
    if not any((cells.get(c, {}).get(b) or {}).get("mean") is not None for c in checkpoints for b in benchmarks):
        logger.info("no judge scores to plot: skipped %s", path)
        return None
    width = 0.8 / max(1, len(checkpoints))
    figure, axes = plt.subplots(figsize=(max(4.0, 1.6 * len(benchmarks) * max(1, len(checkpoints)) ** 0.5), 3.5))
    for k, name in enumerate(checkpoints):
        means, errors = [], [[], []]
        for bench in benchmarks:
            cell = cells.get(name, {}).get(bench) or {}
            mean = cell.get("mean")
            means.append(np.nan if mean is None else mean)
            errors[0].append(0.0 if mean is None else mean - cell["ci_low"])
            errors[1].append(0.0 if mean is None else cell["ci_high"] - mean)
        positions = np.arange(len(benchmarks)) + (k - (len(checkpoints) - 1) / 2) * width
        axes.bar(positions, means, width, yerr=errors, capsize=3, label=name)
    axes.set_xticks(np.arange(len(benchmarks)), benchmarks)
    axes.set_ylim(1, 7)
    axes.set_ylabel("judge score (1-7)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@dataclass
class Results:
    """Cells of the table: checkpoint -> benchmark -> the fields of eval.report.summarize."""

    checkpoints: list[str]
    benchmarks: list[str]
    cells: dict[str, dict[str, dict[str, Any]]]
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown: Table 1 (judge score, mean [95% CI]) then the diagnostics table."""
        judge = self.settings.get("judge") or {"type": "none"}
        label = " ".join(str(judge[k]) for k in ("type", "model") if k in judge)
        return (f"Judge score (1-7), mean [95% bootstrap CI] (judge: {label})\n\n"
                + score_table(self.cells, self.checkpoints, self.benchmarks)
                + "\n\nDiagnostics (judge-free except Halluc., Adherence)\n\n"
                + diagnostics_table(self.cells, self.checkpoints, self.benchmarks) + "\n")

    def to_json(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {name: {bench: dict(self.cells[name][bench]) for bench in self.benchmarks if bench in self.cells[name]}
                for name in self.checkpoints}

    def write(self, out_dir: Path, *, with_plot: bool = True) -> dict[str, Path]:
        """results.json / .md / .csv, diagnostics.csv, run.json and results.png (if matplotlib)."""
        files = {
            "json": out_dir / "results.json",
            "markdown": out_dir / "results.md",
            "csv": out_dir / "results.csv",
            "diagnostics_csv": out_dir / "diagnostics.csv",
            "settings": out_dir / "run.json",
        }
        atomic_write_text(files["json"], json.dumps(self.to_json(), indent=2) + "\n")
        atomic_write_text(files["markdown"], self.table())
        atomic_write_text(files["csv"], scores_csv(self.cells, self.checkpoints, self.benchmarks))
        atomic_write_text(files["diagnostics_csv"], diagnostics_csv(self.cells, self.checkpoints, self.benchmarks))
        atomic_write_text(files["settings"], json.dumps(self.settings, indent=2, default=str) + "\n")
        if with_plot:
            png = plot(self.cells, self.checkpoints, self.benchmarks, out_dir / "results.png")
            if png is not None:
                files["plot"] = png
        self.files = files
        return files
