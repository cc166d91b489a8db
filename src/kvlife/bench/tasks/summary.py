"""summary: summarize one part of several concatenated documents (SCBench's En.Sum).

The context holds several numbered parts, each a short story (what a town's guild or council
decided, what it cost, who led it and why, how it ended) whose four key sentences are spread
through filler; each turn asks for a summary of one part. Scored by ROUGE-Lsum F1 against the
part's four key sentences.

How it differs from SCBench: SCBench summarizes long real documents (~104K tokens in all) against
human summaries; here the parts and their reference summaries are generated, so the reference is
exactly the information in the part. A perfect summary scores 1, but a good free-form summary
scores well below (ROUGE is lexical): the default model cannot reach 75% at any size, and its
measured score is recorded in benchmarks/results/tasks.json.
"""

from __future__ import annotations

import re

from kvlife.bench.score import rouge_lsum
from kvlife.bench.tasks import documents
from kvlife.bench.tasks.base import Sample, Task, Turn, chars_for_tokens, register

QUERY = "Summarize Part {number} (\"{title}\") in a few sentences."
HEADER = "Several short reports follow, numbered as parts."


def parts_context(rng, parts: int, context_tokens: int):
    """(context, stories): stories as numbered parts with filler between their key sentences."""
    filler = max(0, chars_for_tokens(context_tokens) // max(1, parts) - 400)
    told = documents.stories(rng, parts, filler)
    context = "\n\n".join(f"Part {i}: {story.title}\n{story.text}" for i, story in enumerate(told, 1))
    return HEADER + "\n\n" + context, told


def part_alone(context: str, query: str) -> str | None:
    """The context cut to the one part a summary query asks about (with its own filler), or None
    for a query that asks no part: the ceiling measurement, where finding the part is trivial."""
    match = re.match(r"Summarize Part (\d+) ", query)
    if match is None:
        return None
    header = f"Part {match.group(1)}: "
    part = next((block for block in context.split("\n\n") if block.startswith(header)), None)
    return None if part is None else f"{HEADER}\n\n{part}"


@register
class Summary(Task):
    name = "summary"
    group = "global information"
    scbench_config = "scbench_summary"
    scbench_max_new_tokens = 200
    description = "Summarize one numbered part of several concatenated documents (ROUGE-Lsum)."
    differs_from_scbench = "generated stories whose key sentences are the reference; cannot reach 75% (ROUGE)"
    profiles = {
        "default": {"samples": 8, "parts": 4, "turns": 3, "context_tokens": 1500},
        "scbench": {"samples": 70, "parts": 10, "turns": 5, "context_tokens": 104000},
    }

    def make_sample(self, rng, index, parts, turns, context_tokens):
        context, told = parts_context(rng, parts, context_tokens)
        asked = rng.sample(range(parts), min(turns, parts))
        turn_list = [Turn(QUERY.format(number=i + 1, title=told[i].title), told[i].summary) for i in asked]
        return Sample(f"summary-{index}", self.name, context, turn_list, max_new_tokens=96)

    def score(self, prediction: str, reference: str) -> float:
        return rouge_lsum(prediction, reference)

    def part_only(self, sample: Sample, turn: Turn) -> str | None:
        return part_alone(sample.context, turn.query)
