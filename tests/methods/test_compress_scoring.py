"""Method-specific tests of the score-based compress methods: snapkv, pyramidkv, h2o, tova, adakv."""

from __future__ import annotations

import pytest
import torch

from kvlife.attention import AttnCall, StepContext, dense_attention
from kvlife.cache import KVCache, KVLayer
from kvlife.methods.compress.adakv import PAD_POSITION, AdaKV, HeadwiseLayer
from kvlife.methods.compress.h2o import H2O
from kvlife.methods.compress.pyramidkv import PyramidKV, pyramid_budgets
from kvlife.methods.compress.snapkv import SnapKV, attention_mass
from kvlife.methods.compress.tova import TOVA
from kvlife.session import Session
from tiny import ByteTokenizer, tiny_model

KV_HEADS, GROUPS, HEAD_DIM, N = 2, 2, 16, 120


def make_call(keys: torch.Tensor, queries: torch.Tensor) -> tuple[AttnCall, KVCache]:
    """A layer call whose queries [q_heads, q_len, d] are the newest q_len of keys [kv_heads, n, d]."""
    n, q_len = keys.shape[1], queries.shape[1]
    values = torch.randn(keys.shape, generator=torch.Generator().manual_seed(1))
    cache = KVCache([None])
    layer = cache.layers[0]
    layer.update(keys[None, :, : n - q_len], values[None, :, : n - q_len])
    key, value = layer.update(keys[None, :, n - q_len:], values[None, :, n - q_len:])
    q_pos = torch.arange(n - q_len, n)
    step = StepContext(cache, q_pos, compress=True)
    return AttnCall(0, queries[None], key, value, q_pos, layer.attn_positions, 1.0, step=step), cache


