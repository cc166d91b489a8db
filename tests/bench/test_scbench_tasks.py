"""The eight SCBench tasks added to the foundation's four: generators, scorers, sizes."""

import random

import pytest

from kvlife.bench import score
from kvlife.bench.tasks import TASKS, get_task
from kvlife.bench.tasks import code as stdlib_code

NEW_TASKS = ["repoqa", "qa_eng", "choice_eng", "qa_chn", "many_shot", "summary", "summary_with_needles",
             "repoqa_and_kv"]


def test_all_twelve_scbench_tasks_are_registered():
    twelve = set(NEW_TASKS) | {"kv", "prefix_suffix", "multihop", "math_find"}
    assert twelve <= set(TASKS)  # and kvlife's own tasks beside them (rag: non-prefix reuse)
    groups = {get_task(name).group for name in twelve}
    assert groups == {"string retrieval", "semantic retrieval", "global information", "multi-tasking"}
    for name in twelve:
        task = get_task(name)
        assert {"default", "scbench"} <= set(task.profiles)
        module = __import__(type(task).__module__, fromlist=["_"])
        assert task.differs_from_scbench and "differs from SCBench" in module.__doc__


# ---- scorers -------------------------------------------------------------------------------------


def test_rouge_lsum_known_values():
    # values from the rouge-score package (rougeLsum / rougeL F-measure, no stemming)
    assert score.rouge_lsum("the cat sat on the mat.\nit was happy.",
                            "the cat was on the mat.\nthe cat was happy.") == pytest.approx(0.7368, abs=1e-4)
    assert score.rouge_lsum("one two three.\nfour five.", "five four.\nthree two one.") == pytest.approx(0.4)
    assert score.rouge_l("one two three four five", "five four three two one") == pytest.approx(0.2)
    assert score.rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    assert score.rouge_lsum("", "anything") == 0.0
    assert score.rouge_lsum("Exactly the same. Two sentences.", "Exactly the same. Two sentences.") == 1.0


def test_rouge_lsum_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed")
    scorer = rouge_scorer.RougeScorer(["rougeLsum"])
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat hill quickly".split()
    for _ in range(30):
        pred = "\n".join(" ".join(rng.choices(words, k=rng.randint(2, 8))) for _ in range(rng.randint(1, 3)))
        ref = "\n".join(" ".join(rng.choices(words, k=rng.randint(2, 8))) for _ in range(rng.randint(1, 3)))
        expected = scorer.score(ref, pred)["rougeLsum"].fmeasure
        assert score.rouge_lsum(pred, ref) == pytest.approx(expected, abs=1e-9)


def test_qa_choice_and_chinese_scores():
    assert score.qa_score("It was Brelmoor.", "Brelmoor") == 1.0
    assert score.qa_score("Edda", "Edda Holm") == pytest.approx(2 / 3)
    assert score.qa_score("no idea", "Brelmoor") == 0.0
    assert score.choice_score("B", "B) oboe") == 1.0
    assert score.choice_score("The answer is (B) oboe", "B) oboe") == 1.0
    assert score.choice_score("C) harp", "B) oboe") == 0.0
    assert score.choice_score("the oboe", "B) oboe") == 1.0
    assert score.zh_qa_score("他出生在青石镇。", "青石镇") == 1.0
    assert score.char_f1("1975", "1975年") == pytest.approx(2 * 1 * 0.8 / 1.8)
    assert score.zh_qa_score("不知道", "青石镇") == 0.0


