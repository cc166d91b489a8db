"""Generic tests run over every registered compress-stage method (a new one is tested on registration).

Eviction methods (those with a `ratio` parameter) must reproduce dense exactly at a budget >= the
context; quantizers (no budget) must stay within a bounded error. Every method: per-KV-head
storage, original positions, bytes that shrink as requested, decoding at the true next position,
and multi-request rollback to the exact context cache.
"""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch

from kvlife.cache import KVLayer
from kvlife.methods import registry
from kvlife.session import Session
from tiny import ByteTokenizer, tiny_model

COMPRESS = sorted(name for name, cls in registry.METHODS.items() if cls.stage == "compress")
# lfm2: a hybrid (conv layers with recurrent state, attention layers)
KINDS = ["llama", "qwen2", "gemma3", "lfm2"]
CONTEXT = " ".join("".join(random.Random(seed).choices("abcdefghij", k=4)) for seed in range(40))
QUERIES = ["abc?", "jihgf?"]
RATIO = 0.25
INVISIBLE = 1 << 40  # a slot at a larger position is padding no query can see


def evicts(name: str) -> bool:
    return "ratio" in {item.name for item in dataclasses.fields(registry.get(name))}


def needs_split(name: str) -> bool:
    """Methods that read an offline per-model file (duo_attention's head split)."""
    return name == "duo_attention"


@pytest.fixture(scope="module")
def splits(models, tmp_path_factory):
    """A head split per tiny model, found by the real `kvlife search-heads` search (small settings)."""
    from kvlife.methods.compress import head_split
    from kvlife.methods.compress.duo_search import HeadSearch, search

    folder = tmp_path_factory.mktemp("splits")
    settings = HeadSearch(samples=1, tokens=150, passkeys=2, queries=1, n_sink=4, n_local=16)
    for kind, model in models.items():
        found = search(model, ByteTokenizer(), kind, settings, log=lambda _: None)
        head_split.write(folder / f"{kind}.json", found)
    return folder


@pytest.fixture(scope="module")
def spec(splits):
    """spec(name, kind, full=False): the method at RATIO (or a budget above any context)."""
    def build(name: str, kind: str, full: bool = False) -> str:
        if not evicts(name):
            return name
        args = [f"config={splits / kind}.json"] if needs_split(name) else []
        args.append("budget=100000" if full else f"ratio={RATIO}")
        return f"{name}({','.join(args)})"
    return build


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_model(kind) for kind in KINDS}


def session(model, recipe, mode="multi-request", **kwargs) -> Session:
    return Session(model, ByteTokenizer(), recipe, mode=mode, prompt_format="plain", **kwargs)


def snapshot(cache):
    """Every layer's content; a recurrent layer's (hybrid models) is its state, which no method may change."""
    return [(type(layer), layer.next_position, layer.nbytes(), *layer.dense_kv(), layer.positions)
            if isinstance(layer, KVLayer) else (type(layer), layer.tokens_seen, layer.nbytes(),
                                                 *(tensor for _, tensor in layer.state_tensors()))
            for layer in cache.layers]


def assert_same(a, b):
    assert len(a) == len(b)
    for left, right in zip(a, b):
        assert left[:3] == right[:3]
        for x, y in zip(left[3:], right[3:]):
            assert torch.equal(x, y)


def full_layers(cache):
    return [index for index, layer in cache.kv_layers() if not layer.is_sliding]


def token_bytes(layer) -> int:
    """Bytes of one token in one KV head."""
    keys, values = layer.dense_kv()
    return keys.shape[0] * keys.shape[-1] * (keys.element_size() + values.element_size())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", COMPRESS)
def test_full_budget_matches_dense(models, spec, name, kind):
    model = models[kind]
    for mode in ("multi-request", "multi-turn"):
        dense, method = session(model, None, mode), session(model, spec(name, kind, full=True), mode)
        dense.prefill(CONTEXT)
        method.prefill(CONTEXT)
        for query in QUERIES:
            want = dense.ask(query, max_new_tokens=6, reference="abcd efg")
            got = method.ask(query, max_new_tokens=6, reference="abcd efg")
            if evicts(name):
                assert got.output_ids == want.output_ids
                assert got.reference_nll == want.reference_nll
                assert got.cache_bytes == want.cache_bytes
            else:  # a quantizer is lossy at any setting: bounded, not exact
                assert abs(got.reference_nll - want.reference_nll) < 0.1 * want.reference_nll
                assert got.cache_bytes < want.cache_bytes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", COMPRESS)
