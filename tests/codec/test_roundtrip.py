"""decode(encode(x)) stays within each level's documented error bound, for every shape and dtype."""

import numpy as np
import pytest
import torch

from kvlife.cache import KVCache
from kvlife.codec import (
    BASELINES,
    LEVELS,
    Level,
    decode,
    decode_chunk,
    decode_layers,
    encode,
    encode_baseline,
    encode_levels,
    error_bound,
    inspect,
    mix,
)

from .helpers import ROPE, assert_within_bound, random_layers, real_like_layers


@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("rope", [None, ROPE], ids=["post-rope", "pre-rope"])
def test_levels_within_bound_real_like(level, rope):
    layers = real_like_layers(rope=ROPE)
    blob = encode(layers, level=level, chunk_tokens=64, rope=rope)
    assert_within_bound(layers, decode_layers(blob), error_bound(blob))
    assert inspect(blob)["chunk_levels"] == [level] * 5


def test_the_sparse_level_is_named_off_the_ladder_and_keeps_keys_finer_than_values():
    from kvlife.codec.levels import OTHER_LEVELS

    assert "sparse" in OTHER_LEVELS and "sparse" not in LEVELS  # streams never step through it
    layers = real_like_layers(rope=ROPE)
    blob = encode(layers, level="sparse", chunk_tokens=64, rope=ROPE)
    assert_within_bound(layers, decode_layers(blob), error_bound(blob))
    assert inspect(blob)["chunk_levels"] == ["sparse"] * 5
    high, balanced = (decode_layers(encode(layers, level=name, chunk_tokens=64, rope=ROPE))
                      for name in ("high", "balanced"))
    sparse = decode_layers(blob)

    def error(decoded, index):
        return sum(float((a[index].float() - b[index].float()).pow(2).sum()) for a, b in zip(layers, decoded))

    assert error(sparse, 0) < error(high, 0) and error(sparse, 1) > error(balanced, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 11, 255, 257])
def test_dtypes_and_odd_token_counts(dtype, tokens):
    layers = random_layers(tokens=tokens, dtype=dtype, batch=2, heads=3, dim=6)
    blob = encode(layers, level="balanced", chunk_tokens=128)
    decoded = decode_layers(blob)
    assert_within_bound(layers, decoded, error_bound(blob))
    assert decoded[0][0].dtype == dtype


def test_uneven_layers_and_empty_layer():
    layers = random_layers(n_layers=1, tokens=50) + random_layers(n_layers=1, tokens=7, heads=1, dim=4) + [
        (torch.zeros(1, 2, 0, 8), torch.zeros(1, 2, 0, 8), None)
    ]
    blob = encode(layers, chunk_tokens=16)
    assert_within_bound(layers, decode_layers(blob), error_bound(blob))


def test_kvcache_in_kvcache_out_keeps_positions():
    layers = [(k, v, torch.arange(100, 100 + k.shape[2]).expand(k.shape[1], -1))
              for k, v, _ in random_layers(tokens=20, dim=16)]
    layers[1] = (layers[1][0], layers[1][1], torch.tensor([[0, 3, 5] + list(range(10, 27))] * 2))  # evicted
    cache = KVCache.from_tensors(layers, next_position=500)
    out = decode(encode(cache, rope=ROPE))
    assert out.next_position == 500
    for (_, _, p), (_, _, q) in zip(cache.to_tensors(), out.to_tensors()):
        assert torch.equal(p, q)


def test_constant_and_zero_cache():
    layers = [(torch.zeros(1, 1, 9, 4), torch.full((1, 1, 9, 4), 3.5), None)]
    decoded = decode_layers(encode(layers))
    assert torch.equal(decoded[0][0], layers[0][0]) and torch.allclose(decoded[0][1], layers[0][1])


def test_huge_and_tiny_magnitudes():
    layers = random_layers(tokens=40)
    layers[0] = (layers[0][0] * 1e6, layers[0][1] * 1e-6, None)
    blob = encode(layers, level="lossless-ish")
    assert_within_bound(layers, decode_layers(blob), error_bound(blob))


def test_custom_level_and_delta_off():
    layers = real_like_layers(tokens=90)
    level = Level("mine", 99, alpha_k=0.3, alpha_v=2.0, exact_tokens=3)
    blob = encode(layers, level=level, delta="off")
    decoded = decode_layers(blob)
    assert_within_bound(layers, decoded, error_bound(blob))
    assert torch.equal(decoded[0][0][:, :, :3], layers[0][0][:, :, :3])  # exact tokens
    assert inspect(blob)["chunk_levels"] == ["custom"]


