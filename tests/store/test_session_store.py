"""Session(store=): partial and full hits reproduce a full dense prefill; recipes that change the prefix skip
the store."""

import logging

import pytest
import torch

from kvlife.session import Session
from kvlife.store import open_store
from tiny import ByteTokenizer, tiny_model

CONTEXT = "the quick brown fox jumps over the lazy dog and keeps running far away. " * 3
OTHER_TAIL = "then it rests under a tall green tree by the river."


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


def session(model, store=None, spec="dense", mode="multi-request", **kwargs):
    return Session(model, ByteTokenizer(), spec, mode=mode, prompt_format="plain", store=store, **kwargs)


def query_logits(s: Session, query: str = "what jumps?") -> torch.Tensor:
    state = s.cache.checkpoint()
    logits = s.forward(s.format.query_ids(query), phase="extend")
    s.cache.rollback(state)
    return logits


@pytest.mark.parametrize("tiers", ["memory", "disk"])
def test_partial_hit_equals_full_prefill(model, tmp_path, tiers):
    store = open_store("memory" if tiers == "memory" else f"disk:{tmp_path}", chunk_size=16)
    first = session(model, store)
    first.prefill(CONTEXT)
    assert first.store.last["store_hit_tokens"] == 0 and first.store.last["store_put_bytes"] > 0
    shared = CONTEXT[:100] + OTHER_TAIL  # the first 100 bytes (6 whole chunks) are shared
    partial = session(model, store)
    partial.prefill(shared)
    assert partial.store.last["store_hit_tokens"] == 96
    fresh = session(model)
    fresh.prefill(shared)
    torch.testing.assert_close(query_logits(partial), query_logits(fresh), rtol=0, atol=1e-5)
    for (k1, v1, p1), (k2, v2, p2) in zip(partial.cache.to_tensors(), fresh.cache.to_tensors()):
        torch.testing.assert_close(k1, k2, rtol=0, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=0, atol=1e-5)
        assert torch.equal(p1, p2)
    answered = partial.ask("what jumps?", max_new_tokens=8).output_ids
    assert answered == fresh.ask("what jumps?", max_new_tokens=8).output_ids


def test_full_hit_multi_turn_answers_match(model):
    store = open_store("memory", chunk_size=16)
    answers = []
    for use_store in (store, store, None):
        s = session(model, use_store, mode="multi-turn")
        s.prefill(CONTEXT)
        first = s.ask("what jumps?", max_new_tokens=6, reference="fox")
        second = s.ask("who is lazy?", max_new_tokens=6)
        answers.append((first.output_ids, second.output_ids, first.stats.get("store_hit_tokens")))
    assert answers[0][:2] == answers[1][:2] == answers[2][:2]
    prompt_tokens = len(s.context_ids) + len(s.format.query_ids("what jumps?"))
    assert answers[0][2] == 0 and answers[1][2] == (prompt_tokens - 1) // 16 * 16


@pytest.mark.parametrize("encoding", ["int8", "kvlife:balanced"])
def test_codec_encoded_chunks(model, encoding):
    store = open_store("memory", encoding=encoding, chunk_size=16)
    session(model, store).prefill(CONTEXT)
    hit = session(model, store)
    hit.prefill(CONTEXT)
    assert hit.store.last["store_hit_tokens"] == (len(hit.context_ids) - 1) // 16 * 16
    fresh = session(model)
    fresh.prefill(CONTEXT)
    error = (query_logits(hit) - query_logits(fresh)).abs().max()
    assert 0 < error < 0.5  # lossy but close; a raw store of the same prefix would be exact
    raw = open_store("memory", chunk_size=16)
    session(model, raw).prefill(CONTEXT)
    assert store.counters["put_bytes"] < raw.counters["put_bytes"]