def test_repoqa_score_needs_the_best_match_to_be_the_target():
    target = ("def scale(values, factor):\n    out = []\n    for v in values:\n"
              "        out.append(v * factor)\n    return out")
    near = target.replace("factor", "k")
    other = "def add(a, b):\n    total = a + b\n    return total"
    assert score.repoqa_score(f"```python\n{target}\n```", target, [target, other]) == 1.0
    assert score.repoqa_score(other, target, [target, other]) == 0.0
    # similar enough to the target but closer to another function of the repo: fails
    assert score.repoqa_score(near, target, [target, near]) == 0.0
    assert score.repoqa_score(target[: len(target) // 3], target, [target]) == 0.0
    assert score.code_similarity("x = 1  # set\ny = 2", "x=1\ny = 2") == 1.0


# ---- generators ----------------------------------------------------------------------------------


def test_repoqa_context_has_the_code_but_no_docstrings():
    task = get_task("repoqa")
    sample = task.samples("default", 1)[0]
    described = {f.code: f for f in stdlib_code.all_functions()}
    for turn in sample.turns:
        assert turn.answer in sample.context
        function = described[turn.answer]
        assert function.docstring.split("\n")[0].strip() not in sample.context
        assert f"def {function.name}(" not in turn.query
    assert '"""' not in sample.context


def test_choice_options_hold_the_answer_and_three_distractors():
    for sample in get_task("choice_eng").samples("default", 3):
        for turn in sample.turns:
            letter, _, text = turn.answer.partition(") ")
            options = [line[3:] for line in turn.query.splitlines() if line[:2] in ("A)", "B)", "C)", "D)")]
            assert len(set(options)) == 4 and options["ABCD".index(letter)] == text
            assert text in sample.context


def test_fact_answers_are_in_the_context():
    for name in ("qa_eng", "qa_chn", "summary_with_needles"):
        for sample in get_task(name).samples("default", 2):
            for turn in sample.turns:
                if name == "summary_with_needles" and not turn.answer.isdigit():
                    assert all(sentence in sample.context for sentence in turn.answer.split(". ")[:1])
                    continue
                assert turn.answer.rstrip("年") in sample.context


@pytest.mark.parametrize("held_out", [0, 5])
def test_many_shot_labels_follow_the_examples(held_out):
    task = get_task("many_shot")
    sample = task.make_sample(random.Random(1), 0, categories=4, examples=120, turns=4, held_out=held_out)
    assert sample.context.count("Label:") == 120
    for turn in sample.turns:
        item = turn.query.split('"')[1]
        assert (f"Item: {item}\n" in sample.context) == (held_out == 0)  # held out: never among the examples
        assert f"Label: {turn.answer}" in sample.context


def test_mixed_tasks_alternate_kinds():
    for name, is_second in (("summary_with_needles", str.isdigit),
                            ("repoqa_and_kv", lambda a: a.count("-") == 4)):
        sample = get_task(name).samples("default", 1)[0]
        kinds = [bool(is_second(turn.answer)) for turn in sample.turns]
        assert kinds == [i % 2 == 1 for i in range(len(kinds))]


def test_scbench_profiles_are_scbench_sized():
    expected = {"repoqa": (88, 5), "qa_eng": (69, 5), "choice_eng": (58, 5), "qa_chn": (35, 5),
                "many_shot": (54, 5), "summary": (70, 5), "summary_with_needles": (70, 8),
                "repoqa_and_kv": (88, 8)}
    for name, (samples, turns) in expected.items():
        profile = get_task(name).profiles["scbench"]
        assert profile["samples"] == samples and profile["turns"] == turns
    sample = get_task("many_shot").samples("scbench", 1)[0]
    assert sample.context.count("Label:") == 2400 and len(sample.turns) == 5


def test_qa_chn_generates_many_people():
    # 80 people outnumber the one-character pets' names: generation must not loop forever
    sample = get_task("qa_chn").make_sample(random.Random(0), 0, persons=80, turns=5, context_chars=20000)
    assert len(sample.turns) == 5 and all(turn.answer.rstrip("年") in sample.context for turn in sample.turns)


@pytest.mark.parametrize("name", ["kv", "prefix_suffix", "multihop", "math_find"])
def test_foundation_tasks_generate_their_scbench_profile(name):
    # math_find's scbench profile once asked for 20,000 distinct numbers out of 990 and could not generate
    sample = get_task(name).samples("scbench", n=1)[0]
    assert len(sample.context) > 100_000 and len(sample.turns) == 5
    assert all(turn.answer for turn in sample.turns)


def test_math_find_scbench_statistics_are_of_its_list():
    sample = get_task("math_find").samples("scbench", n=1)[0]
    listing = sample.context.split("The list of numbers is: ", 1)[1].split(".", 1)[0]
    values = [int(v) for v in listing.split(", ")]
    assert len(values) == 20_000 and len(set(values)) == 20_000
    expected = {"largest": max(values), "smallest": min(values), "first": values[0], "last": values[-1]}
    for turn in sample.turns:
        word = next(w for w in expected if f"the {w} number" in turn.query)
        assert turn.answer == str(expected[word])
