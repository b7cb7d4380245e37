"""Word tokens and repetition of a model's output: one definition for the whole project.

    tokens("Next up, the Q3 plan.")              # ["next", "up", "the", "q3", "plan"]
    repetition("- How to Get Away - How to Get Away - How to Get Away")   # 5/9 = 0.56

Tokens are lower-cased words (letters and digits, with inner ' or -), punctuation dropped; a
character of a script written without spaces (CJK, kana, hangul) is a token of its own.
`repeated_ngram_fraction(items, n=4)`: the share of the n-grams of a sequence (words or token
ids) equal to an earlier n-gram of the same sequence, 0 with fewer than two n-grams: the
"- How to Get Away - How to Get Away ..." loop the paper reports after on-policy KD.
`repetition(text)` is that over the text's word tokens: the number the KD log
(train/stages.py), the preference-pair statistics (eval/preferences.py) and the evaluation's
diagnostics (eval/diagnostics.py) all report; the toy oracle applies the same n-gram measure to
its own normalised words (its formula is fixed). It lives here, the lowest layer that training
and evaluation share.
"""
from __future__ import annotations

import re
from typing import Sequence

NGRAM = 4
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+(?:['’-][^\W_]+)*")


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens (module docstring)."""
    return [t.lower() for t in _TOKEN.findall(text)]


def repeated_ngram_fraction(items: Sequence, n: int = NGRAM) -> float:
    """Share of n-grams that repeat an earlier one: 1 - distinct / total (0 for fewer than 2)."""
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    return 0.0 if len(grams) < 2 else 1.0 - len(set(grams)) / len(grams)


def repetition(text: str) -> float:
    """`repeated_ngram_fraction` of the text's word tokens (module docstring)."""
    return repeated_ngram_fraction(tokens(text))
