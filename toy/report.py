"""The toy demo's report: REPORT.md, results.json and results.png from the demo's eval.run folder.

    write_report(work, out, corpus, models, timings, quick=False) -> OUT/REPORT.md
    python -m toy.report --work runs/toy --out results/toy   # again, from a finished run (WORK/run.json)

Inputs: WORK/eval/results.json (eval.run: checkpoint -> benchmark -> cell, eval/report.py's
`summarize`; benchmarks `validation` and the three test splits), the corpus's corpus.json, the
models' pretrain.json (toy/pretrain.py), the pairs files of the DPO stages and the stage
wall times. The test splits (toy.corpus.TEST_SPLITS): test_in (training voices and
phrasings), test_voices (unseen voices, training phrasings), test_shifted (unseen voices and
phrasings). Every choice was made on validation; the test splits are read by this final
evaluation only. Outputs:

  REPORT.md     Table 1 (stages, the text teacher as the ceiling) and Table 3 (teacher choice,
                DPO without KD, full vocabulary vs top-20), each cell the oracle judge's mean
                with its 95% bootstrap interval, plus fact recall (the oracle's R term,
                `fact_scores`: it still moves where the clipped score is at its floor 1),
                repetition (eval/diagnostics.py: fraction
                of repeated word 4-grams) and hallucination rate (share of outputs naming an
                entity not in the meeting, toy/oracle.py) per stage and test split; then every
                claim of the paper checked against those numbers, with its verdict per split;
                then the validation split (`validation_section`: floor share, fact recall, the
                audio student's recall against its backbone's from the transcript) and the
                pre-training checks of pretrain.json (word error of the CTC encoder and of the
                student, training and unseen voices; the text teachers' validation scores).
  results.json  {"scores": stage -> split -> mean, "cells": the full cells, "claims": [...],
                "validation": ..., "pretrain_asr": ..., "pretrain_text": ...,
                "timings": stage -> seconds, "encoder_cache": what the frozen-encoder cache saved
                (model/encoder_cache.py `read_usage`), ...}: the same numbers, machine-readable.
  results.png   eval.run's plot (matplotlib; `pip install -e .[demo]`), copied when present.

A claim "holds" on a split when the inequality holds between the means; the report adds
whether the two 95% intervals overlap, because 60 test items per split cannot separate small
differences. Nothing here looks at a score before the report is written: the verdicts are
computed, never edited. A number missing from the inputs (an old or partial run) is reported
as "not measured".
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from model.encoder_cache import read_usage
from model.safeio import atomic_write_text

from .corpus import TEST_SPLITS

SPLITS = TEST_SPLITS  # the claims are checked on each
VALIDATION = "validation"  # eval.run's name for the validation benchmark (toy/demo.py)
EVERY_SPLIT = {2: "both splits", 3: "all three splits"}.get(len(SPLITS), f"all {len(SPLITS)} splits")
NOT_MEASURED = "not measured"
RUN_FILE = "run.json"  # written by toy/demo.py in WORK: corpus, models, quick
STUDENT_STAGES = ("sft", "sft_kd", "sft_kd_dpo", "sft_dpo", "sft_kd_weak", "sft_kd_top20")
LABELS = {
    "teacher_text": "Teacher, text (transcript in the prompt; the ceiling)",
    "student_text": "Student backbone, text (the weak teacher)",
    "pretrain": "Student, pre-training stage (audio)",
    "sft": "SFT",
    "sft_kd": "SFT+KD",
    "sft_kd_dpo": "SFT+KD+DPO",
    "sft_dpo": "SFT+DPO (no KD)",
    "sft_kd_weak": "SFT+KD, weak teacher (student backbone, text)",
    "sft_kd_top20": "SFT+KD, teacher through the top-20 API",
}
TABLE1 = ("teacher_text", "student_text", "pretrain", "sft", "sft_kd", "sft_kd_dpo")
SKIPPABLE = {"sft_kd_dpo": "dpo", "sft_dpo": "dpo_sft"}  # report name -> demo stage folder
TABLE3 = ("sft", "sft_dpo", "sft_kd_weak", "sft_kd", "sft_kd_top20", "sft_kd_dpo")


def _cell(cells: dict, name: str, split: str) -> dict:
    return (cells.get(name) or {}).get(split) or {}


def _mean(cells: dict, name: str, split: str, key: str = "mean") -> float | None:
    return _cell(cells, name, split).get(key)


def _score_text(cell: dict) -> str:
    if cell.get("mean") is None:
        return "-"
    return f"{cell['mean']:.2f} [{cell['ci_low']:.2f}, {cell['ci_high']:.2f}]"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _number(value: Any, spec: str = ".3f") -> str:
    """`value` formatted, or "not measured" when it is missing (or not a number)."""
    return f"{value:{spec}}" if _is_number(value) else NOT_MEASURED


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dict(value: Any) -> dict:
    """`value` when it is a dict, else {}: pretrain.json of an old or partial run lacks sections."""
    return value if isinstance(value, dict) else {}


def _join(names: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def table(cells: dict, names: tuple[str, ...], notes: dict[str, str] | None = None) -> str:
    """Markdown rows of `names`: score with interval, repetition and hallucination per split;
    `notes` (name -> text) is appended to a row's label, e.g. why a stage was skipped."""
    notes = notes or {}
    header = ["model", *(f"{s} score" for s in SPLITS), *(f"{s} fact recall" for s in SPLITS),
              *(f"{s} repetition" for s in SPLITS), *(f"{s} hallucination" for s in SPLITS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        label = LABELS.get(name, name) + (f" ({notes[name]})" if name in notes else "")
        row = [label, *(_score_text(_cell(cells, name, s)) for s in SPLITS),
               *(_rate(_mean(cells, name, s, "fact_recall")) for s in SPLITS),
               *(_rate(_mean(cells, name, s, "repetition")) for s in SPLITS),
               *(_rate(_mean(cells, name, s, "hallucination_rate")) for s in SPLITS)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _overlap(cells: dict, a: str, b: str, split: str) -> bool | None:
    x, y = _cell(cells, a, split), _cell(cells, b, split)
    if x.get("mean") is None or y.get("mean") is None:
        return None
    return not (x["ci_high"] < y["ci_low"] or y["ci_high"] < x["ci_low"])


def _compare(cells: dict, a: str, b: str, test: Callable[[float, float], bool], key: str = "mean") -> dict[str, Any]:
    """Per split: the two values, whether `test(value_a, value_b)` holds, and interval overlap."""
    out = {}
    for split in SPLITS:
        x, y = _mean(cells, a, split, key), _mean(cells, b, split, key)
        measured = x is not None and y is not None
        out[split] = {"a": x, "b": y, "equal": measured and abs(x - y) < 1e-12,
                      "holds": None if not measured else bool(test(x, y)) and abs(x - y) >= 1e-12,
                      "intervals_overlap": _overlap(cells, a, b, split) if key == "mean" else None}
    return out


def claims(cells: dict) -> list[dict[str, Any]]:
    """Each claim of the paper as (statement, comparison per split)."""
    greater = lambda x, y: x > y  # noqa: E731
    at_least = lambda x, y: x >= y  # noqa: E731
    at_most_half = lambda x, y: x <= 0.5 * y  # noqa: E731
    spec = [
        ("modality gap",
         "modality gap: the teacher reading the transcript scores above the student after SFT (Table 1)",
         "teacher_text", "sft", greater, "mean"),
        ("KD > SFT", "SFT+KD scores above SFT (KD gives the largest gain, Table 1)", "sft_kd", "sft", greater, "mean"),
        ("DPO >= KD", "SFT+KD+DPO scores at least SFT+KD (Table 1)", "sft_kd_dpo", "sft_kd", at_least, "mean"),
        ("DPO halves repetition", "repetition after DPO is at most half of that after KD (section 2.3)",
         "sft_kd_dpo", "sft_kd", at_most_half, "repetition"),
        ("KD adds repetition", "KD adds repetition: SFT+KD repeats more than SFT (section 2.2)",
         "sft_kd", "sft", greater, "repetition"),
        ("KD adds hallucination", "KD adds hallucination: SFT+KD hallucinates more often than SFT (section 2.2)",
         "sft_kd", "sft", greater, "hallucination_rate"),
        ("strong > weak teacher", "a strong teacher beats the weak one (student backbone in text mode) as KD teacher "
         "(Table 3)", "sft_kd", "sft_kd_weak", greater, "mean"),
        ("weak teacher < SFT", "a weak teacher can make things worse: KD with it scores below SFT (Table 3)",
         "sft_kd_weak", "sft", lambda x, y: x < y, "mean"),
        ("KD+DPO > DPO alone", "KD and DPO are complementary: SFT+KD+DPO above SFT+DPO without KD (Table 3)",
         "sft_kd_dpo", "sft_dpo", greater, "mean"),
        ("KD > SFT in recall", "(fact recall, finer than the score at its floor) SFT+KD recalls more facts than SFT",
         "sft_kd", "sft", greater, "fact_recall"),
        ("DPO >= KD in recall", "(fact recall) SFT+KD+DPO recalls at least as many facts as SFT+KD",
         "sft_kd_dpo", "sft_kd", at_least, "fact_recall"),
        ("strong > weak teacher in recall", "(fact recall) KD with the strong teacher recalls more than KD with the "
         "weak one", "sft_kd", "sft_kd_weak", greater, "fact_recall"),
        ("full vocabulary >= top-20", "full-vocabulary KD scores at least top-20 KD (no claim in the paper, whose "
         "GPT-4o teacher gives top-20 logprobs only; a design question of this reproduction)",
         "sft_kd", "sft_kd_top20", at_least, "mean"),
    ]
    return [{"short": short, "claim": text, "a": a, "b": b, "measure": key, "splits": _compare(cells, a, b, test, key)}
            for short, text, a, b, test, key in spec]


def _verdict(claim: dict) -> str:
    """"reproduced on all three splits, intervals apart" only when the inequality holds on every
    split and the two 95% intervals are apart there; a difference inside the intervals is said
    to be within the noise; measures without an interval (repetition, recall) hold "in the
    means"; "mixed: holds on test_in and test_voices only" names the splits where it holds.
    Equal means never count as holding, not even for an "at least" claim."""
    results = claim["splits"]
    missing = [s for s, r in results.items() if r["holds"] is None]
    if missing:
        return "not measured (" + ", ".join(missing) + " missing)"
    held = [s for s, r in results.items() if r["holds"]]
    equal = [s for s, r in results.items() if r["equal"]]
    if not held:
        return f"no difference (equal means on {EVERY_SPLIT})" if len(equal) == len(SPLITS) else "NOT reproduced"
    overlaps = [results[s]["intervals_overlap"] for s in held]
    if None in overlaps:
        noise = " (no interval for this measure)"
    elif any(overlaps):
        noise = ", within the noise (95% intervals overlap)"
    else:
        noise = ", intervals apart"
    if len(held) == len(SPLITS):
        clear = noise == ", intervals apart"
        return (f"reproduced on {EVERY_SPLIT}" if clear else f"holds in the means on {EVERY_SPLIT}") + noise
    return f"mixed: holds on {_join(held)} only" + noise


def _claim_line(claim: dict) -> str:
    parts = []
    for split, r in claim["splits"].items():
        if r["a"] is None or r["b"] is None:
            parts.append(f"{split}: -")
            continue
        note = "" if r["intervals_overlap"] is None else (", 95% intervals overlap" if r["intervals_overlap"]
                                                          else ", intervals apart")
        parts.append(f"{split}: {claim['a']} {r['a']:.3f} vs {claim['b']} {r['b']:.3f}{note}")
    return f"- **{_verdict(claim)}**: {claim['claim']}. " + "; ".join(parts) + "."


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


VERDICT_GROUPS = (  # verdict prefix -> the bottom line's group, in the report's order
    ("reproduced", f"Reproduced clearly (holds on {EVERY_SPLIT}, 95% intervals apart)"),
    ("holds in the means", f"Holds on {EVERY_SPLIT} in the means only (intervals overlap, or none for the measure)"),
    ("mixed", "Mixed (holds on some splits only)"),
    ("no difference", "No difference (equal means)"),
    ("NOT", "Not reproduced"),
    ("not measured", "Not measured"),
)


def bottom_line(cells: dict, checked: list[dict], pretrain: dict) -> list[str]:
    """The report's summary, computed from the numbers: which claims reproduce clearly, which hold
    only in the means, which do not, and (when the audio student sits at the score floor) why the
    student-stage comparisons cannot decide anything at this scale (`floor_paragraph`)."""
    groups: dict[str, list[str]] = {group: [] for _, group in VERDICT_GROUPS}
    for claim in checked:
        verdict = _verdict(claim)
        group = next(group for prefix, group in VERDICT_GROUPS if verdict.startswith(prefix))
        groups[group].append(claim["short"])
    lines = [f"- {key}: {'; '.join(names) if names else 'none'}." for key, names in groups.items()]
    return lines + floor_paragraph(cells, pretrain)


def floor_paragraph(cells: dict, pretrain: dict) -> list[str]:
    """When most of the SFT student's outputs score the floor 1.0 on every test split: how many
    stage comparisons the intervals can separate, and what the validation split and the
    pre-training checks measured upstream. Empty otherwise."""
    floor = [_mean(cells, "sft", s, "at_floor") for s in SPLITS]
    if any(f is None for f in floor) or min(floor) <= 0.5:
        return []
    stages = [name for name in STUDENT_STAGES if name in cells]
    pairs = [(a, b, split) for k, a in enumerate(stages) for b in stages[k + 1:] for split in SPLITS]
    apart = [p for p in pairs if _overlap(cells, *p) is False]
    shares = _join([f"{f:.0%} ({s})" for f, s in zip(floor, SPLITS)])
    hallucination = " / ".join(_rate(_mean(cells, "sft", s, "hallucination_rate")) for s in SPLITS)
    text = (f"At this scale the audio student sits at the judge's floor: after SFT {shares} of its outputs score 1.0, "
            f"and {hallucination} of them ({' / '.join(SPLITS)}) name an entity that is not in the meeting. "
            f"Of the {len(pairs)} comparisons between the student's stages ({len(stages)} stages, {EVERY_SPLIT}), "
            f"{len(apart)} {'has' if len(apart) == 1 else 'have'} 95% intervals apart"
            + (": " + ", ".join(f"{a} vs {b} on {split}" for a, b, split in apart) if apart else "")
            + ". The verdicts on student stages above are therefore weak evidence either way. "
            + _upstream(cells, pretrain))
    return ["", text]


def _upstream(cells: dict, pretrain: dict) -> str:
    """What the pre-training checks and the validation split say about the floor, and the reading
    that follows from the recall ratio (stated as a hypothesis; it is not tested here)."""
    student = pretrain_asr(pretrain)["student"]
    seen, unseen = student["train_voices"], student["unseen_voices"]
    recall = recall_ratio(cells)
    text = (f"Measured upstream on the validation splits: the pre-training-stage student's word error on whole "
            f"meetings is {_number(seen['meeting'], '.2f')} with training voices and "
            f"{_number(unseen['meeting'], '.2f')} with unseen voices (6-turn windows {_number(seen['window'], '.2f')} "
            f"/ {_number(unseen['window'], '.2f')}, single turns {_number(seen['turn'], '.2f')} / "
            f"{_number(unseen['turn'], '.2f')}); after SFT it recalls {_number(recall['sft_audio'], '.2f')} of the "
            f"asked facts from the audio, against {_number(recall['student_text'], '.2f')} for its own backbone "
            f"reading the transcript. ")
    ratio = recall["ratio"]
    if ratio is None:
        return text + ("The ratio of the two recalls is not measured, so this run does not say whether hearing or "
                       "the backbone holds the student at the floor.")
    if ratio < 1:
        return text + (f"From the audio it keeps {ratio:.0%} of what its backbone gets from the transcript. Our "
                       f"reading (a hypothesis this run does not test): the tiny student mishears names, so a better "
                       f"recognizer (a larger student or a longer pre-training stage, toy/pretrain.py) would move "
                       f"it more than any change to the method.")
    return text + (f"From the audio it recalls {ratio:.0%} of what its backbone gets from the transcript, so hearing "
                   f"is not what holds it at the floor. Our reading (a hypothesis this run does not test): the "
                   f"backbone itself is too small, and a larger decoder would move it more than any change to the "
                   f"method.")


# -- validation and the pre-training checks --------------------------------------------------------

ASR_MODELS = {  # row -> (pretrain.json section, voices -> key of its ASR record)
    "encoder": ("encoder_ctc", {"train_voices": "validation", "unseen_voices": "validation_voices"}),
    "student": ("student", {"train_voices": "asr_train_voices", "unseen_voices": "asr_unseen_voices"}),
}
ASR_LABELS = {"encoder": "encoder (CTC, greedy)", "student": "student (decoder, greedy)"}
ASR_SCOPES = (("meeting", "whole meetings"), ("window", "6-turn windows"), ("turn", "single turns"))
VOICES = (("train_voices", "training voices (validation)"), ("unseen_voices", "unseen voices (validation_voices)"))


def pretrain_asr(pretrain: dict) -> dict[str, dict[str, dict[str, Any]]]:
    """Model -> voices -> {"meeting", "window", "turn": word error, "meetings", "windows", "turns":
    counts} from pretrain.json (toy/pretrain.py); None where a number is missing."""
    table = {}
    for model, (section, keys) in ASR_MODELS.items():
        record = _dict(pretrain.get(section))
        table[model] = {}
        for voices, key in keys.items():
            report = _dict(record.get(key))
            row = {scope: report.get(f"{scope}_word_error", record.get(f"{scope}_word_error_{voices}"))
                   for scope, _ in ASR_SCOPES}
            row.update({f"{scope}s": report.get(f"{scope}s") for scope, _ in ASR_SCOPES})
            table[model][voices] = {k: v if _is_number(v) else None for k, v in row.items()}
    return table


def pretrain_text(pretrain: dict) -> dict[str, dict[str, Any]]:
    """The text teacher's and the weak teacher's (the student backbone in text mode) greedy
    quality on validation, as pretrain.json recorded it: score, floor, hallucination, recall, rows."""
    records = {"teacher": _dict(_dict(pretrain.get("teacher")).get("validation")),
               "weak_teacher": _dict(_dict(pretrain.get("student")).get("validation_text"))}
    return {name: {key: record.get(key) if _is_number(record.get(key)) else None
                   for key in ("score", "floor", "hallucination", "recall", "rows")}
            for name, record in records.items()}


def recall_ratio(cells: dict) -> dict[str, float | None]:
    """On validation: the SFT student's fact recall from the audio, its backbone's (student_text)
    from the transcript, and their ratio (None where either is missing or the backbone's is 0)."""
    audio = _mean(cells, "sft", VALIDATION, "fact_recall")
    text = _mean(cells, "student_text", VALIDATION, "fact_recall")
    ratio = audio / text if _is_number(audio) and _is_number(text) and text > 0 else None
    return {"sft_audio": audio, "student_text": text, "ratio": ratio}


def validation_results(cells: dict) -> dict[str, Any]:
    """results.json's "validation": per model with a validation cell, score (interval), share at
    the floor 1.0, fact recall, hallucination and repetition; and `recall_ratio`."""
    keys = ("mean", "ci_low", "ci_high", "at_floor", "fact_recall", "hallucination_rate", "repetition")
    models = {name: {key: _cell(cells, name, VALIDATION).get(key) for key in keys}
              for name in LABELS if _cell(cells, name, VALIDATION)}
    return {"models": models, "recall": recall_ratio(cells)}


def validation_table(cells: dict) -> str:
    """Markdown rows of every model with a validation cell: score, floor share, recall, hallucination."""
    header = ["model", "score", "at the floor 1.0", "fact recall", "hallucination"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in LABELS:
        cell = _cell(cells, name, VALIDATION)
        if cell:
            row = [LABELS[name], _score_text(cell), *(_number(cell.get(k)) for k in
                                                        ("at_floor", "fact_recall", "hallucination_rate"))]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def asr_table(pretrain: dict) -> str:
    """Markdown: word error of the CTC encoder and the student, per scope and voices (pretrain.json)."""
    asr = pretrain_asr(pretrain)
    header = ["model", *(f"{scope}, {voices.split(' (')[0]}" for _, voices in VOICES for _, scope in ASR_SCOPES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, label in ASR_LABELS.items():
        row = [label, *(_number(asr[model][voices][scope]) for voices, _ in VOICES for scope, _ in ASR_SCOPES)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _text_quality_line(name: str, quality: dict[str, Any]) -> str:
    if quality["score"] is None:
        return f"{name}: {NOT_MEASURED}"
    return (f"{name} score {_number(quality['score'], '.2f')}, hallucination {_number(quality['hallucination'])}, "
            f"at the floor {_number(quality['floor'])}, fact recall {_number(quality['recall'])}")


def validation_section(cells: dict, pretrain: dict) -> list[str]:
    """REPORT.md's "Validation" section: eval.run's `validation` cells (the split every choice was
    made on), the audio student's recall against its backbone's, and the pre-training checks."""
    recall = recall_ratio(cells)
    lines = ["## Validation (choices and the pre-training checks)", "",
             "Every choice (sizes, steps, learning rates) was made on the validation split (training voices and "
             "phrasings, with references), never on a test split. eval.run's cells of the `validation` benchmark, "
             "greedy decoding:", ""]
    has_cells = any(_cell(cells, name, VALIDATION) for name in LABELS)
    lines += [validation_table(cells) if has_cells else f"No `validation` cells: {NOT_MEASURED}.", ""]
    lines += [f"Fact recall on validation: the SFT student {_number(recall['sft_audio'])} from the audio, its backbone "
              f"(student_text) {_number(recall['student_text'])} from the transcript; ratio audio / text "
              f"{_number(recall['ratio'], '.2f')}.", ""]
    teachers = pretrain_text(pretrain)
    lines += ["Pre-training checks (pretrain.json, toy/pretrain.py). Word error (word-level edit distance / "
              "reference words) of greedy transcripts on validation (training voices) and validation_voices (unseen "
              "voices):", "", asr_table(pretrain), "",
              "The text teachers on validation at pre-training (greedy, the transcript in the prompt): "
              + _text_quality_line("teacher", teachers["teacher"]) + "; "
              + _text_quality_line("weak teacher (student backbone)", teachers["weak_teacher"]) + ".", ""]
    return lines


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
    """Write OUT/REPORT.md, OUT/results.json and OUT/results.png (module docstring); returns REPORT.md."""
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
                               for name, info in sizes.items() if "meetings" in info) + ".",
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
