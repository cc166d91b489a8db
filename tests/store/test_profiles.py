"""Codec weights profiles in the store (`kvlife:LEVEL+profile[=FILE]`): the profile reaches the codec for
dense chunks and compressed entries (head-ragged layers per head), it is part of the store key, and bad
encodings or profiles are one-line errors."""

import json
import re

import numpy as np
import pytest
import torch

from kvlife import cli
from kvlife.codec import decode_layers
from kvlife.codec.calibrate import channel_weights, load_weights, read_profile, save_profile
from kvlife.codec.format import CodecError
from kvlife.methods.compress.stored import stored_layers
from kvlife.models import model_signature
from kvlife.session import Session
from kvlife.store import StoreError, open_store, profiles
from kvlife.store.chunks import check_encoding
from kvlife.store.entries import decode_entry, encode_entry
from tiny import ByteTokenizer, tiny_model

CONTEXT = "the quick brown fox jumps over the lazy dog and keeps running far away. " * 3
SPEC = "kvzip(ratio=0.25,level=pair)"  # head-ragged: one stored piece per KV head


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


def shape(model):
    config = model.config
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, dim


@pytest.fixture
def profile_file(model, tmp_path):
    """A profile measured on the tiny model (so its shape and signature are the model's)."""
    ids = torch.randint(0, model.config.vocab_size, (1, 64))
    path = tmp_path / "tiny.json"
    save_profile(path, channel_weights(model, ids), "tiny", model_signature(model), {"text": "random"})
    return path


def uneven_profile(model, path):
    """Keys of the first half of each head's channels weigh 1000x the rest: steps must follow."""
    layers, heads, dim = shape(model)
    keys = np.ones((heads, dim))
    keys[:, : dim // 4] = keys[:, dim // 2: dim // 2 + dim // 4] = 1000.0  # both halves of the RoPE pairs
    save_profile(path, [(keys, np.ones((heads, dim)))] * layers, "tiny", model_signature(model), {})
    return path


def session(model, store, spec=SPEC):
    return Session(model, ByteTokenizer(), spec, mode="multi-request", prompt_format="plain", store=store)


def test_a_profile_file_round_trips_and_loads_as_weights(model, profile_file):
    found = read_profile(profile_file)
    layers, heads, dim = shape(model)
    assert found["signature"] == model_signature(model) and len(found["weights"]) == layers
    assert found["weights"][0][0].shape == (heads, dim)
    loaded = load_weights(profile_file)
    assert all(np.allclose(a, b, rtol=1e-5) for a, b in zip(found["weights"][1], loaded[1]))


def test_the_shipped_profiles_load_and_name_their_models():
    assert {"qwen2.5-coder-0.5b", "smollm2-135m"} <= set(profiles.shipped())
    for name in profiles.shipped():
        profile = profiles.load(profiles.PROFILE_DIR / f"{name}.json")
        assert profile.model == name and len(profile.signature) == 16 and len(profile.digest) == 16


def test_weighted_steps_cut_the_weighted_key_error_of_a_ragged_entry(model, tmp_path):
    s = session(model, None)
    s.prefill(CONTEXT)
    layers = stored_layers(s.cache)
    assert {layer.kind for layer in layers} == {"headwise"}
    path = uneven_profile(model, tmp_path / "u.json")
    setup = profiles.codec_setup(model, f"kvlife:aggressive+profile={path}")
    weights = setup.weights
    errors = {}
    for name, given in (("plain", None), ("profile", weights)):
        decoded = decode_entry(encode_entry(layers, "kvlife:aggressive", setup.rope, 16, given))
        total = 0.0
        for index, (original, back) in enumerate(zip(layers, decoded)):
            for head, ((k1, _, p1), (k2, _, p2)) in enumerate(zip(original.pieces, back.pieces)):
                assert torch.equal(p1, p2)  # every kept position survives
                w = torch.as_tensor(weights[index][0][head], dtype=torch.float32)
                total += float(((k1.float() - k2.float()) ** 2 * w).sum())
        errors[name] = total
    assert errors["profile"] < 0.5 * errors["plain"], errors


def test_piece_weights_follow_each_pieces_heads(model):
    layers, heads, dim = shape(model)
    weights = [(np.arange(heads * dim, dtype=float).reshape(heads, dim) + 1, np.ones((heads, dim)))] * layers
    s = session(model, None)
    s.prefill(CONTEXT)
    mapped = profiles.piece_weights(weights, stored_layers(s.cache))
    assert len(mapped) == layers * heads
    assert np.array_equal(mapped[1][0], weights[0][0][1:2])  # layer 0's second head

    dense = session(model, None, "dense")
    dense.prefill(CONTEXT)
    assert all(w[0] is weights[0][0] for w in profiles.piece_weights(weights, stored_layers(dense.cache)))


def test_the_profile_is_part_of_the_key_and_a_second_session_hits_the_same_answers(model, profile_file):
    store = open_store("memory", chunk_size=16)
    answers = []
    for encoding in (f"kvlife:balanced+profile={profile_file}", f"kvlife:balanced+profile={profile_file}",
                     "kvlife:balanced"):
        store.encoding = encoding
        s = session(model, store)
        s.prefill(CONTEXT)
        answers.append((s.store.last["store_hit_tokens"], s.ask("what jumps?", max_new_tokens=6).output_ids))
    assert answers[0][0] == 0 and answers[1][0] > 0 and answers[0][1] == answers[1][1]
    assert answers[2][0] == 0  # entries coded with a profile are not served to the plain level


def test_dense_chunks_and_documents_are_coded_with_the_profile(model, profile_file):
    store = open_store("memory", encoding=f"kvlife:balanced+profile={profile_file}", chunk_size=16)
    s = session(model, store, "dense")
    s.prefill(CONTEXT)
    assert s.store.last["store_put_bytes"] > 0
    payload = store.fetch_prefix(_keys(s)[:1])[0]
    name = payload[1:1 + payload[0]].decode()
    assert name == "kvlife:balanced+profile"
    assert len(decode_layers(payload[1 + payload[0]:])) == shape(model)[0]


def _keys(s):
    from kvlife.store.keys import chunk_keys

    return chunk_keys(s.context_ids, s.store.namespace)


@pytest.mark.parametrize("encoding, message", [
    ("int8+profile", "kvlife:LEVEL encodings only"),
    ("kvlife:balanced+profilex", "after '+profile'"),
    ("kvlife:balanced+profile=", "after '+profile'"),
    ("kvlife:balanced+profile=/no/such/profile.json", "no codec weights profile at"),
    ("kvlife:finest+profile", "unknown codec level 'finest'"),
])
def test_bad_profile_encodings_are_one_line_errors(encoding, message):
    with pytest.raises(StoreError, match=re.escape(message)):
        check_encoding(encoding)


def test_a_model_without_a_shipped_profile_or_with_another_shape_is_refused(model, tmp_path):
    with pytest.raises(StoreError, match="no shipped codec weights profile for this model"):
        profiles.codec_setup(model, "kvlife:balanced+profile")
    layers, heads, dim = shape(model)
    other = tmp_path / "other.json"
    save_profile(other, [(np.ones((heads, dim)), np.ones((heads, dim)))] * (layers + 1), "other", "x", {})
    with pytest.raises(StoreError, match="this model has"):
        profiles.codec_setup(model, f"kvlife:balanced+profile={other}")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "kvlife-codec-weights/1", "n_layers": 1, "kv_heads": 1,
                               "head_dim": 2, "keys": [[[1, -1]]], "values": [[[1, 1]]]}))
    with pytest.raises(CodecError, match="finite numbers >= 0"):
        read_profile(bad)


