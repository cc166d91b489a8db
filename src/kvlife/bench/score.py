"""Scorers: exact, deterministic, and tested with right, wrong and partial answers.

Each takes (prediction, reference) and returns a score in [0, 1].
"""

from __future__ import annotations

import re
import string

_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, collapse whitespace."""
    return " ".join(text.lower().translate(_PUNCT).split())


def contains_exact(prediction: str, reference: str) -> float:
    """1 if the reference appears in the prediction as a whole token sequence (case-insensitive)."""
    ref = normalize(reference)
    if not ref:
        return 0.0
    return 1.0 if f" {ref} " in f" {normalize(prediction)} " else 0.0


def items_recall(prediction: str, reference: str, sep: str = ",") -> float:
    """Fraction of the reference's items (comma-separated) that appear as whole tokens in the prediction."""
    items = [normalize(item) for item in reference.split(sep) if normalize(item)]
    if not items:
        return 0.0
    words = f" {normalize(prediction)} "
    return sum(1.0 for item in items if f" {item} " in words) / len(items)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def first_number(prediction: str, reference: str) -> float:
    """1 if the first number in the prediction equals the reference number."""
    found = _NUMBER.search(prediction.replace(",", ""))
    if not found:
        return 0.0
    try:
        return 1.0 if float(found.group()) == float(reference) else 0.0
    except ValueError:
        return 0.0


_ALNUM_RUN = re.compile(r"[A-Za-z0-9]+")


def alnum_exact(prediction: str, reference: str) -> float:
    """1 if the reference is one of the prediction's alphanumeric runs, case-sensitive (codes)."""
    return 1.0 if reference in _ALNUM_RUN.findall(prediction) else 0.0


def items_f1(prediction: str, reference: str, pattern: str = r"\b[A-Z]{5}\b") -> float:
    """F1 between the reference's comma-separated items and the items the prediction names.

    The prediction's items are the matches of `pattern` (the task's name shape), so listing every
    name in sight is not rewarded: precision counts as much as recall.
    """
    wanted = {item.strip() for item in reference.split(",") if item.strip()}
    named = set(re.findall(pattern, prediction))
    hits = len(wanted & named)
    if not wanted or not hits:
        return 0.0
    precision, recall = hits / len(named), hits / len(wanted)
    return 2 * precision * recall / (precision + recall)