def test_chunks_decode_independently_and_mix():
    layers = real_like_layers(tokens=200)
    streams = encode_levels(layers, ["high", "aggressive"], chunk_tokens=64, rope=ROPE)
    whole = decode_layers(streams["high"])
    for index in range(4):
        part = decode_chunk(streams["high"], index)
        for li, (k, _v, p) in enumerate(part):
            assert torch.equal(k, whole[li][0][:, :, index * 64 : index * 64 + k.shape[2]])
            assert torch.equal(p, whole[li][2][:, index * 64 : index * 64 + k.shape[2]])
    mixed = mix(streams, ["high", "aggressive", "aggressive", "high"])
    assert inspect(mixed)["chunk_levels"] == ["high", "aggressive", "aggressive", "high"]
    assert len(streams["aggressive"]) < len(mixed) < len(streams["high"])
    lo, hi = decode_layers(streams["aggressive"]), decode_layers(mixed)
    assert torch.equal(lo[0][0][:, :, 64:192], hi[0][0][:, :, 64:192])


def test_levels_are_ordered_by_size():
    layers = real_like_layers(tokens=256)
    sizes = [len(encode(layers, level=name, rope=ROPE)) for name in LEVELS]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_round_trip(name):
    layers = real_like_layers(tokens=70, dtype=torch.float16)
    blob = encode_baseline(name, layers, chunk_tokens=32)
    decoded = decode_layers(blob)
    info = inspect(blob)
    assert info["scheme"] == name
    for (k, v, _), (k2, v2, _) in zip(layers, decoded):
        for x, y in ((k, k2), (v, v2)):
            err = (x.float() - y.float()).abs()
            peak = x.float().abs().amax(dim=(1, 3) if name == "lmcache" else 3, keepdim=True)
            tol = {"fp16": 1e-3 * x.float().abs() + 1e-6, "int8": peak / 127 + 1e-3 * peak,
                   "int8+zstd": peak / 127 + 1e-3 * peak, "lmcache": peak / 7 + 1e-2 * peak}[name]
            assert (err <= tol).all()
    expected = {"fp16": 16, "int8": 8, "int8+zstd": 0, "lmcache": 0}[name]
    assert info["bits_per_element"] >= expected


def test_kvlife_is_smaller_than_lmcache_on_real_like():
    layers = real_like_layers(tokens=512, rope=ROPE)
    assert len(encode(layers, level="balanced", rope=ROPE)) < len(encode_baseline("lmcache", layers))


def test_rope_round_trip_is_exact_up_to_float():
    from kvlife.codec.rope import rotate

    x = np.random.default_rng(0).standard_normal((2, 50, 16)).astype(np.float32)
    pos = np.broadcast_to(np.arange(1000, 1050), (2, 50))
    y = rotate(rotate(x.copy(), pos, ROPE, inverse=True), pos, ROPE, inverse=False)
    assert np.abs(x - y).max() < 1e-5


def test_channel_weights_shift_precision_and_keep_bound():
    layers = real_like_layers(tokens=128, rope=ROPE)
    rng = np.random.default_rng(1)
    weights = [(rng.uniform(0.01, 10, (2, 16)), rng.uniform(0.01, 10, (2, 16))) for _ in layers]
    blob = encode(layers, level="balanced", rope=ROPE, weights=weights)
    decoded = decode_layers(blob)
    assert_within_bound(layers, decoded, error_bound(blob))
    # the heaviest-weighted value channel is reconstructed more precisely than the lightest
    wv = weights[1][1][0]
    err = (decoded[1][1][0, 0] - layers[1][1][0, 0]).abs().mean(0)
    assert err[wv.argmax()] < err[wv.argmin()]


def test_batch_with_rope_and_weights():
    layers = random_layers(n_layers=2, batch=2, heads=2, tokens=33, dim=16, dtype=torch.bfloat16)
    weights = [(np.ones((2, 16)), np.ones((2, 16))) for _ in layers]
    blob = encode(layers, level="high", rope=ROPE, weights=weights, chunk_tokens=8)
    assert_within_bound(layers, decode_layers(blob), error_bound(blob))


def test_warm_up_codes_every_level_once_per_process(monkeypatch):
    from kvlife.codec import api

    monkeypatch.setattr(api, "_WARM", False)
    seen = []
    real = api.decode
    monkeypatch.setattr(api, "decode",
                        lambda blob: seen.append(api.inspect(blob)["chunk_levels"][0]) or real(blob))
    api.warm_up()
    assert sorted(seen) == sorted(api.LEVELS)
    api.warm_up()  # loaded already: nothing is coded again
    assert len(seen) == len(api.LEVELS)