def test_the_cli_refuses_a_missing_profile_in_one_line(tmp_path, capsys):
    argv = ["bench", "--model", "tiny-missing", "--no-progress", "--out", str(tmp_path / "run"),
            "--store", f"disk:{tmp_path / 'store'}",
            "--store-encoding", "kvlife:balanced+profile=/no/such.json"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlife: error:") and "\n" not in err and "no codec weights profile at" in err, err


def test_the_store_takes_the_sparse_level_with_or_without_a_profile(model, profile_file):
    assert check_encoding("kvlife:sparse") == "kvlife:sparse"
    store = open_store("memory", encoding=f"kvlife:sparse+profile={profile_file}", chunk_size=16)
    first, second = session(model, store), session(model, store)
    answers = []
    for s in (first, second):
        s.prefill(CONTEXT)
        answers.append(s.ask("what jumps?", max_new_tokens=6).output_ids)
    assert second.store.last["store_hit_tokens"] > 0 and answers[0] == answers[1]


def test_streamed_pieces_of_a_compressed_context_take_the_profile(model, tmp_path):
    from kvlife.stream.pieces import build_pieces

    s = session(model, None)
    s.prefill(CONTEXT)
    layers = s.stored_context()
    path = uneven_profile(model, tmp_path / "u.json")
    setup = profiles.codec_setup(model, f"kvlife:aggressive+profile={path}")

    def pieces(weights):
        return build_pieces(layers, s.context_ids, "ctx", "fp", "float32", "id", SPEC, ["aggressive"], 1,
                            setup.rope, 16, weights=weights).chunks["aggressive"]

    plain, weighted = pieces(None), pieces(setup.weights)
    assert plain != weighted
    for payload, original in zip(weighted, layers):
        (back,) = decode_entry(payload)
        assert all(torch.equal(p1, p2) for (_, _, p1), (_, _, p2) in zip(original.pieces, back.pieces))
    with pytest.raises(StoreError, match="covers 0 layers, the cache has 1"):  # a profile one layer short
        pieces(setup.weights[:-1])
