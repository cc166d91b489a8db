"""Per-document caches: computed alone and stored when missing, found only under the same model, dtype,
tokenizer and tenant, re-rotated exactly to a new place, refused when they do not fit; on every tier."""

import pytest
import torch

from kvlife.attention import StepContext
from kvlife.cache import KVCache, cache_kwarg
from kvlife.errors import KvlifeError
from kvlife.session import Session
from kvlife.store import KVStore, open_store
from kvlife.store.chunks import encode_chunk
from kvlife.store.documents import DocumentStore, model_rope, place
from tiny import ByteTokenizer, tiny_model, tiny_tokenizer

DOC = [((7 * i) % 200) + 20 for i in range(45)]  # 45 tokens: two whole chunks of 16 and a tail of 13


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


@torch.no_grad()
def fresh(model, ids, start=0):
    """The document's cache computed by the model at positions start..start+n-1 (with nothing before it)."""
    cache = KVCache.for_model(model)
    for layer in cache.layers:
        layer.next_position = start
    positions = torch.arange(start, start + len(ids))
    model(input_ids=torch.tensor([ids]), position_ids=positions[None], **cache_kwarg(model, cache),
          use_cache=True, logits_to_keep=1, kvlife=StepContext(cache, positions, phase="prefill"))
    return cache.to_tensors()


def assert_layers_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for (k1, v1, p1), (k2, v2, p2) in zip(a, b):
        torch.testing.assert_close(k1, k2, rtol=0, atol=atol)
        torch.testing.assert_close(v1, v2, rtol=0, atol=atol)
        assert torch.equal(p1.cpu(), p2.cpu())


def test_missing_document_is_computed_and_stored_then_found(model):
    store = open_store("memory", chunk_size=16)
    documents = DocumentStore(store, model, ByteTokenizer())
    computed, first = documents.get_or_compute(DOC)
    assert (first.misses, first.hits, first.computed_tokens) == (1, 0, 45) and first.put_bytes > 0
    assert store.counters["put_chunks"] == 3  # 16 + 16 + a partial tail of 13
    assert_layers_close(computed, fresh(model, DOC), atol=0)  # a dense prefill of the document alone
    found, second = documents.get_or_compute(DOC)
    assert (second.hits, second.misses, second.hit_tokens, second.put_bytes) == (1, 0, 45, 0)
    assert_layers_close(found, computed, atol=0)


def test_partial_hit_computes_only_the_rest(model):
    store = open_store("memory", chunk_size=16)
    documents = DocumentStore(store, model, ByteTokenizer())
    documents.get_or_compute(DOC[:32])  # the document's first two chunks, stored as their own document
    layers, figures = documents.get_or_compute(DOC)
    assert (figures.partial_hits, figures.hit_tokens, figures.computed_tokens) == (1, 32, 13)
    assert_layers_close(layers, fresh(model, DOC))


@pytest.mark.parametrize("start", [1, 37, 1000])
def test_rerotation_equals_computing_the_document_at_its_new_place(model, start):
    at_zero = fresh(model, DOC)
    moved = place(at_zero, start, model_rope(model))
    assert_layers_close(moved, fresh(model, DOC, start), atol=2e-5)
    assert not torch.allclose(moved[0][0], at_zero[0][0])  # the move really rotated the keys


def test_assembled_document_at_the_same_positions_equals_its_prefill_alone(model):
    documents = DocumentStore(open_store("memory", chunk_size=16), model, ByteTokenizer())
    layers, spans, _ = documents.assemble([DOC])
    assert spans == [(0, 45)]
    assert_layers_close(layers, fresh(model, DOC), atol=0)


def keys_of(model, tokenizer, salt="", dtype=None, encoding="raw"):
    store = open_store("memory", encoding=encoding, chunk_size=16)
    return set(DocumentStore(store, model, tokenizer, salt=salt).keys(DOC))


def test_keys_name_model_dtype_tokenizer_tenant_and_encoding(model):
    base = keys_of(model, ByteTokenizer())
    assert base == keys_of(model, ByteTokenizer())
    others = [keys_of(tiny_model("qwen2", seed=1), ByteTokenizer()),  # other weights
              keys_of(tiny_model("qwen2").to(torch.bfloat16), ByteTokenizer()),  # other dtype
              keys_of(model, tiny_tokenizer()),  # other tokenizer
              keys_of(model, ByteTokenizer(), salt="bob"),  # other tenant
              keys_of(model, ByteTokenizer(), encoding="int8")]  # other encoding
    for other in others:
        assert not base & other


def test_a_document_from_another_model_dtype_tokenizer_or_tenant_never_assembles(model):
    store = open_store("memory", chunk_size=16)
    DocumentStore(store, model, ByteTokenizer(), salt="alice").get_or_compute(DOC)
    for other_model, tokenizer, salt in [(tiny_model("qwen2", seed=1), ByteTokenizer(), "alice"),
                                         (tiny_model("qwen2").to(torch.bfloat16), ByteTokenizer(), "alice"),
                                         (model, tiny_tokenizer(), "alice"),
                                         (model, ByteTokenizer(), "bob")]:
        layers, figures = DocumentStore(store, other_model, tokenizer, salt=salt).get_or_compute(DOC)
        assert (figures.hits, figures.misses, figures.hit_tokens) == (0, 1, 0)
        assert_layers_close(layers, [(k, v, p) for k, v, p in fresh(other_model, DOC)], atol=0)


