"""Load-stage methods (quest, retrieval_attention): full budgets give dense's logits, and the pieces
are exact (page bounds, log-sum-exp merge, index search). The generic tests of every load method
(answers equal dense's, rollback) are in test_stage_matrix.py."""

from __future__ import annotations

import random

import pytest
import torch

from kvlife.attention import AttnCall, dense_attention, reference_attention
from kvlife.methods.load.ivf import AttentionIVF, query_metric
from kvlife.methods.load.parts import merge_parts, slot_attention
from kvlife.methods.load.quest import PageBounds, Quest, page_bounds
from kvlife.session import Session
from tiny import ByteTokenizer, tiny_model

KINDS = ["llama", "qwen2", "gemma3"]
CONTEXT = " ".join("".join(random.Random(seed).choices("abcdefghij", k=4)) for seed in range(60))
QUERIES = ["abc?", "jihgf?"]
FULL = {
    "quest": "quest(budget=100000)",
    "retrieval_attention": "retrieval_attention(n_sink=4,window=16,top_k=100000)",
}
SPARSE = {
    "quest": "quest(budget=32,page_size=8)",
    "retrieval_attention": "retrieval_attention(n_sink=4,window=16,top_k=24)",
}


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_model(kind) for kind in KINDS}


def session(model, recipe, mode="multi-request") -> Session:
    return Session(model, ByteTokenizer(), recipe, mode=mode, prompt_format="plain")


def answers(sess: Session, queries: list[str]) -> list[tuple[list[int], float]]:
    sess.prefill(CONTEXT)
    return [(r.output_ids, r.reference_nll) for r in
            (sess.ask(q, max_new_tokens=5, reference="abcd efg") for q in queries)]


def test_full_budget_logits_match_dense(models):
    model = models["qwen2"]
    logits = {}
    for spec in (None, *FULL.values()):
        sess = session(model, spec)
        sess.prefill(CONTEXT)
        logits[spec] = sess.forward([ord(c) for c in "abc def"], phase="decode", all_logits=True)
    torch.testing.assert_close(logits[FULL["quest"]], logits[None], atol=0, rtol=0)
    torch.testing.assert_close(logits[FULL["retrieval_attention"]], logits[None], atol=1e-5, rtol=1e-5)


def test_sparse_settings_attend_to_fewer_tokens(models):
    for name, spec in SPARSE.items():
        sess = session(models["qwen2"], spec)
        sess.prefill(CONTEXT)
        sess.forward([ord("x")], phase="decode")
        load = sess.last_stats["load"]
        tokens = sess.cache.layers[-1].get_seq_length()
        assert load["sparse_layers"] >= 2
        assert load["attended_tokens"] < 0.7 * tokens * 2 * len(sess.cache.layers), name
        split = sess.recipe.load.byte_split(sess.cache)
        assert split["offloaded_bytes"] > 0
        assert split["working_bytes"] + split["offloaded_bytes"] >= sess.cache.bytes()


# ---- quest pieces ------------------------------------------------------------------------------


def random_call(q_len=1, k_len=70, heads=4, kv_heads=2, dim=8, seed=0) -> AttnCall:
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, heads, q_len, dim, generator=gen)
    key = torch.randn(1, kv_heads, k_len, dim, generator=gen)
    value = torch.randn(1, kv_heads, k_len, dim, generator=gen)
    k_pos = torch.arange(k_len).expand(kv_heads, k_len)
    return AttnCall(3, query, key, value, torch.arange(k_len - q_len, k_len), k_pos, dim**-0.5)


def test_page_bounds_are_incremental_and_reset_on_rollback(models):
    sess = session(models["qwen2"], "quest(budget=16,page_size=8)")
    sess.prefill(CONTEXT)
    method = sess.recipe.load
    checkpoint = sess.cache.checkpoint()
    for token in "abcdefghijkl":
        sess.forward([ord(token)], phase="decode")
    sess.cache.rollback(checkpoint)
    sess.forward([ord(c) for c in "zz"], phase="extend")
    sess.forward([ord("q")], phase="decode")
    for index in (2, 3):
        keys = sess.cache.layers[index].keys[0]
        mins, maxs = page_bounds(keys, 8)
        state = method._bounds[index]
        assert state.tokens == keys.shape[1]
        assert torch.equal(state.mins, mins) and torch.equal(state.maxs, maxs)