def test_storage_positions_and_keys(models, spec, name, kind):
    model = models[kind]
    dense, method = session(model, None), session(model, spec(name, kind))
    dense.prefill(CONTEXT)
    method.prefill(CONTEXT)
    n_ctx = len(method.context_ids)
    config = model.config
    for want, layer in zip(dense.cache.layers, method.cache.layers):
        if not isinstance(layer, KVLayer):  # a recurrent layer: its state is exactly the dense prefill's
            assert_same(snapshot(SimpleNamespace(layers=[layer])), snapshot(SimpleNamespace(layers=[want])))
            continue
        keys, values = layer.dense_kv()
        positions = layer.positions
        assert keys.shape[:2] == values.shape[:2] == (1, config.num_key_value_heads)
        assert positions.shape == (config.num_key_value_heads, keys.shape[2])
        assert layer.next_position == n_ctx
        want_keys, want_values = want.dense_kv()
        if layer.is_sliding:  # sliding layers are never compressed
            assert torch.equal(keys, want_keys) and torch.equal(positions, want.positions)
            continue
        for head in range(positions.shape[0]):
            real = positions[head] < INVISIBLE
            row = positions[head][real]
            assert bool((row[1:] > row[:-1]).all()), "kept positions sorted, no duplicates"
            assert int(row.min()) >= 0 and int(row.max()) < n_ctx
            # A kept token keeps its original position: its (RoPE'd) key is the dense one there.
            got_k, got_v = keys[0, head][real], values[0, head][real]
            if evicts(name):
                assert torch.equal(got_k, want_keys[0, head, row])
                assert torch.equal(got_v, want_values[0, head, row])
            else:
                assert torch.equal(row, want.positions[head])
                scale = want_keys[0, head].abs().max()
                assert (got_k - want_keys[0, head, row]).abs().max() < 0.5 * scale


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", COMPRESS)
def test_bytes_shrink(models, spec, name, kind):
    model = models[kind]
    dense, method = session(model, None), session(model, spec(name, kind))
    dense_result, result = dense.prefill(CONTEXT), method.prefill(CONTEXT)
    assert result.cache_bytes == method.cache.bytes()
    n_ctx = len(method.context_ids)
    full = full_layers(method.cache)
    got = sum(method.cache.layers[i].nbytes() for i in full)
    dense_full = sum(dense.cache.layers[i].nbytes() for i in full)
    if evicts(name):
        per_token = token_bytes(dense.cache.layers[full[0]]) * model.config.num_key_value_heads
        assert got == len(full) * round(RATIO * n_ctx) * per_token
    else:
        assert got < 0.4 * dense_full
    sliding = [i for i in range(len(method.cache.layers)) if i not in full]
    assert sum(method.cache.layers[i].nbytes() for i in sliding) == dense_result.cache_bytes - dense_full


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", COMPRESS)
def test_decoding_continues_at_true_position(models, spec, name, kind):
    model = models[kind]
    dense, method = session(model, None), session(model, spec(name, kind))
    dense.prefill(CONTEXT)
    method.prefill(CONTEXT)
    n_ctx = len(method.context_ids)
    assert method.cache.next_position == n_ctx
    for each in (dense, method):
        each.forward([ord("x")], phase="decode")
    for _, layer in method.cache.kv_layers():
        assert layer.next_position == n_ctx + 1
        assert bool((layer.attn_positions[:, -1] == n_ctx).all())
    # The first attention layer's new key depends only on the token and its RoPE position, not on the cache
    # (on a hybrid, recurrent layers before it see no cache either: their state is not compressed).
    first = method.cache.kv_layers()[0][0]
    got, want = method.cache.layers[first].dense_kv()[0], dense.cache.layers[first].dense_kv()[0]
    assert torch.allclose(got[:, :, -1], want[:, :, -1], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", COMPRESS)
def test_multi_request_rollback_is_exact(models, spec, name, kind):
    method = session(models[kind], spec(name, kind))
    method.prefill(CONTEXT)
    context = snapshot(method.cache)
    for query in QUERIES:
        method.ask(query, max_new_tokens=5, reference="abc")
        assert_same(snapshot(method.cache), context)


@pytest.mark.parametrize("name", COMPRESS)
def test_multi_turn_with_recompress(models, spec, name):
    method = session(models["qwen2"], spec(name, "qwen2"), mode="multi-turn", recompress=True)
    method.prefill(CONTEXT)
    fed = 0
    for query in QUERIES * 2:
        result = method.ask(query, max_new_tokens=4, reference="abc")
        fed += result.prompt_tokens
        assert method.cache.next_position == fed
        for layer in method.cache.layers:
            real = layer.positions[layer.positions < INVISIBLE]
            assert int(real.max()) < fed
        if evicts(name):
            assert result.cache_tokens <= 1.25 * RATIO * fed + 64
