"""What a task is: seeded samples of one shared context with several turns, and a scorer."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvlife.errors import TaskError


@dataclass
class Turn:
    query: str
    answer: str


@dataclass
class Sample:
    id: str
    task: str
    context: str
    turns: list[Turn]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


class Task:
    """A task: its capability group, its profiles (sizes), a seeded sample generator and a scorer.

    Subclasses set `name`, `group`, `profiles` (each a dict of generator settings, including
    `samples`: the default sample count) and implement `make_sample(rng, index, **settings)` and
    `score(prediction, reference)` (a float in [0, 1]).
    """

    name: ClassVar[str] = ""
    group: ClassVar[str] = ""
    description: ClassVar[str] = ""
    differs_from_scbench: ClassVar[str] = ""
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}
    # SCBench's released rows of this task (`kvlife bench --data`): its config (the data file's name),
    # the instruction appended to a row's `input`, the new-token budget (generous, after SCBench's
    # own), and whether a list answer is every item wanted (else its first element is the reference).
    scbench_config: ClassVar[str] = ""
    scbench_instruction: ClassVar[str] = ""
    scbench_max_new_tokens: ClassVar[int] = 64
    scbench_joins_answers: ClassVar[bool] = False

    def settings(self, profile: str, context_tokens: int | None = None) -> dict[str, Any]:
        """A profile's generator settings; `context_tokens` resizes its context to about that many tokens."""
        if profile not in self.profiles:
            raise TaskError(
                f"task {self.name} has no profile {profile!r}; profiles: {', '.join(self.profiles)}"
            )
        settings = dict(self.profiles[profile])
        if context_tokens is not None:
            if context_tokens <= 0:
                raise TaskError(f"context length must be a positive number of tokens, got {context_tokens}")
            settings = self.resize(settings, context_tokens)
        return settings

    def resize(self, settings: dict[str, Any], tokens: int) -> dict[str, Any]:
        """`settings` changed so that the context is about `tokens` tokens long. Most tasks hide their
        needles in filler whose length is `context_tokens`; tasks sized otherwise override this."""
        return {**settings, "context_tokens": tokens}

    def room_tokens(self) -> int:
        """Tokens a sample needs beyond its context (queries, fed-back answers, generated tokens): a
        generous estimate, used to refuse a context that would not fit the model's window."""
        sample = self.samples("default", 1)[0]
        return 64 + sum(len(t.query) // 2 + len(t.answer) // 2 + sample.max_new_tokens for t in sample.turns)

    def samples(self, profile: str = "default", n: int | None = None, seed: int = 0,
                context_tokens: int | None = None) -> list[Sample]:
        settings = self.settings(profile, context_tokens)
        count = settings.pop("samples", 8) if n is None else n
        settings.pop("samples", None)
        out = []
        for index in range(count):
            # One generator per sample: sample i is the same whatever n is.
            rng = random.Random(f"{self.name}/{profile}/{seed}/{index}")
            out.append(self.make_sample(rng, index, **settings))
        return out

    def make_sample(self, rng: random.Random, index: int, **settings: Any) -> Sample:
        raise NotImplementedError

    def released_turn(self, question: str, answer: str, options: list[str]) -> Turn:
        """A turn of SCBench's released rows, asked in this task's own style."""
        return Turn(question + self.scbench_instruction, answer)

    def score(self, prediction: str, reference: str) -> float:
        raise NotImplementedError


# ---- filler text: plain, varied English sentences with no facts the questions could ask about ----

_SUBJECTS = ["The committee", "A traveller", "The old library", "Our neighbour", "The river",
             "A small company", "The museum", "Every gardener", "The orchestra", "A young engineer",
             "The village baker", "The city council", "A curious student", "The lighthouse keeper",
             "The morning train"]
_VERBS = ["discussed", "remembered", "painted", "described", "repaired", "visited", "studied", "ignored",
          "celebrated", "measured", "collected", "explained", "questioned", "admired", "planned"]
_OBJECTS = ["the long winter", "a forgotten map", "the quiet harbour", "an unusual harvest",
            "the narrow bridge", "a box of letters", "the evening market", "the mountain path",
            "a set of old tools", "the summer festival", "a broken clock", "the empty stadium",
            "the garden wall", "a row of lanterns"]
_TAILS = ["before the rain began", "with great patience", "for most of the afternoon",
          "without saying much", "while the bells rang", "as the sun went down", "in a careful way",
          "after a long delay", "with a few friends", "near the edge of town", "despite the cold wind",
          "for no clear reason"]


def filler_phrases() -> list[str]:
    """The phrases `filler_sentences` builds its sentences from (to recognise filler in an answer)."""
    return [*_SUBJECTS, *_VERBS, *_OBJECTS, *_TAILS]


def filler_sentences(rng: random.Random, n_chars: int) -> list[str]:
    """Seeded filler of about `n_chars` characters, as a list of sentences."""
    sentences, total = [], 0
    while total < n_chars:
        sentence = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
                    f"{rng.choice(_OBJECTS)} {rng.choice(_TAILS)}.")
        sentences.append(sentence)
        total += len(sentence) + 1
    return sentences


def hide_in_filler(
    rng: random.Random, needles: list[str], n_chars: int, depths: list[float] | None = None
) -> str:
    """Filler text with each needle inserted as its own sentence at a depth in [0, 1]."""
    sentences = filler_sentences(rng, n_chars)
    if depths is None:
        depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    slots = [min(len(sentences), int(d * len(sentences))) for d in depths]
    for offset, (slot, needle) in enumerate(sorted(zip(slots, needles), key=lambda pair: pair[0])):
        sentences.insert(slot + offset, needle)
    return " ".join(sentences)


def chars_for_tokens(tokens: int) -> int:
    """English filler runs at about 5 characters per token for the embedded models' tokenizers."""
    return int(tokens * 5.0)


TASKS: dict[str, Callable[[], Task]] = {}
LONG_CONTEXT_TOKENS = 8192  # the `long` profile: the default profile's needles in an 8K-token context


def register(cls):
    """Register a task; it gains a `long` profile (its default resized to 8K tokens) unless it has one."""
    if "long" not in cls.profiles and "default" in cls.profiles:
        long_settings = cls().resize(dict(cls.profiles["default"]), LONG_CONTEXT_TOKENS)
        cls.profiles = {**cls.profiles, "long": long_settings}
    TASKS[cls.name] = cls
    return cls
