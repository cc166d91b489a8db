"""State-space and hybrid models (kvlife/recurrent.py) through Session, methods and store, on tiny
random-initialised configs of Mamba2 (pure SSM), Jamba, Zamba2, LFM2 and Qwen3-Next (hybrids)."""

from __future__ import annotations

import logging

import pytest
import torch

from kvlife.cache import HybridLayer, KVCache, KVLayer
from kvlife.errors import KvlifeError, ModelError, SpecError
from kvlife.methods.base import model_forward
from kvlife.recurrent import StateLayer, cache_bytes_model, kind_of, state_elements
from kvlife.session import Session
from tiny import HYBRID, ByteTokenizer, tiny_config, tiny_model

KINDS = list(HYBRID)
CONTEXT = "the quick brown fox jumps over the lazy dog; " * 3
QUERIES = ["who jumps?", "what is lazy?"]
EXPECTED = {  # the cache layer every tiny config needs
    "mamba2": [StateLayer] * 4,
    "jamba": [StateLayer, KVLayer] * 2,
    "zamba2": [StateLayer, HybridLayer] * 2,
    "lfm2": [StateLayer, KVLayer] * 2,
    "qwen3_next": [StateLayer, KVLayer] * 2,
}


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_model(kind) for kind in KINDS}


def session(model, recipe=None, mode="multi-request", **kwargs) -> Session:
    return Session(model, ByteTokenizer(), recipe, mode=mode, prompt_format="plain", **kwargs)


def states(cache) -> list[torch.Tensor]:
    return [tensor.clone() for layer in cache.layers if isinstance(layer, StateLayer)
            for _, tensor in layer.state_tensors()]


def fresh_logits(model, ids: list[int], n_last: int) -> torch.Tensor:
    """Logits of the last `n_last` tokens of one prefill of `ids` on an empty cache."""
    return model_forward(model, KVCache.for_model(model), ids, None, all_logits=True)[-n_last:]


@pytest.mark.parametrize("kind", KINDS)
def test_cache_layers_follow_the_layer_types(models, kind):
    cache = KVCache.for_model(models[kind])
    assert [type(layer) for layer in cache.layers] == EXPECTED[kind]
    assert kind_of(models[kind].config) == ("ssm" if kind == "mamba2" else "hybrid")


