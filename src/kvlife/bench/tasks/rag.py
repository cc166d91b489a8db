"""rag: questions over documents retrieved from a shared pool (non-prefix reuse, after CacheBlend and EPIC).

A seeded pool of documents, each the record of one invented person (qa_eng's facts: town of birth,
trade, a year, a pet's name, an instrument) padded with filler to `doc_tokens` tokens. Each sample's
context is a short instruction followed by `docs` documents drawn from the pool in random order, so
samples share documents at different positions and after different neighbours: a prefix cache hits
only on the instruction, a per-document cache (kvlife.store.documents) on every document. Turn 1
asks one fact of one document; turn 2 asks the same fact of two other documents (answer: both,
comma-separated). Scored by the share of the reference's items the answer contains.

`Sample.meta["segments"]` holds the context cut at document boundaries (the instruction, then each
document with its leading separator): `"".join(segments) == context`. A Session given the segments
tokenizes each piece on its own, so that a document has the same tokens wherever it appears, and
every method (dense included) sees exactly those tokens.

How it differs from SCBench: SCBench has no non-prefix reuse task; this one follows the RAG
workloads of CacheBlend (Yao et al., EuroSys 2025) and EPIC (Hu et al., 2024) with generated facts.
`--context-tokens N` (and the `long` profile, 8K) resizes the sample: up to 8 documents of N/docs tokens.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from kvlife.bench.score import items_recall
from kvlife.bench.tasks import documents
from kvlife.bench.tasks.base import Sample, Task, Turn, chars_for_tokens, filler_sentences, register
from kvlife.errors import TaskError

INSTRUCTION = ("Below are documents from the archive of the valley. Answer each question from them, "
               "with a few words only.")
SEPARATOR = "\n\n"
MAX_DOCS = 8
PAIR_QUESTIONS = {
    "town": "In which towns were {a.name} and {b.name} born?",
    "trade": "What jobs did {a.name} and {b.name} do?",
    "year": "In what years did {a.name} and {b.name} open their workshops?",
    "pet_name": "What were the names of {a.name}'s {a.pet} and {b.name}'s {b.pet}?",
    "instrument": "Which instruments did {a.name} and {b.name} play on Sundays?",
}


@functools.lru_cache(maxsize=8)
def document_pool(seed: int, pool: int, doc_tokens: int) -> tuple[tuple[str, documents.Person], ...]:
    """(text, person) per pool document; the same for every sample of a seed and size."""
    rng = random.Random(f"rag/pool/{seed}/{pool}/{doc_tokens}")
    out = []
    for number, person in enumerate(documents.people(rng, pool)):
        paragraph = person.paragraph()
        filler = max(0, chars_for_tokens(doc_tokens) - len(paragraph) - 40)
        before = filler_sentences(rng, int(filler * rng.uniform(0.1, 0.9)))
        after = filler_sentences(rng, filler - sum(len(s) + 1 for s in before))
        text = " ".join([f"Document {number + 1}: the record of {person.name}.", *before, paragraph, *after])
        out.append((text, person))
    return tuple(out)


def anchor_document(doc_tokens: int) -> str:
    """A document of the rag task's kind from a pool no sample draws from (seed -1), with the separator
    that opens every document: a lead-in for document caches (an assemble method's `lead_in=FILE`)."""
    return SEPARATOR + document_pool(-1, 1, doc_tokens)[0][0]


@register
class RAG(Task):
    name = "rag"
    group = "non-prefix reuse"
    description = "Answer from documents drawn from a shared pool in random order (per-document caches)."
    differs_from_scbench = "not in SCBench: CacheBlend/EPIC-style RAG contexts over a shared document pool"
    profiles = {
        "default": {"samples": 8, "docs": 4, "doc_tokens": 500, "pool": 12},
    }

    def resize(self, settings: dict[str, Any], tokens: int) -> dict[str, Any]:
        docs = max(3, min(MAX_DOCS, tokens // 500))
        return {**settings, "docs": docs, "doc_tokens": max(32, tokens // docs), "pool": 3 * docs}

    def samples(self, profile: str = "default", n: int | None = None, seed: int = 0,
                context_tokens: int | None = None) -> list[Sample]:
        settings = self.settings(profile, context_tokens)
        count = settings.pop("samples", 8) if n is None else n
        settings.pop("samples", None)
        settings["pool"] = document_pool(seed, settings["pool"], settings["doc_tokens"])
        return [self.make_sample(random.Random(f"{self.name}/{profile}/{seed}/{index}"), index, **settings)
                for index in range(count)]

    def make_sample(self, rng, index, docs, doc_tokens, pool, **_):
        if docs < 3 or docs > len(pool):
            raise TaskError(f"rag needs 3 <= docs <= pool size, got docs={docs}, pool={len(pool)}")
        chosen = rng.sample(range(len(pool)), docs)
        segments = [INSTRUCTION] + [SEPARATOR + pool[i][0] for i in chosen]
        first, second, third = rng.sample([pool[i][1] for i in chosen], 3)
        attribute, question, answer = rng.choice(first.questions())
        pair_attribute = rng.choice(list(PAIR_QUESTIONS))
        pair_question = PAIR_QUESTIONS[pair_attribute].format(a=second, b=third)
        turns = [Turn(question + " Answer with a few words only.", answer),
                 Turn(pair_question + " Give the two answers in that order, separated by a comma.",
                      f"{getattr(second, pair_attribute)}, {getattr(third, pair_attribute)}")]
        meta = {"segments": segments, "documents": [f"pool-{i}" for i in chosen],
                "asked": [first.name, second.name, third.name], "attributes": [attribute, pair_attribute]}
        return Sample(f"rag-{index}", self.name, "".join(segments), turns, max_new_tokens=16, meta=meta)

    def score(self, prediction: str, reference: str) -> float:
        return items_recall(prediction, reference)
