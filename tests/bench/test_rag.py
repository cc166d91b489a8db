"""The rag task: deterministic, its segments cut the context at document boundaries, and samples share
documents at different positions (what per-document caches reuse and prefix caches cannot)."""

from collections import Counter

from kvlife.bench.tasks import TASKS, get_task


def test_rag_is_registered_with_a_long_profile():
    assert "rag" in TASKS
    task = get_task("rag")
    assert task.settings("long")["docs"] == 8 and task.settings("long")["doc_tokens"] == 1024
    assert task.settings("default", 4096)["docs"] == 8 and task.settings("default", 4096)["doc_tokens"] == 512


def test_samples_are_deterministic_per_seed():
    task = get_task("rag")
    first, again, other = task.samples(seed=0), task.samples(seed=0), task.samples(seed=1)
    assert [s.context for s in first] == [s.context for s in again]
    assert [s.context for s in first] != [s.context for s in other]
    assert task.samples(n=3)[2].context == first[2].context  # sample i does not depend on n


def test_segments_cut_the_context_and_documents_recur_at_other_positions():
    samples = get_task("rag").samples("default", 8)
    positions: dict[str, set[int]] = {}
    for sample in samples:
        segments = sample.meta["segments"]
        assert "".join(segments) == sample.context and len(segments) == 5
        assert all(segment.startswith("\n\nDocument ") for segment in segments[1:])
        for place, (name, text) in enumerate(zip(sample.meta["documents"], segments[1:])):
            positions.setdefault(name, set()).add(place)
            # a document is the same text in every sample
            assert text == next(s for other in samples
                                for n, s in zip(other.meta["documents"], other.meta["segments"][1:])
                                if n == name)
    counts = Counter(name for sample in samples for name in sample.meta["documents"])
    assert max(counts.values()) >= 3 and any(len(places) >= 2 for places in positions.values())


def test_answers_are_in_the_documents_they_name():
    task = get_task("rag")
    for sample in task.samples("default", 8):
        single, pair = sample.turns
        assert single.answer in sample.context
        for item in pair.answer.split(", "):
            assert item in sample.context
        assert task.score(f"It was {single.answer}.", single.answer) == 1.0
        assert task.score(pair.answer.split(", ")[0], pair.answer) == 0.5
