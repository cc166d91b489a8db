"""repoqa_and_kv: function retrieval and key-value turns over one context (SCBench's Mix.RepoQA+KV).

The context holds a repoqa repository followed by a JSON block of UUID key-value records; turns
alternate between a repoqa question (scored as repoqa: best match among the repository's
functions, similarity >= 0.8) and a key lookup (exact UUID). The scorer tells them apart by the
reference: a UUID is a value, anything else code.

How it differs from SCBench: the repository is standard-library Python (see repoqa), and the
default profile has few records; the `scbench` profile uses SCBench's sizes (~68K tokens).
"""

from __future__ import annotations

import json
import re

from kvlife.bench.score import contains_exact
from kvlife.bench.tasks.base import Sample, Task, Turn, register
from kvlife.bench.tasks.kv import _uuid
from kvlife.bench.tasks.repoqa import RepoScoring, repo_turns

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@register
class RepoQAAndKV(RepoScoring, Task):
    name = "repoqa_and_kv"
    group = "multi-tasking"
    scbench_config = "scbench_repoqa_and_kv"
    scbench_max_new_tokens = 512
    description = "Alternate function retrieval from a repository and UUID key lookups, over one context."
    differs_from_scbench = "standard-library repository; few records by default"
    profiles = {
        "default": {"samples": 8, "turns": 4, "context_tokens": 1200, "pairs": 4, "max_target_chars": 320},
        "scbench": {
            "samples": 88, "turns": 8, "context_tokens": 60000, "pairs": 200, "max_target_chars": 900,
        },
    }

    def make_sample(self, rng, index, turns, context_tokens, pairs, max_target_chars):
        repo, code_turns, functions = repo_turns(rng, int(context_tokens * 3.6), turns, max_target_chars)
        self.remember_repository([t.answer for t in code_turns], functions)
        keys = [_uuid(rng) for _ in range(pairs)]
        values = [_uuid(rng) for _ in range(pairs)]
        records = json.dumps(dict(zip(keys, values)), indent=0)
        context = f"{repo}\n\n\n# ---- records.json ----\n{records}"
        kv_turns = [Turn(f'What is the value associated with the key "{keys[i]}" in records.json? '
                         "Answer with the value only.", values[i]) for i in rng.sample(range(pairs), pairs)]
        turn_list = []
        for i in range(turns):  # alternate: code, value, code, ...
            source = code_turns if i % 2 == 0 else kv_turns
            if source:
                turn_list.append(source.pop(0))
        return Sample(f"repoqa_and_kv-{index}", self.name, context, turn_list,
                      max_new_tokens=max_target_chars // 3 + 24)

    def score(self, prediction: str, reference: str) -> float:
        if _UUID.match(reference.strip()):
            return contains_exact(prediction, reference)
        return self.repo_score(prediction, reference)
