"""repoqa: find a function in a code repository from a description of it (SCBench's Code.RepoQA).

The context is a repository of real Python functions (the standard library's own sources, grouped
by file, every docstring removed); each turn describes one function in words (its docstring's
first paragraph, its name replaced by "this function", and its argument names) and asks for its
code. Scored as SCBench/RepoQA: the answer's code is compared with every function in the
repository, and the turn passes when the best match is the described function with similarity
>= 0.8 (pass@1).

How it differs from SCBench: SCBench's repositories are whole GitHub projects in six languages
(~64K tokens) with descriptions written by an LLM; here they are standard-library functions
(Python only) and descriptions come from docstrings. Similarity is difflib's ratio over
token-normalized lines (RepoQA uses BLEU-based similarity on sanitized code). The `default`
profile is a ~1.5K-token repository whose asked functions are short, so the answer is cheap to
decode on CPU.
"""

from __future__ import annotations

from kvlife.bench.score import repoqa_score
from kvlife.bench.tasks import code
from kvlife.bench.tasks.base import Sample, Task, Turn, register

QUERY = ("Below is a description of a function in the repository above. Find that function and copy its "
         "complete code exactly as it appears there, in one ```python code block, with nothing else.\n"
         "Description: {description}")


class RepoScoring:
    """Mixin: a repoqa answer is scored against every function of its sample's repository."""

    def remember_repository(self, references: list[str], functions: list[str]) -> None:
        candidates = getattr(self, "_candidates", None)
        if candidates is None:
            candidates = self._candidates = {}
        for reference in references:
            candidates.setdefault(reference, set()).update(functions)

    def repo_score(self, prediction: str, reference: str) -> float:
        candidates = getattr(self, "_candidates", {}).get(reference, set())
        return repoqa_score(prediction, reference, sorted(candidates))


def repo_turns(rng, n_chars: int, turns: int, max_target_chars: int):
    """(context, turns, all function codes) for a repository of about `n_chars`."""
    context, functions, _ = code.repository(rng, n_chars, 0)
    short = [f for f in functions if len(f.code) <= max_target_chars]
    targets = rng.sample(short, min(turns, len(short)))
    turn_list = [Turn(QUERY.format(description=code.describe(f)), f.code) for f in targets]
    return context, turn_list, [f.code for f in functions]


@register
class RepoQA(RepoScoring, Task):
    name = "repoqa"
    group = "semantic retrieval"
    scbench_config = "scbench_repoqa"
    scbench_max_new_tokens = 512
    description = "Given a description of a function, write out its code from a repository in the context."
    differs_from_scbench = "standard-library Python functions, docstring descriptions, difflib similarity"
    profiles = {
        "default": {"samples": 8, "turns": 4, "context_tokens": 1500, "max_target_chars": 320},
        "scbench": {"samples": 88, "turns": 5, "context_tokens": 64000, "max_target_chars": 900},
    }

    def make_sample(self, rng, index, turns, context_tokens, max_target_chars):
        context, turn_list, functions = repo_turns(rng, int(context_tokens * 3.6), turns, max_target_chars)
        self.remember_repository([t.answer for t in turn_list], functions)
        max_new_tokens = max_target_chars // 3 + 24
        return Sample(f"repoqa-{index}", self.name, context, turn_list, max_new_tokens=max_new_tokens)

    def released_turn(self, question: str, answer: str, options: list[str]) -> Turn:
        return Turn(QUERY.format(description=question), answer)

    def score(self, prediction: str, reference: str) -> float:
        return self.repo_score(prediction, reference)
