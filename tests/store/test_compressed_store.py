"""Compressed caches in the store: a multi-request context compressed once is stored whole and served back
exactly (head-ragged and KIVI-packed layers included), only to the same recipe, model, dtype and tenant."""

import logging

import pytest
import torch

from kvlife import cli
from kvlife.bench import runner
from kvlife.bench.runner import BenchConfig
from kvlife.methods.compress.adakv import PAD_POSITION
from kvlife.methods.compress.stored import restore_layers, stored_layers
from kvlife.session import Session
from kvlife.store import ChunkCorrupt, open_store
from kvlife.store.entries import decode_entry, encode_entry
from tiny import ByteTokenizer, tiny_model, tiny_tokenizer

CONTEXT = "the quick brown fox jumps over the lazy dog and keeps running far away. " * 3
QUERY = "what jumps?"
RECIPES = ["kvzip(ratio=0.25,level=uniform)", "kvzip(ratio=0.25)", "adakv(ratio=0.25)", "kivi(bits=2)",
           "snapkv(ratio=0.25)", "streamingllm(budget=40)"]


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_model(kind) for kind in ("qwen2", "gemma3")}


def session(model, spec, store=None, salt="", mode="multi-request"):
    return Session(model, ByteTokenizer(), spec, mode=mode, prompt_format="plain", store=store,
                   store_salt=salt)


def held(s: Session) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per layer and KV head: the real tokens' keys, values and positions (padding left out)."""
    out = []
    for keys, values, positions in s.cache.to_tensors():
        real = positions != PAD_POSITION
        out.append([(keys[0, h, real[h]], values[0, h, real[h]], positions[h, real[h]])
                    for h in range(real.shape[0])])
    return out


def answer(s: Session, context: str = CONTEXT) -> list[int]:
    s.prefill(context)
    return s.ask(QUERY, max_new_tokens=8).output_ids


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
@pytest.mark.parametrize("spec", RECIPES)
def test_a_second_session_hits_and_holds_exactly_the_computed_cache(models, kind, spec):
    store = open_store("memory", chunk_size=16)
    first, second, unstored = (session(models[kind], spec, s) for s in (store, store, None))
    answers = [answer(s) for s in (first, second, unstored)]
    assert first.store.last["store_hit_tokens"] == 0 and first.store.last["store_put_bytes"] > 0
    assert second.store.last["store_hit_tokens"] == len(second.context_ids)
    assert answers[0] == answers[1] == answers[2]
    assert [type(layer) for layer in second.cache.layers] == [type(layer) for layer in unstored.cache.layers]
    assert second.cache.bytes() == unstored.cache.bytes()
    assert second.cache.next_position == unstored.cache.next_position
    for hit_layer, fresh_layer in zip(held(second), held(unstored)):
        for (k1, v1, p1), (k2, v2, p2) in zip(hit_layer, fresh_layer):
            assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(p1, p2)


def test_ragged_layers_are_stored_without_padding_and_keep_every_position(models):
    s = session(models["qwen2"], "kvzip(ratio=0.25,level=pair)")
    s.prefill(CONTEXT)
    layers = stored_layers(s.cache)
    assert {layer.kind for layer in layers} == {"headwise"}
    real = [int((positions != PAD_POSITION).sum()) for _, _, positions in s.cache.to_tensors()]
    assert [sum(k.shape[-2] for k, _, _ in layer.pieces) for layer in layers] == real
    widths = {layer.pieces[0][0].shape[-2] != layer.pieces[1][0].shape[-2] for layer in layers}
    assert True in widths  # heads keep different counts: the case under test


@pytest.mark.parametrize("encoding", ["kvlife:balanced", "int8"])
def test_codec_encodings_round_trip_ragged_and_packed_layers(models, encoding):
    for spec in ("kvzip(ratio=0.25,level=pair)", "kivi(bits=2)"):
        s = session(models["gemma3"], spec)
        s.prefill(CONTEXT)
        raw = encode_entry(stored_layers(s.cache), "raw")
        coded = encode_entry(stored_layers(s.cache), encoding, chunk_tokens=16)
        cache = s.new_cache()
        restore_layers(cache, decode_entry(coded))
        for (k1, v1, p1), (k2, v2, p2), original, restored in zip(
                cache.to_tensors(), s.cache.to_tensors(), s.cache.layers, cache.layers):
            assert type(original) is type(restored)
            assert torch.equal(p1, p2)  # every position exactly, padding where it was
            real = p1 != PAD_POSITION
            if spec.startswith("kivi") and type(original).__name__ == "KiviLayer":
                assert torch.equal(k1, k2) and torch.equal(v1, v2)  # packed codes are stored as they are
            else:
                error = (k1 - k2).abs()[0][real].max()
                assert 0 <= float(error) < 0.25 * float(k2.abs().max())
        if spec.startswith("kvzip"):
            assert len(coded) < len(raw) / 2


