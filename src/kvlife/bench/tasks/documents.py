"""Seeded documents with known facts, shared by qa_eng, choice_eng, summary and their mixes.

People (a common first name and an invented surname) with five attributes each (town of birth,
trade, a year, a pet's name, an instrument), told in plain sentences between filler paragraphs;
and short news-like stories whose key sentences are their reference summary. Surnames, towns and
pets' names are invented from syllables, so no answer can come from what a model already knows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvlife.bench.tasks.base import filler_sentences

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "r", "s", "st", "t",
           "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "o", "a", "e"]
_CODAS = ["", "n", "r", "l", "m", "s", "th", "nd", "rk", "ll", "t"]
_TOWN_ENDS = ["moor", "ford", "wick", "stead", "holm", "bury", "mere", "dale", "haven", "field"]

FIRST_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate",
               "Leo", "Maria", "Noah", "Olivia", "Peter", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Yusuf",
               "Zoe", "Oscar"]
TRADES = ["glassblower", "carpenter", "beekeeper", "cartographer", "locksmith", "weaver", "potter",
          "bookbinder", "stonemason", "clockmaker", "tailor", "shipwright", "brewer", "saddler", "printer"]
INSTRUMENTS = ["oboe", "cello", "harp", "trumpet", "violin", "flute", "banjo", "accordion", "clarinet",
               "mandolin", "tuba", "bagpipes", "harmonica", "trombone", "viola"]
PETS = ["dog", "cat", "parrot", "goat", "horse", "tortoise", "rabbit"]


def word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def unique(rng: random.Random, make, taken: set[str]) -> str:
    while True:
        value = make()
        if value not in taken:
            taken.add(value)
            return value


@dataclass
class Person:
    name: str
    town: str
    trade: str
    year: str
    pet: str
    pet_name: str
    instrument: str

    def paragraph(self) -> str:
        return (f"{self.name} was born in the town of {self.town}. For most of a long life, "
                f"{self.name} worked as a {self.trade}. In {self.year}, {self.name} opened a small "
                f"workshop near the market. {self.name} kept a {self.pet} called {self.pet_name}, "
                f"and on Sundays played the {self.instrument} for the neighbours.")

    # (attribute, question, answer)
    def questions(self) -> list[tuple[str, str, str]]:
        return [
            ("town", f"In which town was {self.name} born?", self.town),
            ("trade", f"What job did {self.name} do?", self.trade),
            ("year", f"In what year did {self.name} open a workshop?", self.year),
            ("pet_name", f"What was the name of {self.name}'s {self.pet}?", self.pet_name),
            ("instrument", f"Which instrument did {self.name} play on Sundays?", self.instrument),
        ]


def people(rng: random.Random, count: int) -> list[Person]:
    taken: set[str] = set()
    out = []
    for _ in range(count):
        name = unique(rng, lambda: f"{rng.choice(FIRST_NAMES)} {word(rng, 2).capitalize()}", taken)
        town = unique(rng, lambda: word(rng, 1).capitalize() + rng.choice(_TOWN_ENDS), taken)
        pet_name = unique(rng, lambda: word(rng, 2).capitalize(), taken)
        out.append(Person(name, town, rng.choice(TRADES), str(rng.randint(1850, 1990)), rng.choice(PETS),
                          pet_name, rng.choice(INSTRUMENTS)))
    return out


def with_filler(rng: random.Random, paragraphs: list[str], n_chars: int) -> str:
    """Paragraphs separated by filler paragraphs, about `n_chars` of filler in all."""
    gaps = len(paragraphs) + 1
    per_gap = max(0, n_chars // gaps)
    parts = []
    for paragraph in paragraphs:
        if per_gap:
            parts.append(" ".join(filler_sentences(rng, per_gap)))
        parts.append(paragraph)
    if per_gap:
        parts.append(" ".join(filler_sentences(rng, per_gap)))
    return "\n\n".join(parts)


# ---- stories with reference summaries ------------------------------------------------------------

_ORGS = ["fishing guild", "town council", "school board", "railway company", "farmers' union",
         "library society", "harbour authority", "choir", "football club", "water board"]
_ACTIONS = [("rebuild the old bridge", "the new bridge opened to carts and walkers"),
            ("plant an orchard on the hill", "the first apples were picked two years later"),
            ("open a night school", "forty adults learned to read and write"),
            ("dig a new well", "the village had clean water all summer"),
            ("restore the clock tower", "the clock struck the hours again"),
            ("build a covered market", "traders stayed dry through the winter"),
            ("start a ferry service", "the crossing took ten minutes instead of an hour"),
            ("repair the sea wall", "the spring storms did no damage"),
            ("found a small museum", "visitors came from the whole valley"),
            ("lay a road to the quarry", "stone reached the town twice as fast")]
_REASONS = ["the old arrangement had failed too often", "the young people needed a reason to stay",
            "the money from the fair had to be used well", "everyone had asked for it for years",
            "the winter had shown how fragile things were"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


@dataclass
class Story:
    title: str
    text: str
    summary: str


def stories(rng: random.Random, count: int, filler_chars: int) -> list[Story]:
    taken: set[str] = set()
    out = []
    actions = rng.sample(_ACTIONS, min(count, len(_ACTIONS)))
    while len(actions) < count:
        actions.append(rng.choice(_ACTIONS))
    for action, outcome in actions:
        town = unique(rng, lambda: word(rng, 1).capitalize() + rng.choice(_TOWN_ENDS), taken)
        leader = unique(rng, lambda: f"{word(rng, 2).capitalize()} {word(rng, 2).capitalize()}", taken)
        org = rng.choice(_ORGS)
        key = [f"In {rng.choice(_MONTHS)}, the {org} of {town} decided to {action}.",
               f"The work cost {rng.randint(2, 90)} thousand crowns and took {rng.randint(3, 40)} weeks.",
               f"{leader}, who led the work, said it was needed because {rng.choice(_REASONS)}.",
               f"In the end, {outcome}."]
        body = []
        for sentence in key:
            body.append(sentence)
            if filler_chars:
                body.extend(filler_sentences(rng, filler_chars // len(key)))
        title = f"The {org} of {town}"
        out.append(Story(title, " ".join(body), " ".join(key)))
    return out
