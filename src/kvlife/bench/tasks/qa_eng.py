"""qa_eng: short-answer questions over a long English document (SCBench's En.QA).

The document tells of invented people (town of birth, trade, a year, a pet's name, an instrument),
one paragraph each between filler paragraphs; each turn asks one fact about a different person.
Scored by `qa_score`: 1 when the answer contains the reference as whole words, else token F1.

How it differs from SCBench: SCBench uses novels from InfiniteBench (~198K tokens) and questions
written by people, scored by token F1 alone (a verbose right answer loses credit there); here the
facts are generated, so answers are exact and no model can know them beforehand. The `scbench`
profile keeps SCBench's length with more people.
"""

from __future__ import annotations

from kvlife.bench.score import qa_score
from kvlife.bench.tasks import documents
from kvlife.bench.tasks.base import Sample, Task, Turn, chars_for_tokens, register

INSTRUCTION = " Answer with a few words only."


def fact_document(rng, persons: int, context_tokens: int):
    """(context, people) with each person's paragraph between filler."""
    cast = documents.people(rng, persons)
    filler = max(0, chars_for_tokens(context_tokens) - sum(len(p.paragraph()) for p in cast))
    body = documents.with_filler(rng, [p.paragraph() for p in cast], filler)
    return "A record of some people of the valley and their lives.\n\n" + body, cast


@register
class QAEnglish(Task):
    name = "qa_eng"
    group = "semantic retrieval"
    scbench_config = "scbench_qa_eng"
    scbench_instruction = INSTRUCTION
    scbench_max_new_tokens = 40
    description = "Answer questions about facts stated in a long English document."
    differs_from_scbench = "generated documents with known facts instead of novels; containment or token F1"
    profiles = {
        "default": {"samples": 8, "persons": 4, "turns": 4, "context_tokens": 1200},
        "scbench": {"samples": 69, "persons": 60, "turns": 5, "context_tokens": 198000},
    }

    def make_sample(self, rng, index, persons, turns, context_tokens):
        context, cast = fact_document(rng, persons, context_tokens)
        asked = rng.sample(cast, min(turns, len(cast)))
        turn_list = []
        for person in asked:
            _, question, answer = rng.choice(person.questions())
            turn_list.append(Turn(question + INSTRUCTION, answer))
        return Sample(f"qa_eng-{index}", self.name, context, turn_list, max_new_tokens=16)

    def score(self, prediction: str, reference: str) -> float:
        return qa_score(prediction, reference)
