"""What the rag task's wrong answers are (for benchmarks/blend.py): another document's fact, filler, or other.

A turn scored below 1 is `partly` when it has some of the reference's items; otherwise `filler` when it
contains a phrase of the task's filler sentences (the documents' padding), `another_document` when it
contains a fact (town, trade, year, pet's name, instrument) of a person in the context who was not asked,
else `other`. Read from the rows and the regenerated samples (the task is deterministic per seed).
"""

from __future__ import annotations

import collections

from kvlife.bench.tasks import get_task, rag
from kvlife.bench.tasks.base import filler_phrases

ATTRIBUTES = ["town", "trade", "year", "pet_name", "instrument"]


def answer_kinds(rows: list[dict], size: int, seed: int) -> dict[str, dict[str, int]]:
    """Per method, how many turns of the rows at `size` were right, partly right, filler, another
    document's fact, or other."""
    task = get_task("rag")
    settings = task.settings("default", size)
    pool = rag.document_pool(seed, settings["pool"], settings["doc_tokens"])
    wanted = {r["sample_id"] for r in rows if r["size"] == size}
    count = 1 + max((int(i.rsplit("-", 1)[1]) for i in wanted), default=-1)
    samples = {s.id: s for s in task.samples("default", count, seed=seed, context_tokens=size)}
    phrases = [phrase.lower() for phrase in filler_phrases()]
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    seen = set()
    for row in rows:
        # a sample's first row per method (dense may be run again for timing: its answers count once)
        if row["size"] != size or (row["method"], row["sample_id"]) in seen:
            continue
        seen.add((row["method"], row["sample_id"]))
        people = [pool[int(d.rsplit("-", 1)[1])][1] for d in samples[row["sample_id"]].meta["documents"]]
        facts = {str(getattr(person, name)).lower() for person in people for name in ATTRIBUTES}
        for turn in row["turns"]:
            kinds[row["method"]][_kind(turn, facts, phrases)] += 1
    return {method: dict(counter) for method, counter in kinds.items()}


def _kind(turn: dict, facts: set[str], phrases: list[str]) -> str:
    if turn["score"] >= 1:
        return "right"
    if turn["score"] > 0:
        return "partly"
    answer, reference = turn["prediction"].lower(), turn["reference"].lower()
    if any(phrase in answer for phrase in phrases):
        return "filler"
    if any(fact in answer for fact in facts if fact not in reference):
        return "another_document"
    return "other"
