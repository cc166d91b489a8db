"""choice_eng: four-option questions over a long English document (SCBench's En.MultiChoice).

The same generated documents as qa_eng; each turn asks one fact with four options: the right
value and three values of the same attribute belonging to other people in the document (so the
options are all plausible and only reading decides). The reference is "B) oboe"; an answer is
right when its first option letter is B, or, giving no letter, when it contains the option text.

How it differs from SCBench: SCBench's documents are novels (~188K tokens) with human questions;
its scorer also accepts the letter or the option text. The `scbench` profile keeps the length.
"""

from __future__ import annotations

from kvlife.bench.score import choice_score
from kvlife.bench.tasks.base import Sample, Task, Turn, register
from kvlife.bench.tasks.qa_eng import fact_document

LETTERS = "ABCD"


def choice_query(question: str, options: list[str]) -> str:
    listed = "\n".join(f"{letter}) {option}" for letter, option in zip(LETTERS, options))
    return f"{question}\n{listed}\nAnswer with the right option: its letter and its text."


@register
class ChoiceEnglish(Task):
    name = "choice_eng"
    group = "semantic retrieval"
    scbench_config = "scbench_choice_eng"
    scbench_max_new_tokens = 16
    description = "Pick the right one of four options about a fact in a long English document."
    differs_from_scbench = "generated documents with known facts; distractors are other people's values"
    profiles = {
        "default": {"samples": 8, "persons": 4, "turns": 4, "context_tokens": 1200},
        "scbench": {"samples": 58, "persons": 60, "turns": 5, "context_tokens": 188000},
    }

    def make_sample(self, rng, index, persons, turns, context_tokens):
        context, cast = fact_document(rng, persons, context_tokens)
        asked = rng.sample(cast, min(turns, len(cast)))
        turn_list = []
        for person in asked:
            # only attributes with three other values in the document can have three distractors
            choices = [(attribute, question, answer) for attribute, question, answer in person.questions()
                       if len({getattr(p, attribute) for p in cast} - {answer}) >= 3]
            attribute, question, answer = rng.choice(choices)
            others = sorted({getattr(p, attribute) for p in cast} - {answer})
            options = rng.sample(others, 3) + [answer]
            rng.shuffle(options)
            letter = LETTERS[options.index(answer)]
            turn_list.append(Turn(choice_query(question, options), f"{letter}) {answer}"))
        return Sample(f"choice_eng-{index}", self.name, context, turn_list, max_new_tokens=8)

    def released_turn(self, question: str, answer: str, options: list[str]) -> Turn:
        """SCBench's options listed as ours; its answer (the option text or its letter) as "B) oboe"."""
        options = options[:4]
        if not options:
            return Turn(question, answer)
        if answer in options:
            answer = f"{LETTERS[options.index(answer)]}) {answer}"
        elif answer.strip() and answer.strip()[0] in LETTERS[:len(options)]:
            letter = answer.strip()[0]
            answer = f"{letter}) {options[LETTERS.index(letter)]}"
        return Turn(choice_query(question, options), answer)

    def score(self, prediction: str, reference: str) -> float:
        return choice_score(prediction, reference)
