"""Hand-made eval.run cells and a pretrain.json for the report's tests (toy/report*.py).

Cells: SFT 3.0, SFT+KD 4.0 on test_in and test_voices and 2.5 on test_shifted (so "KD > SFT"
holds on test_in and test_voices only), repetition 0.20 after KD and 0.08 after DPO on test_in
(0.08 <= 0.10: "at most half" holds there only), intervals [mean - 0.5, mean + 0.5] (3.0 vs 4.0
touch at 3.5: they overlap). Validation: the SFT student recalls 0.10 of the facts from the
audio, its backbone 0.40 from the transcript (ratio 0.25); 80% of SFT's outputs sit at the floor.
"""


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
