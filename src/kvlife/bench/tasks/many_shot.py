"""many_shot: in-context learning from many labelled examples (SCBench's ICL.ManyShot).

The context lists ~100+ labelled examples of a classification whose labels are arbitrary words:
each category of things (fruits, animals, tools, ...) is mapped, per sample, to a random label
("orbit", "candle", ...), so the mapping can only be learned from the examples. Each turn gives
an item to label: with `held_out` > 0 (the `scbench` profile) an item of a known category that is
not among the examples, which needs the mapping generalized; with `held_out` = 0 (the `default`
profile) an item that the examples label, the easier form. Each turn names the item and asks which
label the examples give it; asked in the examples' own form ("Item: X" then "What is its label?"),
the default model repeated the item or answered one label for nearly every item (0 of 4 on turn 1).
Its measured score is in benchmarks/results/tasks.json. Scored exactly on the label.

How it differs from SCBench: SCBench's many-shot tasks are real classification datasets (its
contexts ~22K tokens); here the task is generated, exact, and cannot be answered from prior
knowledge. The `scbench` profile uses SCBench's length and more categories.
"""

from __future__ import annotations

from kvlife.bench.score import contains_exact
from kvlife.bench.tasks.base import Sample, Task, Turn, register

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "orange",
              "melon", "apricot", "kiwi", "lime", "papaya", "fig", "coconut", "pineapple", "raspberry",
              "strawberry"],
    "animal": ["lion", "tiger", "zebra", "giraffe", "elephant", "wolf", "fox", "bear", "rabbit", "deer",
               "monkey", "kangaroo", "camel", "horse", "donkey", "squirrel", "otter", "badger", "leopard",
               "moose"],
    "tool": ["hammer", "screwdriver", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "rake", "axe",
             "file", "spanner", "crowbar", "trowel", "sander", "mallet", "level", "clamp", "awl", "plane"],
    "vehicle": ["car", "bus", "truck", "bicycle", "motorcycle", "train", "tram", "van", "scooter", "tractor",
                "taxi", "ambulance", "lorry", "jeep", "minibus", "limousine", "wagon", "sedan", "coach",
                "moped"],
    "colour": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "grey",
               "violet", "indigo", "turquoise", "magenta", "beige", "maroon", "crimson", "navy", "olive",
               "teal"],
    "instrument": ["piano", "violin", "guitar", "flute", "drum", "trumpet", "cello", "harp", "saxophone",
                   "clarinet", "oboe", "banjo", "tuba", "trombone", "ukulele", "accordion", "harmonica",
                   "xylophone", "mandolin", "bagpipes"],
    "body part": ["hand", "foot", "elbow", "knee", "shoulder", "ankle", "wrist", "finger", "nose", "ear",
                  "chin", "forehead", "neck", "thumb", "toe", "cheek", "hip", "heel", "eyebrow", "lip"],
    "furniture": ["chair", "table", "sofa", "bed", "wardrobe", "desk", "bookcase", "stool", "bench",
                  "dresser", "cupboard", "armchair", "cabinet", "couch", "shelf", "ottoman", "crib",
                  "sideboard", "hammock", "futon"],
}
LABELS = ["orbit", "candle", "velvet", "meadow", "quartz", "ripple", "lantern", "thistle", "marble", "falcon",
          "cobalt", "ember"]


@register
class ManyShot(Task):
    name = "many_shot"
    group = "global information"
    scbench_config = "scbench_many_shot"
    scbench_instruction = " Answer with the label only."
    scbench_max_new_tokens = 16
    description = "Learn an arbitrary category-to-label mapping from ~100+ examples and label new items."
    differs_from_scbench = "generated label-mapping classification instead of real datasets"
    profiles = {
        "default": {"samples": 8, "categories": 4, "examples": 120, "turns": 4, "held_out": 0},
        "scbench": {"samples": 54, "categories": 8, "examples": 2400, "turns": 5, "held_out": 5},
    }

    def resize(self, settings, tokens):
        return {**settings, "examples": max(settings["turns"], tokens // 9)}  # about 9 tokens per example

    def make_sample(self, rng, index, categories, examples, turns, held_out):
        chosen = rng.sample(sorted(CATEGORIES), categories)
        labels = dict(zip(chosen, rng.sample(LABELS, categories)))
        seen, unseen = {}, []
        for category in chosen:
            items = list(CATEGORIES[category])
            rng.shuffle(items)
            unseen += [(item, category) for item in items[:held_out]]
            seen[category] = items[held_out:]
        lines, drawn = [], []
        for _ in range(examples):
            category = rng.choice(chosen)
            drawn.append(category)
            lines.append(f"Item: {rng.choice(seen[category])}\nLabel: {labels[category]}")
        context = ("Each item below is given a label. Learn how items are labelled from these examples.\n\n"
                   + "\n\n".join(lines))
        if not held_out:  # ask items the examples label
            unseen = sorted({(line.split("\n")[0][6:], category) for line, category in zip(lines, drawn)})
        asked = rng.sample(unseen, min(turns, len(unseen)))
        # asked by name, as a question about the examples: "Item: X / What is its label?" made the
        # default model repeat the item (0 of 4 on turn 1); this form, 5 of 8 (benchmarks/results/tasks.json)
        verb = "do" if not held_out else "would"
        turn_list = [Turn(f"Which label {verb} the examples above give to the item \"{item}\"? "
                          "Answer with the label only.", labels[category]) for item, category in asked]
        return Sample(f"many_shot-{index}", self.name, context, turn_list, max_new_tokens=6)

    def score(self, prediction: str, reference: str) -> float:
        return contains_exact(prediction, reference)
