"""prefix_suffix: find the string with a given prefix and suffix (SCBench's Retr.Prefix-Suffix).

How it differs from SCBench: SCBench lists thousands of random strings (~112K tokens); the
`scbench` profile does that. The `default` profile hides a few codes in filler text, each asked
by its first and last characters.
"""

from __future__ import annotations

import random
import string

from kvlife.bench.score import alnum_exact
from kvlife.bench.tasks.base import Sample, Task, Turn, chars_for_tokens, hide_in_filler, register

_ALPHABET = string.ascii_letters + string.digits


def _code(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(length))


@register
class PrefixSuffix(Task):
    name = "prefix_suffix"
    group = "string retrieval"
    scbench_config = "scbench_prefix_suffix"
    scbench_instruction = " Answer with the full string only."
    description = "Find the code that starts with a given prefix and ends with a given suffix."
    differs_from_scbench = "default hides a few codes in filler; scbench profile is SCBench's long list"
    profiles = {
        "default": {
            "samples": 8, "codes": 4, "turns": 4, "length": 12, "context_tokens": 2000, "dense_list": False,
        },
        "scbench": {
            "samples": 100, "codes": 9000, "turns": 5, "length": 40, "context_tokens": 0, "dense_list": True,
        },
    }

    def resize(self, settings, tokens):
        if settings["dense_list"]:  # SCBench's list: about 31 tokens per 40-character string
            return {**settings, "codes": max(settings["turns"], tokens * 40 // (31 * settings["length"]))}
        return super().resize(settings, tokens)

    def make_sample(self, rng, index, codes, turns, length, context_tokens, dense_list):
        items = [_code(rng, length) for _ in range(codes)]
        if dense_list:
            context = "Here is a list of strings, one per line:\n" + "\n".join(items)
        else:
            needles = [f"Special code: {item}." for item in items]
            context = hide_in_filler(rng, needles, chars_for_tokens(context_tokens))
        asked = rng.sample(range(codes), min(turns, codes))
        turn_list = [
            Turn(
                f"Which {'string' if dense_list else 'special code'} "
                f"starts with \"{items[i][:4]}\" and ends with "
                f"\"{items[i][-3:]}\"? Answer with the full string only.",
                items[i],
            )
            for i in asked
        ]
        return Sample(f"prefix_suffix-{index}", self.name, context, turn_list, max_new_tokens=max(24, length))

    def score(self, prediction: str, reference: str) -> float:
        return alnum_exact(prediction, reference)
