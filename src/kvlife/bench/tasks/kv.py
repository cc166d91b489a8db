"""kv: key-value retrieval (SCBench's Retr.KV).

How it differs from SCBench: SCBench's context is one JSON object of ~2,500 UUID pairs (~120K
tokens); the `scbench` profile reproduces that. The `default` profile hides a few UUID pairs as
JSON records in plain filler text (RULER's needle shape), which small models can answer, so that
what a method loses is measurable.
"""

from __future__ import annotations

import json
import random
import uuid

from kvlife.bench.score import contains_exact
from kvlife.bench.tasks.base import Sample, Task, Turn, chars_for_tokens, hide_in_filler, register

# Says what the text holds, as SCBench's JSON context begins with its instruction; without it the
# default model answered 5 of 8 first turns (it found the record in all 8 with it).
PREAMBLE = ("Some key-value records are hidden in the text below. Remember them: you will be asked for the "
            "value of a key.\n\n")


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@register
class KVRetrieval(Task):
    name = "kv"
    group = "string retrieval"
    scbench_config = "scbench_kv"
    scbench_instruction = " Answer with the value only."
    description = "Find the value of a UUID key among key-value records in a long context."
    differs_from_scbench = (
        "default hides a few JSON records in filler text; scbench profile is SCBench's JSON dict"
    )
    profiles = {
        "default": {"samples": 8, "pairs": 4, "turns": 4, "context_tokens": 2000, "dense_json": False},
        "scbench": {"samples": 100, "pairs": 2500, "turns": 5, "context_tokens": 0, "dense_json": True},
    }

    def resize(self, settings, tokens):
        if settings["dense_json"]:  # SCBench's JSON: about 68 tokens per UUID pair
            return {**settings, "pairs": max(settings["turns"], tokens // 68)}
        return super().resize(settings, tokens)

    def make_sample(self, rng, index, pairs, turns, context_tokens, dense_json):
        keys = [_uuid(rng) for _ in range(pairs)]
        values = [_uuid(rng) for _ in range(pairs)]
        if dense_json:
            context = ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
                       + json.dumps(dict(zip(keys, values)), indent=0))
        else:
            needles = [f'Record: {{"{k}": "{v}"}}.' for k, v in zip(keys, values)]
            context = PREAMBLE + hide_in_filler(rng, needles, chars_for_tokens(context_tokens))
        asked = rng.sample(range(pairs), min(turns, pairs))
        turn_list = [
            Turn(
                f'What is the value associated with the key "{keys[i]}"? Answer with the value only.',
                values[i],
            )
            for i in asked
        ]
        return Sample(f"kv-{index}", self.name, context, turn_list, max_new_tokens=40)

    def score(self, prediction: str, reference: str) -> float:
        return contains_exact(prediction, reference)
