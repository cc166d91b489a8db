"""Scorers: exact, deterministic, and tested with right, wrong and partial answers.

Each takes (prediction, reference) and returns a score in [0, 1].
"""

from __future__ import annotations

import re
import string
from difflib import SequenceMatcher

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


# ---- SCBench's semantic-retrieval, QA and summary scorers ---------------------------------------


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between normalized prediction and reference."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    common: dict[str, int] = {}
    for word in ref:
        common[word] = common.get(word, 0) + 1
    hits = 0
    for word in pred:
        if common.get(word, 0) > 0:
            common[word] -= 1
            hits += 1
    if not hits:
        return 0.0
    precision, recall = hits / len(pred), hits / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_score(prediction: str, reference: str) -> float:
    """1 if the reference appears whole in the prediction, else the token F1 (short-answer QA)."""
    return max(contains_exact(prediction, reference), token_f1(prediction, reference))


_ZH_DROP = re.compile(r"[\s\u3000-\u303f\uff00-\uffef" + re.escape(string.punctuation) + r"]")


def char_f1(prediction: str, reference: str) -> float:
    """Character-level F1 with punctuation and spaces removed (Chinese QA)."""
    pred, ref = list(_ZH_DROP.sub("", prediction.lower())), list(_ZH_DROP.sub("", reference.lower()))
    if not pred or not ref:
        return 0.0
    pool: dict[str, int] = {}
    for char in ref:
        pool[char] = pool.get(char, 0) + 1
    hits = 0
    for char in pred:
        if pool.get(char, 0) > 0:
            pool[char] -= 1
            hits += 1
    if not hits:
        return 0.0
    precision, recall = hits / len(pred), hits / len(ref)
    return 2 * precision * recall / (precision + recall)


def zh_qa_score(prediction: str, reference: str) -> float:
    """1 if the reference appears in the prediction (ignoring punctuation/spaces), else char F1."""
    ref = _ZH_DROP.sub("", reference.lower())
    if ref and ref in _ZH_DROP.sub("", prediction.lower()):
        return 1.0
    return char_f1(prediction, reference)


_LETTER = re.compile(r"(?:^|[^A-Za-z])([A-D])(?:[).:\]]|\s|$)")


def choice_score(prediction: str, reference: str) -> float:
    """Multiple choice; the reference is "B) option text". Right if the prediction's first option
    letter is B, or (giving no letter) it contains the option text."""
    letter, _, text = reference.partition(")")
    letter, text = letter.strip(), text.strip()
    found = _LETTER.search(prediction.strip())
    if found:
        return 1.0 if found.group(1) == letter else 0.0
    return contains_exact(prediction, text) if text else 0.0


# ROUGE-L: longest common subsequence of tokens; the summary-level variant (ROUGE-Lsum) takes, for
# each reference sentence, the union of its LCS hits against every predicted sentence.
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def _rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def _lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        row, prev = table[i], table[i - 1]
        for j, y in enumerate(b, 1):
            row[j] = prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1])
    return table


def _lcs_indices(a: list[str], b: list[str]) -> set[int]:
    """Indices into `a` of one longest common subsequence of a and b."""
    table = _lcs_table(a, b)
    i, j, hits = len(a), len(b), set()
    while i and j:
        if a[i - 1] == b[j - 1]:
            hits.add(i - 1)
            i, j = i - 1, j - 1
        elif table[i - 1][j] >= table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return hits


def _sentences(text: str) -> list[str]:
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) > 1:
        return lines
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lowercase alphanumeric tokens (as rouge-score, without stemming)."""
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_table(ref, pred)[-1][-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_lsum(prediction: str, reference: str) -> float:
    """ROUGE-Lsum F1 (summary-level union LCS, as rouge-score's `rougeLsum`, no stemming).

    Sentences are newline-separated lines, or, for single-line text, split after . ! ?.
    """
    pred_sents = [_rouge_tokens(s) for s in _sentences(prediction)]
    ref_sents = [_rouge_tokens(s) for s in _sentences(reference)]
    pred_sents, ref_sents = [s for s in pred_sents if s], [s for s in ref_sents if s]
    n_pred, n_ref = sum(map(len, pred_sents)), sum(map(len, ref_sents))
    if not n_pred or not n_ref:
        return 0.0
    # Each token can be matched at most as often as it occurs on the other side.
    pred_counts: dict[str, int] = {}
    for sent in pred_sents:
        for tok in sent:
            pred_counts[tok] = pred_counts.get(tok, 0) + 1
    ref_counts: dict[str, int] = {}
    for sent in ref_sents:
        for tok in sent:
            ref_counts[tok] = ref_counts.get(tok, 0) + 1
    hits = 0
    for ref in ref_sents:
        union: set[int] = set()
        for pred in pred_sents:
            union |= _lcs_indices(ref, pred)
        for index in sorted(union):
            tok = ref[index]
            if pred_counts.get(tok, 0) > 0 and ref_counts.get(tok, 0) > 0:
                hits += 1
                pred_counts[tok] -= 1
                ref_counts[tok] -= 1
    if not hits:
        return 0.0
    precision, recall = hits / n_pred, hits / n_ref
    return 2 * precision * recall / (precision + recall)


# ---- code similarity (RepoQA's retrieval check) -------------------------------------------------

_CODE_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", re.S)
_CODE_TOKEN = re.compile(r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|#.*|[A-Za-z_][A-Za-z0-9_]*|\d+|\S")


def extract_code(text: str) -> str:
    """The first fenced code block of a model's answer, or the whole answer if it has none."""
    found = _CODE_FENCE.search(text)
    return found.group(1) if found else text


def _code_lines(code: str) -> list[str]:
    lines = (
        " ".join(t for t in _CODE_TOKEN.findall(line) if not t.startswith("#")) for line in code.splitlines()
    )
    return [line for line in lines if line]


def code_similarity(a: str, b: str) -> float:
    """Similarity of two code snippets in [0, 1]: difflib's ratio over token-normalized lines
    (whitespace and comments ignored), then over tokens, whichever is higher."""
    lines_a, lines_b = _code_lines(a), _code_lines(b)
    if not lines_a or not lines_b:
        return 0.0
    by_line = SequenceMatcher(None, lines_a, lines_b, autojunk=False).ratio()
    tokens_a, tokens_b = " ".join(lines_a).split(), " ".join(lines_b).split()
    by_token = SequenceMatcher(None, tokens_a, tokens_b, autojunk=False).ratio()
    return max(by_line, by_token)


def repoqa_score(prediction: str, reference: str, candidates: list[str] | None = None,
                 threshold: float = 0.8) -> float:
    """RepoQA pass@1: the predicted code's best match among the repository's functions
    (`candidates`) must be the reference function, with similarity >= `threshold`."""
    code = extract_code(prediction)
    target = code_similarity(code, reference)
    if target < threshold:
        return 0.0
    for other in candidates or []:
        if other != reference and code_similarity(code, other) > target:
            return 0.0
    return 1.0