def planted(window: int, plant: int, seed: int = 0, q_rows: int | None = None):
    """Keys with one token (`plant`) that every query of the last `q_rows` rows attends to strongly."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(HEAD_DIM, generator=gen)
    direction = direction / direction.norm()
    keys = 0.3 * torch.randn(KV_HEADS, N, HEAD_DIM, generator=gen)
    keys[:, plant] = 4 * direction
    rows = q_rows or window
    queries = 4 * direction + 0.1 * torch.randn(KV_HEADS * GROUPS, rows, HEAD_DIM, generator=gen)
    return keys, queries


def kept(cache: KVCache) -> list[set[int]]:
    positions = cache.layers[0].positions
    return [{int(p) for p in row if p != PAD_POSITION} for row in positions]


# ---- snapkv ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_keeps_planted_token_and_window(pooling):
    window, plant = 8, 40
    call, cache = make_call(*planted(window, plant))
    # Pooling spreads the planted score over its kernel: a budget of window + kernel keeps it all.
    SnapKV(budget=window + 5, window_size=window, pooling=pooling).compress_layer(call, cache.layers[0])
    for head in kept(cache):
        assert plant in head
        assert set(range(N - window, N)) <= head
        assert len(head) == window + 5


def test_snapkv_without_pooling_keeps_exactly_planted_plus_window():
    window, plant = 8, 70
    call, cache = make_call(*planted(window, plant))
    SnapKV(budget=window + 1, window_size=window, kernel_size=1).compress_layer(call, cache.layers[0])
    assert kept(cache) == [{plant, *range(N - window, N)}] * KV_HEADS


def test_snapkv_budget_below_window_keeps_newest():
    call, cache = make_call(*planted(8, 40))
    SnapKV(budget=3, window_size=8).compress_layer(call, cache.layers[0])
    assert kept(cache) == [{N - 3, N - 2, N - 1}] * KV_HEADS


def test_attention_mass_matches_softmax_and_is_chunk_invariant():
    keys, queries = planted(8, 40, q_rows=20)
    call, cache = make_call(keys, queries)
    layer = cache.layers[0]
    whole = attention_mass(call, layer, slice(None), chunk_rows=512)
    chunked = attention_mass(call, layer, slice(None), chunk_rows=3)
    assert torch.allclose(whole, chunked, atol=1e-5)
    # Reference: causal softmax per query head over its KV head's keys.
    expanded = keys.repeat_interleave(GROUPS, dim=0)
    scores = queries @ expanded.transpose(-1, -2)
    causal = torch.arange(N)[None, :] <= call.q_pos[:, None]
    want = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).sum(dim=1)
    assert torch.allclose(whole, want, atol=1e-5)


# ---- pyramidkv ---------------------------------------------------------------------------------


def test_pyramid_budgets_decrease_and_sum_exactly():
    for average in range(1, 120, 7):
        for n_layers in range(1, 7):
            for beta in (1, 2, 20):
                budgets = pyramid_budgets(average, 8, n_layers, beta)
                if budgets is None:
                    assert n_layers == 1 or average <= 8
                    continue
                assert sum(budgets) == n_layers * average
                assert all(a >= b for a, b in zip(budgets, budgets[1:]))
                assert min(budgets) >= 8
    assert pyramid_budgets(50, 8, 4, 1) == [50] * 4
    budgets = pyramid_budgets(50, 8, 4, 20)
    assert budgets[0] > budgets[-1] and budgets[-1] == 8 + 42 // 20


def test_pyramidkv_layer_budgets_in_a_session():
    context = "abcdefghij " * 20
    for kind, ratio in (("qwen2", 0.25), ("gemma3", 0.25)):
        session = Session(tiny_model(kind), ByteTokenizer(), f"pyramidkv(ratio={ratio})",
                          mode="multi-request", prompt_format="plain")
        session.prefill(context)
        target = round(ratio * len(session.context_ids))
        held = [layer.get_seq_length() for layer in session.cache.layers if not layer.is_sliding]
        assert sum(held) == target * len(held)
        if len(held) > 1:
            assert all(a > b for a, b in zip(held, held[1:]))


def test_pyramidkv_falls_back_to_snapkv_when_the_pyramid_does_not_fit():
    window = 8
    keys, queries = planted(window, 40)
    budgets = []
    for ratio in (0.3, 0.9):
        cache = KVCache([None] * 3)
        for index in range(3):
            call, single = make_call(keys, queries)
            cache.layers[index] = single.layers[0]
            call.layer_idx, call.step.cache = index, cache
            PyramidKV(ratio=ratio, window_size=window).compress_layer(call, cache.layers[index])
        budgets.append(cache.tokens_held())
    assert budgets[0][0] > budgets[0][1] > budgets[0][2]
    assert budgets[1] == [round(0.9 * N)] * 3


# ---- h2o and tova ------------------------------------------------------------------------------


def test_h2o_keeps_heavy_hitter_and_recent_tokens():
    plant = 5
    keys, queries = planted(N, plant, q_rows=N)
    call, cache = make_call(keys, queries)
    H2O(budget=10, recent_ratio=0.5).compress_layer(call, cache.layers[0])
    for head in kept(cache):
        assert plant in head and set(range(N - 5, N)) <= head and len(head) == 10


def test_h2o_chunking_does_not_change_the_choice():
    keys, queries = planted(N, 50, seed=3, q_rows=N)
    choices = []
    for chunk_rows in (7, 512):
        call, cache = make_call(keys, queries)
        H2O(budget=20, chunk_rows=chunk_rows).compress_layer(call, cache.layers[0])
        choices.append(kept(cache))
    assert choices[0] == choices[1]


def test_tova_keeps_same_tokens_in_all_heads_unless_head_wise():
    gen = torch.Generator().manual_seed(0)
    keys = 0.3 * torch.randn(KV_HEADS, N, HEAD_DIM, generator=gen)
    keys[0, 30], keys[1, 60] = 4 * torch.eye(HEAD_DIM)[0], 4 * torch.eye(HEAD_DIM)[1]
    # Head group 0 looks for token 30's key, group 1 for token 60's.
    queries = torch.stack([4 * torch.eye(HEAD_DIM)[0]] * GROUPS
                          + [4 * torch.eye(HEAD_DIM)[1]] * GROUPS)[:, None]
    call, cache = make_call(keys, queries)
    TOVA(budget=3).compress_layer(call, cache.layers[0])
    shared = kept(cache)
    assert shared[0] == shared[1] and N - 1 in shared[0]
    call, cache = make_call(keys, queries)
    TOVA(budget=2, head_wise=True).compress_layer(call, cache.layers[0])
    assert kept(cache) == [{30, N - 1}, {60, N - 1}]


# ---- adakv -------------------------------------------------------------------------------------


def uneven(window: int = 4):
    """Head 0's window queries focus on 3 tokens; head 1's attend almost uniformly."""
    gen = torch.Generator().manual_seed(0)
    keys = 0.3 * torch.randn(KV_HEADS, N, HEAD_DIM, generator=gen)
    for token in (10, 50, 90):
        keys[0, token] = 5 * torch.eye(HEAD_DIM)[0]
    queries = torch.zeros(KV_HEADS * GROUPS, window, HEAD_DIM)
    queries[:GROUPS] = 4 * torch.eye(HEAD_DIM)[0]
    queries[GROUPS:] = 0.01 * torch.randn(GROUPS, window, HEAD_DIM, generator=gen)
    return keys, queries


def test_adakv_spreads_one_budget_over_uneven_heads():
    budget = 20
    call, cache = make_call(*uneven())
    AdaKV(budget=budget, window_size=4).compress_layer(call, cache.layers[0])
    layer = cache.layers[0]
    assert isinstance(layer, HeadwiseLayer)
    counts = [len(head) for head in kept(cache)]
    assert sum(counts) == KV_HEADS * budget
    assert counts[0] < budget < counts[1]
    assert {10, 50, 90} <= kept(cache)[0]
    assert layer.positions.shape[1] == max(counts)
    per_token = HEAD_DIM * 4 * 2
    assert layer.nbytes() == sum(counts) * per_token == cache.bytes()
    for head, count in enumerate(counts):  # real tokens first and sorted, padding after
        row = layer.positions[head]
        assert bool((row[:count][1:] > row[:count][:-1]).all()) and bool((row[count:] == PAD_POSITION).all())


def test_adakv_full_safeguard_is_uniform_snapkv():
    keys, queries = uneven()
    call, cache = make_call(keys, queries)
    AdaKV(budget=20, window_size=4, alpha=1.0).compress_layer(call, cache.layers[0])
    call, reference = make_call(keys, queries)
    SnapKV(budget=20, window_size=4).compress_layer(call, reference.layers[0])
    assert kept(cache) == kept(reference)


def test_adakv_padding_is_invisible_to_attention():
    call, cache = make_call(*uneven())
    AdaKV(budget=20, window_size=4).compress_layer(call, cache.layers[0])
    layer = cache.layers[0]
    new_key = torch.randn(1, KV_HEADS, 1, HEAD_DIM)
    keys, values = layer.update(new_key, new_key)
    query = torch.randn(1, KV_HEADS * GROUPS, 1, HEAD_DIM)
    q_pos = torch.tensor([N])
    out = dense_attention(AttnCall(0, query, keys, values, q_pos, layer.attn_positions, 0.25))
    for head in range(KV_HEADS):
        real = layer.attn_positions[head] != PAD_POSITION
        k, v = keys[:, head:head + 1, real], values[:, head:head + 1, real]
        heads = slice(head * GROUPS, (head + 1) * GROUPS)
        want = torch.softmax(query[:, heads] @ k.transpose(-1, -2) * 0.25, dim=-1) @ v
        assert torch.allclose(out[:, heads], want, atol=1e-5)


def test_adakv_leaves_layer_alone_at_full_budget_and_rolls_back():
    call, cache = make_call(*uneven())
    AdaKV(budget=N).compress_layer(call, cache.layers[0])
    assert type(cache.layers[0]) is KVLayer
    state = cache.checkpoint()
    before = cache.layers[0].keys
    AdaKV(budget=10).compress_layer(call, cache.layers[0])
    assert isinstance(cache.layers[0], HeadwiseLayer)
    cache.rollback(state)
    assert type(cache.layers[0]) is KVLayer and cache.layers[0].keys is before


@pytest.mark.parametrize("scorer", ["pyramidkv", "h2o"])
def test_adakv_with_other_scorers(scorer):
    session = Session(tiny_model("qwen2"), ByteTokenizer(), f"adakv(ratio=0.25,scorer={scorer})",
                      mode="multi-request", prompt_format="plain")
    session.prefill("abcdefghij " * 20)
    target = round(0.25 * len(session.context_ids))
    real = [int((layer.positions != PAD_POSITION).sum()) for layer in session.cache.layers]
    assert sum(real) == target * KV_HEADS * len(real)
    if scorer == "pyramidkv":
        assert all(a > b for a, b in zip(real, real[1:]))
    else:
        assert real == [target * KV_HEADS] * len(real)
