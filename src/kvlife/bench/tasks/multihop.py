"""multihop: variable tracking (SCBench's Retr.MultiHop, after RULER).

Chains such as `VAR QWERT = 41233.` then `VAR ASDFG = VAR QWERT.` are hidden in filler; each turn
asks for every variable that ends up holding one value. How it differs from SCBench: sizes (the
`scbench` profile uses SCBench's ~120K-token filler and more hops); scoring is the F1 between the
chain's variables and the five-letter names the answer gives (so listing every name is not
rewarded), without SCBench's per-character loop.
"""

from __future__ import annotations

import random
import string

from kvlife.bench.score import items_f1
from kvlife.bench.tasks.base import Sample, Task, Turn, chars_for_tokens, hide_in_filler, register


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


@register
class MultiHop(Task):
    name = "multihop"
    group = "string retrieval"
    scbench_config = "scbench_vt"
    scbench_instruction = " Answer with the variable names only, separated by commas."
    scbench_max_new_tokens = 48
    scbench_joins_answers = True  # a released list answer is every variable, all wanted
    description = "Track variables assigned along a chain and name all that hold a given value."
    differs_from_scbench = "smaller default (few chains, 1 hop); F1 over the names given"
    profiles = {
        "default": {"samples": 8, "chains": 3, "hops": 1, "context_tokens": 1500},
        "scbench": {"samples": 100, "chains": 5, "hops": 4, "context_tokens": 120000},
    }

    def make_sample(self, rng, index, chains, hops, context_tokens):
        taken: set[str] = set()
        needles, turn_list = [], []
        for _ in range(chains):
            value = str(rng.randint(10000, 99999))
            names = [_name(rng, taken) for _ in range(hops + 1)]
            links = [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
            chain = [f"VAR {names[0]} = {value}."] + links
            needles.append(chain)
            turn_list.append(Turn(
                f"Find all variables that are assigned the value {value}, "
                "directly or through other variables. "
                "Answer with the variable names only, separated by commas.",
                ", ".join(names),
            ))
        # Keep each chain's statements in order, spread through the text.
        flat = [statement for chain in needles for statement in chain]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in flat)
        order = sorted(range(len(flat)), key=lambda i: (i % (hops + 1), i))
        placed = [flat[i] for i in order]
        context = hide_in_filler(rng, placed, chars_for_tokens(context_tokens), depths)
        return Sample(f"multihop-{index}", self.name, context, turn_list, max_new_tokens=12 * (hops + 1))

    def score(self, prediction: str, reference: str) -> float:
        return items_f1(prediction, reference)
