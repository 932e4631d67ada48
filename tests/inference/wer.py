"""Word error rate for transcript assertions (pure)."""

from __future__ import annotations

import re


def words(text: str) -> list[str]:
    """Lower-case words with punctuation removed ("Where's" -> "wheres")."""
    return re.sub(r"[^a-z0-9 ]+", "", text.lower().replace("-", " ")).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over words divided by the reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)