def test_a_lossy_encoding_serves_the_same_cache_on_miss_and_hit(models):
    store = open_store("memory", encoding="kvlife:balanced", chunk_size=16)
    first, second = (session(models["qwen2"], "kvzip(ratio=0.25,level=head)", store) for _ in range(2))
    assert answer(first) == answer(second)
    assert second.store.last["store_hit_tokens"] == len(second.context_ids)
    for (k1, v1, p1), (k2, v2, p2) in zip(first.cache.to_tensors(), second.cache.to_tensors()):
        assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(p1, p2)


def test_never_served_to_another_recipe_model_dtype_or_tenant(models):
    store = open_store("memory", chunk_size=16)
    answer(session(models["qwen2"], "kvzip(ratio=0.25)", store, salt="alice"))
    others = [
        session(models["qwen2"], "kvzip(ratio=0.5)", store, salt="alice"),  # another recipe
        session(models["qwen2"], "kvzip(ratio=0.25,level=head)", store, salt="alice"),
        session(models["qwen2"], "snapkv(ratio=0.25)", store, salt="alice"),
        session(models["qwen2"], "kvzip(ratio=0.25)", store, salt="bob"),  # another tenant
        session(tiny_model("qwen2", seed=1), "kvzip(ratio=0.25)", store, salt="alice"),  # other weights
        session(tiny_model("qwen2").to(torch.bfloat16), "kvzip(ratio=0.25)", store, salt="alice"),  # dtype
        session(models["qwen2"], "dense", store, salt="alice"),  # the dense prefix store
    ]
    for other in others:
        answer(other)
        assert other.store.last["store_hit_tokens"] == 0, other.recipe.spec
    same = session(models["qwen2"], "kvzip(ratio=0.25)", store, salt="alice")
    answer(same, CONTEXT + "x")  # another context: no entry
    assert same.store.last["store_hit_tokens"] == 0
    answer(same)
    assert same.store.last["store_hit_tokens"] == len(same.context_ids)


def test_an_entry_made_under_another_default_is_not_served(models, monkeypatch):
    """The spec names only non-default parameters: after a default changes (a new kvlife), the same spec
    is another cache, and an entry stored before must be a miss."""
    from kvlife.methods.compress.kvzip import KVzip
    store = open_store("memory", chunk_size=16)
    answer(session(models["qwen2"], "kvzip(ratio=0.25)", store))
    monkeypatch.setattr(KVzip.__dataclass_fields__["n_sink"], "default", 5)  # a release where 5 is default
    changed = session(models["qwen2"], "kvzip(ratio=0.25,n_sink=5)", store)
    assert changed.recipe.spec == "kvzip(ratio=0.25)" and changed.recipe.methods[-1].n_sink == 5
    answer(changed)
    assert changed.store.last["store_hit_tokens"] == 0


def test_a_raw_store_and_a_coded_store_never_share_an_entry(models):
    tiers = open_store("memory", chunk_size=16).tiers
    raw = open_store("memory", chunk_size=16)
    raw.tiers = tiers
    coded = open_store("memory", encoding="int8", chunk_size=16)
    coded.tiers = tiers
    answer(session(models["qwen2"], "kvzip(ratio=0.25)", raw))
    probe = session(models["qwen2"], "kvzip(ratio=0.25)", coded)
    answer(probe)
    assert probe.store.last["store_hit_tokens"] == 0


def test_a_corrupt_entry_is_a_miss_and_is_recomputed(models, tmp_path, caplog):
    url = f"disk:{tmp_path}"
    fresh = answer(session(models["qwen2"], "adakv(ratio=0.25)", open_store(url, chunk_size=16)))
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert files
    for path in files:
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    again = session(models["qwen2"], "adakv(ratio=0.25)", open_store(url, chunk_size=16))
    with caplog.at_level(logging.WARNING, logger="kvlife.store"):
        assert answer(again) == fresh
    assert again.store.last["store_hit_tokens"] == 0 and again.store.last["store_put_bytes"] > 0
    assert "checksum" in caplog.text or "corrupt" in caplog.text
    third = session(models["qwen2"], "adakv(ratio=0.25)", open_store(url, chunk_size=16))
    assert answer(third) == fresh and third.store.last["store_hit_tokens"] == len(third.context_ids)