def test_an_entry_that_does_not_fit_is_recomputed_never_assembled(model):
    store = open_store("memory", chunk_size=16)
    documents = DocumentStore(store, model, ByteTokenizer())
    keys = documents.keys(DOC)
    wrong = [(torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 16, 8), torch.arange(16).repeat(2, 1))
             for _ in range(4)]  # head_dim 8, not the model's 16
    store.put(keys[0], encode_chunk(wrong))
    layers, figures = documents.get_or_compute(DOC)
    assert figures.misses == 1 and figures.hit_tokens == 0 and "expected" in figures.refused[0]
    assert_layers_close(layers, fresh(model, DOC), atol=0)
    _, again = documents.get_or_compute(DOC)  # stored again, correctly
    assert again.hits == 1


def test_models_the_documents_cannot_serve_fail_in_one_line():
    with pytest.raises(KvlifeError, match="sliding-window layers") as info:
        DocumentStore(open_store("memory"), tiny_model("gemma3"), ByteTokenizer())
    assert "\n" not in str(info.value)


@pytest.fixture
def tier_store(tier):
    """A store of one tier of each kind (the `tier` fixture, tests/store/conftest.py)."""
    return KVStore([tier], chunk_size=16)


SEGMENTS = ["Read these notes.", "\n\nthe fox is red and runs far away from home.",
            "\n\nthe dog is blue and sleeps all day long.", "\n\nthe cat is green and sings."]


def test_every_tier_serves_assembled_contexts(model, tier_store):
    context = "".join(SEGMENTS)

    def run():
        s = Session(model, ByteTokenizer(), "cacheblend(ratio=0.5)", mode="multi-request",
                    prompt_format="plain", store=tier_store)
        result = s.prefill(context, segments=SEGMENTS)
        state = s.cache.checkpoint()
        logits = s.forward(s.format.query_ids("what is red?"), phase="extend")
        s.cache.rollback(state)
        return result.stats, logits

    first, logits_first = run()
    assert (first["doc_misses"], first["doc_hits"]) == (4, 0) and first["doc_put_bytes"] > 0
    second, logits_second = run()
    assert (second["doc_misses"], second["doc_hits"]) == (0, 4)
    torch.testing.assert_close(logits_second, logits_first, rtol=0, atol=1e-6)


LEAD_IN = [((11 * i) % 180) + 30 for i in range(21)]


@torch.no_grad()
def after_lead_in(model, ids):
    """The document's K/V from a dense prefill of LEAD_IN + ids, cut out and moved back to 0..n-1."""
    layers = fresh(model, LEAD_IN + ids)
    n = len(LEAD_IN)
    return place([(k[:, :, n:], v[:, :, n:], p[:, n:]) for k, v, p in layers], -n, model_rope(model))


def test_a_document_after_a_lead_in_is_its_part_of_the_joint_prefill_at_0_to_n(model):
    store = open_store("memory", chunk_size=16)
    documents = DocumentStore(store, model, ByteTokenizer(), lead_in=LEAD_IN)
    computed, figures = documents.get_or_compute(DOC)
    assert figures.misses == 1 and figures.computed_tokens == 45
    assert_layers_close(computed, after_lead_in(model, DOC), atol=2e-5)
    assert not torch.allclose(computed[1][1], fresh(model, DOC)[1][1], atol=1e-3)  # not the alone cache
    # placed right after the lead-in, its keys are those the joint prefill computed
    joint, n = fresh(model, LEAD_IN + DOC), len(LEAD_IN)
    for (keys, _, positions), (want, _, _) in zip(place(computed, n, model_rope(model)), joint):
        torch.testing.assert_close(keys, want[:, :, n:], rtol=0, atol=2e-5)
        assert positions[0].tolist() == list(range(n, n + 45))
    # another entry than the document alone, and than another lead-in's
    alone = DocumentStore(store, model, ByteTokenizer())
    other = DocumentStore(store, model, ByteTokenizer(), lead_in=LEAD_IN[:-1])
    assert len({tuple(d.keys(DOC)) for d in (documents, alone, other)}) == 3
    assert alone.get_or_compute(DOC)[1].misses == 1 and other.get_or_compute(DOC)[1].misses == 1
    again, found = DocumentStore(store, model, ByteTokenizer(), lead_in=LEAD_IN).get_or_compute(DOC)
    assert found.hits == 1
    assert_layers_close(again, computed, atol=0)


def test_a_partial_hit_after_a_lead_in_computes_the_rest_after_it_too(model):
    store = open_store("memory", chunk_size=16)
    documents = DocumentStore(store, model, ByteTokenizer(), lead_in=LEAD_IN)
    documents.get_or_compute(DOC[:32])
    layers, figures = documents.get_or_compute(DOC)
    assert (figures.partial_hits, figures.hit_tokens, figures.computed_tokens) == (1, 32, 13)
    assert_layers_close(layers, after_lead_in(model, DOC), atol=2e-5)


def test_the_first_piece_stays_alone_with_a_lead_in(model):
    store = open_store("memory", chunk_size=16)
    documents = DocumentStore(store, model, ByteTokenizer(), lead_in=LEAD_IN)
    head, doc = DOC[:10], DOC[10:]
    layers, spans, _ = documents.assemble([head, doc], first_alone=True)
    assert spans == [(0, 10), (10, 45)]
    for (keys, values, _), (want_k, want_v, _) in zip(layers, fresh(model, head)):
        torch.testing.assert_close(keys[:, :, :10], want_k, rtol=0, atol=1e-6)
        torch.testing.assert_close(values[:, :, :10], want_v, rtol=0, atol=1e-6)
