"""The toy demo report's tables: Table 1 and Table 3 per test split, and the validation section
with the pre-training checks, from eval.run's cells and pretrain.json.

Each cell is the oracle judge's mean with its 95% bootstrap interval, with fact recall,
repetition and hallucination beside it; a number missing from the inputs (an old or partial
run) is written "not measured" instead of failing. The helpers here read cells and format
numbers for toy/report_verdicts.py and toy/report.py too. What the report holds:
docs/demo.md ("The report").
"""
from __future__ import annotations

from typing import Any

from .corpus import TEST_SPLITS

SPLITS = TEST_SPLITS  # the claims are checked on each
VALIDATION = "validation"  # eval.run's name for the validation benchmark (toy/demo.py)
EVERY_SPLIT = {2: "both splits", 3: "all three splits"}.get(len(SPLITS), f"all {len(SPLITS)} splits")
NOT_MEASURED = "not measured"
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