def test_an_entry_that_passes_its_checksum_but_does_not_decode_is_refused(models):
    s = session(models["qwen2"], "kvzip(ratio=0.25)")
    s.prefill(CONTEXT)
    payload = encode_entry(stored_layers(s.cache), "raw")
    for broken in (b"", payload[:100], payload[:-50], b"\x08" + b"\x00" * 7 + b"{}" + payload[10:]):
        with pytest.raises(ChunkCorrupt):
            decode_entry(broken)
    other = tiny_model("gemma3")  # another layer layout: refused by restore, so the store recomputes
    with pytest.raises(ValueError):
        restore_layers(session(other, "dense").new_cache(), decode_entry(payload))


def test_multi_turn_compression_is_not_stored_and_the_log_says_why(models, caplog):
    store = open_store("memory", chunk_size=16)
    s = session(models["qwen2"], "kvzip(ratio=0.25)", store, mode="multi-turn")
    with caplog.at_level(logging.INFO, logger="kvlife.store"):
        s.prefill(CONTEXT)
        s.ask(QUERY, max_new_tokens=2)
    assert "multi-turn" in caplog.text and "first query" in caplog.text
    assert store.counters["put_chunks"] == 0


@pytest.fixture
def small_profile(monkeypatch):
    from kvlife.bench.tasks.kv import KVRetrieval

    monkeypatch.setitem(KVRetrieval.profiles, "test",
                        {"samples": 2, "pairs": 3, "turns": 2, "context_tokens": 120, "dense_json": False})


def test_bench_second_run_hits_for_every_sample_with_identical_answers(tmp_path, small_profile):
    model = tiny_model()
    rows = []
    for index in range(2):
        store = open_store(f"disk:{tmp_path / 'store'}", chunk_size=16)
        config = BenchConfig(model="tiny", tasks=["kv"], mode="multi-request", method="kvzip(ratio=0.25)",
                             profile="test", prompt_format="plain")
        out = runner.run(config, out=tmp_path / f"run{index}", model=model, tokenizer=ByteTokenizer(),
                         progress=False, store=store)
        rows.append(runner.read_rows(out / "predictions.jsonl"))
    first, second = rows
    assert len(first) == len(second) == 4
    starts = [r for r in second if r["turn"] == 1]
    assert len(starts) == 2 and all(r["store"]["store_hit_tokens"] == r["context_tokens"] for r in starts)
    assert all(r["store"]["store_hit_tokens"] == 0 for r in first if r["turn"] == 1)
    assert [r["prediction"] for r in first] == [r["prediction"] for r in second]


def test_cli_bench_stores_compressed_contexts_and_refuses_bad_parameters(tmp_path, capsys, small_profile):
    tiny_model("qwen2", attn="sdpa").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    capsys.readouterr()  # the save's progress bar
    base = ["bench", "--model", str(tmp_path / "tiny"), "--tasks", "kv", "--profile", "test", "--samples",
            "1", "--mode", "multi-request", "--no-progress", "--store", f"disk:{tmp_path / 'store'}",
            "--max-turns", "1"]
    for method in ("kvzip(ratio=0)", "duo_attention(config=/nowhere/split.json)"):
        assert cli.main([*base, "--method", method, "--out", str(tmp_path / "bad")]) == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    predictions = []
    for index in range(2):
        assert cli.main([*base, "--method", "kvzip(ratio=0.25)", "--out", str(tmp_path / f"run{index}")]) == 0
        predictions.append(runner.read_rows(tmp_path / f"run{index}" / "predictions.jsonl"))
    assert predictions[1][0]["store"]["store_hit_tokens"] == predictions[1][0]["context_tokens"]
    assert predictions[0][0]["prediction"] == predictions[1][0]["prediction"]


def test_a_hybrid_model_compresses_unstored_and_the_log_says_why(caplog):
    model = tiny_model("jamba")
    store = open_store("memory", chunk_size=16)
    with caplog.at_level(logging.INFO, logger="kvlife.store"):
        stored = session(model, "snapkv(ratio=0.25)", store)
        assert answer(stored) == answer(session(model, "snapkv(ratio=0.25)"))
    assert "recurrent" in stored.store.last["store_skipped"] and store.counters["put_chunks"] == 0
    assert "recurrent" in caplog.text


def test_entries_through_kvlife_serve_stay_with_their_tenant(models, server_url):
    from tests.store.conftest import TOKENS

    def store_of(tenant):
        return open_store(f"{server_url}?token={TOKENS[tenant]}", chunk_size=16)

    spec = "kvzip(ratio=0.25,level=pair)"
    fresh = answer(session(models["qwen2"], spec, store_of("alice")))
    bob = session(models["qwen2"], spec, store_of("bob"))
    # the same key, in another tenant's directory
    assert answer(bob) == fresh and bob.store.last["store_hit_tokens"] == 0
    alice = session(models["qwen2"], spec, store_of("alice"))
    assert answer(alice) == fresh and alice.store.last["store_hit_tokens"] == len(alice.context_ids)
