"""Generic tests over every registered load-stage and prompt-stage method (compress and prefill
have their own matrices): a new method is tested once registered, and fails here until it has a
row in KEEP_ALL (settings that keep every token) and SPARSE (settings that drop some)."""

from __future__ import annotations

import random

import pytest

from kvlife.methods import registry
from kvlife.session import Session
from tiny import ByteTokenizer, tiny_model

STAGES = ("load", "prompt")
NAMES = sorted(name for name, cls in registry.METHODS.items() if cls.stage in STAGES)
KEEP_ALL = {
    "quest": "quest(budget=100000)",
    "retrieval_attention": "retrieval_attention(n_sink=4,window=16,top_k=100000)",
    "lingua": "lingua(rate=1.0,chunk=64,overlap=8)",
}
SPARSE = {
    "quest": "quest(budget=32,page_size=8)",
    "retrieval_attention": "retrieval_attention(n_sink=4,window=16,top_k=24)",
    "lingua": "lingua(rate=0.5,chunk=64,overlap=8)",
}
KINDS = ["llama", "qwen2", "gemma3"]
CONTEXT = " ".join("".join(random.Random(seed).choices("abcdefghij", k=4)) for seed in range(60)) + "."
QUERIES = ["abc?", "jihgf?"]


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_model(kind) for kind in KINDS}


def answers(model, recipe: str | None, queries: list[str], mode: str = "multi-request"):
    sess = Session(model, ByteTokenizer(), recipe, mode=mode, prompt_format="plain")
    sess.prefill(CONTEXT)
    return [(r.output_ids, r.reference_nll) for r in
            (sess.ask(q, max_new_tokens=5, reference="abcd efg") for q in queries)]


def test_every_load_and_prompt_method_has_its_rows():
    assert NAMES and sorted(KEEP_ALL) == NAMES and sorted(SPARSE) == NAMES


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_keeping_every_token_matches_dense(models, name, kind):
    for mode in ("multi-request", "multi-turn"):
        want = answers(models[kind], None, QUERIES, mode)
        got = answers(models[kind], KEEP_ALL[name], QUERIES, mode)
        for (want_ids, want_nll), (got_ids, got_nll) in zip(want, got):
            assert got_ids == want_ids
            assert got_nll == pytest.approx(want_nll, abs=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
@pytest.mark.parametrize("name", NAMES)
def test_rollback_keeps_results_identical(models, name, kind):
    """Repeated queries on one multi-request session give what a fresh session gives: state built
    for one answer (page bounds, indexes, a compressed prompt) never leaks into the next."""
    model = models[kind]
    reused = answers(model, SPARSE[name], QUERIES + QUERIES[::-1])
    for index, query in enumerate(QUERIES + QUERIES[::-1]):
        assert reused[index] == answers(model, SPARSE[name], [query])[0]
    assert reused[0] == reused[3] and reused[1] == reused[2]


@pytest.mark.parametrize("name", NAMES)
def test_defaults_parse_and_describe(name):
    method = registry.get(name)()
    assert method.stage in STAGES and method.spec().startswith(name)
    assert registry.get(name).describe()["paper"]
