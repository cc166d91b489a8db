"""summary_with_needles: summary turns and passkey turns over one context (SCBench's Mix.Sum+NIAH).

The summary task's numbered parts, with passkey needles ("The secret passkey for the amber door
is 48213.") hidden among them; turns alternate between summarizing a part (ROUGE-Lsum) and
giving one door's passkey (exact number). The scorer tells the two apart by the reference: a
number is a passkey, anything else a summary.

How it differs from SCBench: generated parts and needles (SCBench: real documents with
needle-in-a-haystack passkeys, ~105K tokens, its `scbench` profile's length).
"""

from __future__ import annotations

from kvlife.bench.score import first_number, rouge_lsum
from kvlife.bench.tasks.base import Sample, Task, Turn, register
from kvlife.bench.tasks.summary import QUERY, part_alone, parts_context

DOORS = ["amber", "crimson", "silver", "olive", "azure", "ivory", "copper", "violet", "scarlet", "golden"]


def needle_or_summary_score(prediction: str, reference: str) -> float:
    if reference.isdigit():
        return first_number(prediction, reference)
    return rouge_lsum(prediction, reference)


@register
class SummaryWithNeedles(Task):
    name = "summary_with_needles"
    group = "multi-tasking"
    scbench_config = "scbench_summary_with_needles"
    scbench_max_new_tokens = 200
    description = "Alternate summaries of parts with passkeys hidden among them, over one context."
    differs_from_scbench = "generated parts and passkeys; summary turns cannot reach 75% (ROUGE)"
    profiles = {
        "default": {"samples": 8, "parts": 4, "needles": 3, "turns": 4, "context_tokens": 1500},
        "scbench": {"samples": 70, "parts": 10, "needles": 4, "turns": 8, "context_tokens": 105000},
    }

    def make_sample(self, rng, index, parts, needles, turns, context_tokens):
        context, told = parts_context(rng, parts, context_tokens)
        doors = rng.sample(DOORS, needles)
        keys = [str(rng.randint(10000, 99999)) for _ in doors]
        paragraphs = context.split("\n\n")
        for door, key in zip(doors, keys):
            slot = rng.randint(1, len(paragraphs))
            paragraphs.insert(slot, f"The secret passkey for the {door} door is {key}. Remember it.")
        context = "\n\n".join(paragraphs)
        summaries = [Turn(QUERY.format(number=i + 1, title=told[i].title), told[i].summary)
                     for i in rng.sample(range(parts), parts)]
        passkeys = [Turn(f"What is the secret passkey for the {door} door? Answer with the number only.", key)
                    for door, key in zip(doors, keys)]
        turn_list = []
        for i in range(turns):  # alternate: summary, passkey, summary, ...
            source = summaries if i % 2 == 0 else passkeys
            if source:
                turn_list.append(source.pop(0))
        return Sample(f"summary_with_needles-{index}", self.name, context, turn_list, max_new_tokens=96)

    def score(self, prediction: str, reference: str) -> float:
        return needle_or_summary_score(prediction, reference)

    def part_only(self, sample: Sample, turn: Turn) -> str | None:
        return part_alone(sample.context, turn.query)