def test_page_bound_is_an_upper_bound_and_finds_the_planted_page():
    call = random_call(k_len=64)
    call.key[0, :, 40] = call.query[0, ::2, 0] * 10  # page 5 (slots 40..47) holds each group's match
    mins, maxs = page_bounds(call.key[0], 8)
    pages = Quest(budget=16, page_size=8).select_pages(call, PageBounds(call.key, 64, mins, maxs))
    assert pages.shape == (2, 1, 2)  # per KV head and query row: 16 // 8 pages
    assert [sorted(row) for row in pages[:, 0].tolist()] == [[5, 7], [5, 7]]  # 7: the query's own page
    query, keys = call.query[0], call.key[0].repeat_interleave(2, 0)
    upper = query.clamp(min=0) @ maxs.repeat_interleave(2, 0).transpose(1, 2) + \
        query.clamp(max=0) @ mins.repeat_interleave(2, 0).transpose(1, 2)
    exact = (query @ keys.transpose(1, 2)).reshape(4, 1, 8, 8).amax(-1)
    assert bool((upper >= exact - 1e-5).all())


def test_gathered_pages_equal_masked_attention():
    call = random_call(k_len=67)
    method = Quest(budget=24, page_size=8)
    mins, maxs = page_bounds(call.key[0], 8)
    bounds = PageBounds(call.key, 67, mins, maxs)
    pages = method.select_pages(call, bounds)
    got = method._gathered(call, pages[:, 0])
    want = reference_attention(call, method._slot_mask(pages, bounds))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- retrieval_attention pieces --------------------------------------------------------------------


@pytest.mark.parametrize("q_len", [1, 5])
def test_lse_merge_of_disjoint_parts_equals_dense(q_len):
    call = random_call(q_len=q_len, k_len=90, seed=3)
    order = torch.randperm(90, generator=torch.Generator().manual_seed(0))
    parts = [slot_attention(call, slots.sort().values) for slots in (order[:7], order[7:50], order[50:])]
    torch.testing.assert_close(merge_parts(parts)[None], dense_attention(call), atol=1e-5, rtol=1e-5)


def test_index_returns_the_planted_top_k():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3000, 16, generator=gen)
    queries = torch.randn(500, 16, generator=gen) + 2.0  # queries sit away from the keys (shifted)
    planted = torch.tensor([5, 77, 901, 1500, 2999])
    probe = queries[0]
    keys[planted] = probe * torch.tensor([4.0, 4.5, 5.0, 5.5, 6.0])[:, None]
    index = AttentionIVF(keys, queries, nlist=32, scan=0.25)
    scores, ids = index.search(probe[None], 5)
    assert sorted(ids[0].tolist()) == planted.tolist()
    torch.testing.assert_close(scores[0], (keys[ids[0]] @ probe), atol=1e-4, rtol=1e-5)
    full = AttentionIVF(keys, queries, nlist=32, scan=1.0)  # every list: the exact top-k
    scores, ids = full.search(queries[:20], 50)
    want = (queries[:20] @ keys.T).topk(50).indices
    assert all(set(a) == set(b) for a, b in zip(ids.tolist(), want.tolist()))


def test_query_metric_measures_keys_as_queries_see_them():
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(500, 8, generator=gen) * torch.linspace(0.1, 3.0, 8)
    half = query_metric(queries)
    diff = torch.randn(8, generator=gen)
    expected = ((queries @ diff) ** 2).mean()  # the mean squared score error of a key off by diff
    torch.testing.assert_close((diff @ half).square().sum(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("partition", ["queries", "keys"])
def test_more_lists_probed_never_lower_recall(partition):
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(2000, 16, generator=gen)
    queries = torch.randn(600, 16, generator=gen) + 1.5
    want = (queries[:50] @ keys.T).topk(64).indices
    recalls = []
    for scan in (0.1, 0.3, 1.0):
        index = AttentionIVF(keys, queries[50:] if partition == "queries" else None, nlist=32, scan=scan)
        _, ids = index.search(queries[:50], 64)
        recalls.append(sum(len(set(a) & set(b)) for a, b in zip(ids.tolist(), want.tolist())) / want.numel())
    assert recalls[0] <= recalls[1] <= recalls[2] == 1.0


def test_observe_sees_prefill_and_extend_only(models):
    sess = session(models["qwen2"], SPARSE["retrieval_attention"])
    sess.prefill(CONTEXT)
    method = sess.recipe.load
    assert set(method._layers) == {0, 1, 2, 3}
    state = method._layers[2]
    assert state.context_tokens == len(sess.context_ids) and state.heads is None
    assert state.queries.shape[0] == 2
    sess.ask(QUERIES[0], max_new_tokens=3)
    assert state.heads is not None and len(state.heads) == 2  # built at the first decode step
    sess.ask(QUERIES[1], max_new_tokens=3)
    assert method._layers[2] is state  # the rollback kept the context: the same index serves