def test_recipes_that_change_the_prefix_do_not_use_the_store(model, caplog):
    """Multi-turn compression sees the first query: nothing is stored (multi-request compression is stored
    whole, tests/store/test_compressed_store.py)."""
    store = open_store("memory", chunk_size=16)
    spec = "streamingllm(n_sink=2,n_local=20)"
    with caplog.at_level(logging.INFO, logger="kvlife.store"):
        for _ in range(2):
            s = session(model, store, spec=spec, mode="multi-turn")
            s.prefill(CONTEXT)
            answer = s.ask("what jumps?", max_new_tokens=4).output_ids
            assert s.store.last == {"store_hit_tokens": 0, "store_skipped": s.store.last["store_skipped"]}
    assert store.counters["put_chunks"] == 0
    fresh = session(model, spec=spec, mode="multi-turn")
    fresh.prefill(CONTEXT)
    assert fresh.ask("what jumps?", max_new_tokens=4).output_ids == answer
    assert any("streamingllm" in r.message and "first query" in r.message for r in caplog.records)


def test_salts_do_not_share(model):
    store = open_store("memory", chunk_size=16)
    session(model, store, store_salt="tenant-a").prefill(CONTEXT)
    other = session(model, store, store_salt="tenant-b")
    other.prefill(CONTEXT)
    assert other.store.last["store_hit_tokens"] == 0


def test_other_model_does_not_hit(model):
    store = open_store("memory", chunk_size=16)
    session(model, store).prefill(CONTEXT)
    other = Session(tiny_model("qwen2", seed=1), ByteTokenizer(), "dense", mode="multi-request",
                    prompt_format="plain", store=store)
    other.prefill(CONTEXT)
    assert other.store.last["store_hit_tokens"] == 0


@pytest.mark.parametrize("mode", ["multi-request", "multi-turn"])
def test_session_save_load(model, tmp_path, mode):
    saved = session(model, mode="multi-request")
    saved.prefill(CONTEXT)
    saved.save(tmp_path / "ctx.safetensors")
    loaded = session(model, mode=mode)
    loaded.load(tmp_path / "ctx.safetensors")
    assert loaded.context_ids == saved.context_ids
    fresh = session(model, mode=mode)
    fresh.prefill(CONTEXT)
    for _ in range(2):
        answered = loaded.ask("what jumps?", max_new_tokens=6).output_ids
        assert answered == fresh.ask("what jumps?", max_new_tokens=6).output_ids
    with pytest.raises(Exception, match="recipe"):
        session(model, spec="streamingllm(n_sink=2,n_local=20)").load(tmp_path / "ctx.safetensors")
    with pytest.raises(Exception, match="another model"):
        session(tiny_model("qwen2", seed=3)).load(tmp_path / "ctx.safetensors")


@pytest.mark.parametrize("mode", ["multi-request", "multi-turn"])
def test_attach_hands_a_cache_to_a_session_as_load_does(model, mode):
    source = session(model)
    source.prefill(CONTEXT)
    attached = session(model, mode=mode)
    attached.attach(source.cache, source.context_ids)
    assert attached.loaded and attached.turn == 0 and attached.context_ids == source.context_ids
    assert attached.cache is source.cache and attached.prefill_result is None
    fresh = session(model, mode=mode)
    fresh.prefill(CONTEXT)
    for _ in range(2):
        expected = fresh.ask("what jumps?", max_new_tokens=6).output_ids
        assert attached.ask("what jumps?", max_new_tokens=6).output_ids == expected


def test_stored_chunks_that_do_not_fit_the_model_are_recomputed(model, caplog):
    from kvlife.store.chunks import encode_chunk
    from kvlife.store.keys import chunk_keys

    store = open_store("memory", chunk_size=16)
    probe = session(model, store)
    ids = probe.format.context_ids(CONTEXT)
    keys = chunk_keys(ids, probe.store._namespace(model))
    one_layer = [(torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 16, 8), torch.arange(16).expand(2, 16))]
    for k in keys:  # a chunk under the right key that holds one layer: it decodes, but not into this model
        store.put(k, encode_chunk(one_layer))
    with caplog.at_level(logging.WARNING, logger="kvlife.store"):
        probe.prefill(CONTEXT)
    assert probe.store.last["store_hit_tokens"] == 0 and "does not fit this model" in caplog.text
    fresh = session(model)
    fresh.prefill(CONTEXT)
    torch.testing.assert_close(query_logits(probe), query_logits(fresh), rtol=0, atol=0)