@pytest.mark.parametrize("kind", KINDS)
def test_multi_request_rollback_equals_a_fresh_prefill(models, kind):
    model = models[kind]
    method = session(model)
    method.prefill(CONTEXT)
    context_state = states(method.cache)
    assert context_state, "the context left recurrent state"
    for query in QUERIES * 2:
        method.ask(query, max_new_tokens=4, reference="a fox")
        # Cut back to the context exactly: the state is the context's, bit for bit.
        assert all(torch.equal(a, b) for a, b in zip(states(method.cache), context_state))
        assert method.cache.next_position == len(method.context_ids)
        query_ids = method.format.query_ids(query)
        got = method.forward(query_ids, phase="extend", all_logits=True)
        method.cache.rollback(method.context_checkpoint)
        want = fresh_logits(model, method.context_ids + query_ids, len(query_ids))
        assert torch.allclose(got, want, atol=2e-5), float((got - want).abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_multi_turn_carries_the_state_forward(models, kind):
    model = models[kind]
    method = session(model, mode="multi-turn")
    method.prefill(CONTEXT)
    fed: list[int] = []
    for index, query in enumerate(QUERIES):
        before = method.context_ids if index == 0 else method.format.answer_ids("a fox")
        turn = before + method.format.query_ids(query)
        fed += turn
        result = method.ask(query, max_new_tokens=3, reference="a fox")
        assert method.cache.next_position == len(fed) and result.prompt_tokens == len(turn)
    got = method.forward([ord("x")], phase="decode")[-1]
    want = fresh_logits(model, fed + [ord("x")], 1)[-1]
    assert torch.allclose(got, want, atol=2e-5), float((got - want).abs().max())


def test_jamba_extend_uses_the_stored_state(models):
    """transformers' Mamba-1 scan ignores the stored state on multi-token input; kvlife steps such extends
    token by token, so an extend equals one prefill (5.7e-4 apart without it on this config)."""
    model = models["jamba"]
    ids = list(range(3, 40))
    cache = KVCache.for_model(model)
    model_forward(model, cache, ids[:25], None)
    got = model_forward(model, cache, ids[25:], None, all_logits=True)
    assert torch.allclose(got, fresh_logits(model, ids, len(ids) - 25), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_bytes_count_state_and_match_the_memory_model(models, kind):
    model = models[kind]
    method = session(model)
    result = method.prefill(CONTEXT)
    cache = method.cache
    n_layers = sum(1 for layer in cache.layers if isinstance(layer, StateLayer))
    assert cache.state_bytes() == n_layers * state_elements(model.config) * 4
    kv = sum(KVLayer.nbytes(layer) for _, layer in cache.kv_layers())
    assert result.cache_bytes == cache.bytes() == kv + cache.state_bytes()
    assert cache_bytes_model(model.config, len(method.context_ids), 4) == {
        "kv": kv, "state": cache.state_bytes(), "total": cache.bytes()}


@pytest.mark.parametrize("kind", ["jamba", "zamba2", "lfm2", "qwen3_next"])
@pytest.mark.parametrize("recipe", ["snapkv(ratio=0.25)", "streamingllm(ratio=0.25)", "pyramidkv(ratio=0.25)",
                                    "kvzip(ratio=0.25,level=uniform)", "dense+quest"])
def test_attention_methods_leave_the_state_exact(models, kind, recipe):
    model = models[kind]
    dense, method = session(model), session(model, recipe)
    dense.prefill(CONTEXT)
    method.prefill(CONTEXT)
    assert all(torch.equal(a, b) for a, b in zip(states(method.cache), states(dense.cache)))
    if "ratio" in recipe:
        kv_bytes = method.cache.bytes() - method.cache.state_bytes()
        assert kv_bytes < dense.cache.bytes() - dense.cache.state_bytes()
    for query in QUERIES:
        method.ask(query, max_new_tokens=3)
        assert all(torch.equal(a, b) for a, b in zip(states(method.cache), states(dense.cache)))


def test_layer_replacing_methods_refuse_hybrid_layers(models):
    """kivi (and kvzip at its default pair level, head-ragged) replace a layer's cache object; on Zamba2's
    hybrid layers that would drop the state."""
    for spec in ("kivi", "kvzip(ratio=0.25)"):
        with pytest.raises(KvlifeError, match="recurrent state"):
            session(models["zamba2"], spec).prefill(CONTEXT)
    lfm2 = session(models["lfm2"], "kivi")  # attention layers without state: quantized as usual
    lfm2.prefill(CONTEXT)
    assert lfm2.cache.bytes() < session(models["lfm2"]).prefill(CONTEXT).cache_bytes


@pytest.mark.parametrize("recipe", ["minference", "a_shape", "snapkv(ratio=0.5)", "dense+quest"])
def test_attention_methods_on_a_pure_ssm_say_so(models, recipe):
    with pytest.raises(SpecError, match="mamba2 has none") as error:
        session(models["mamba2"], recipe)
    assert "\n" not in str(error.value)


def test_prompt_methods_and_dense_run_on_a_pure_ssm(models):
    method = session(models["mamba2"], "dense")
    assert method.prefill(CONTEXT).cache_tokens == 0  # no K/V: only state
    assert method.ask(QUERIES[0], max_new_tokens=2).cache_bytes == method.cache.state_bytes() > 0


def test_unsupported_layer_type_fails_in_one_line():
    config = tiny_config("lfm2")
    config.layer_types = ["conv", "chunked_attention", "conv", "full_attention"]
    with pytest.raises(ModelError, match="'chunked_attention' \\(layer 1\\)") as error:
        KVCache.for_model(config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["mamba2", "jamba", "zamba2"])
def test_store_refuses_recurrent_models_and_matches_a_full_prefill(models, kind, caplog):
    """The prefix store holds K/V only: a hit would lack the recurrent state at the chunk boundary, so
    recurrent models prefill as usual, logged once (never K/V without its state)."""
    model = models[kind]
    plain = session(model)
    plain.prefill(CONTEXT)
    with caplog.at_level(logging.INFO, logger="kvlife.store"):
        stored = session(model, store="memory")
        for _ in range(2):
            stored.prefill(CONTEXT)
            assert stored.store.last["store_hit_tokens"] == 0
            assert "recurrent" in stored.store.last["store_skipped"]
            assert all(torch.equal(a, b) for a, b in zip(states(stored.cache), states(plain.cache)))
    assert sum("recurrent" in record.getMessage() for record in caplog.records) == 1
    answer = stored.ask(QUERIES[0], max_new_tokens=4).output_ids
    assert answer == plain.ask(QUERIES[0], max_new_tokens=4).output_ids


def test_saving_a_cache_with_state_is_refused(models, tmp_path):
    method = session(models["lfm2"])
    method.prefill(CONTEXT)
    with pytest.raises(KvlifeError, match="recurrent"):
        method.save(str(tmp_path / "cache.safetensors"))


@pytest.mark.parametrize("kind, method, message", [
    ("mamba2", "snapkv(ratio=0.5)", "mamba2 has none"),
    ("lfm2-chunked", "dense", "'chunked_attention' (layer 1)"),
])
def test_cli_refuses_in_one_line(tmp_path, capsys, kind, method, message):
    from kvlife import cli
    from tiny import tiny_tokenizer

    model = tiny_model(kind.split("-")[0])
    if kind.endswith("chunked"):
        model.config.layer_types = ["conv", "chunked_attention", "conv", "full_attention"]
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    argv = ["bench", "--model", str(tmp_path / "model"), "--method", method, "--tasks", "kv",
            "--samples", "1", "--dtype", "float32", "--no-progress", "--out", str(tmp_path / "run")]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' weight-loading progress bar
    assert err.startswith("kvlife: error:") and message in err, err
