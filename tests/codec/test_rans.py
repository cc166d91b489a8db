"""kvlife's rANS coder (format version 2): exact round trips, table construction, and bad bytes."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlife.codec import CodecError, decode_layers, encode, entropy, error_bound, inspect, mix, rans
from kvlife.codec.format import parse_header

from .helpers import ROPE, assert_within_bound, real_like_layers


def _segments(seed, shapes, scale):
    rng = np.random.default_rng(seed)
    segments = []
    for rows_count, n in shapes:
        sigma = rng.uniform(0.05, scale, rows_count)
        rows = np.rint(rng.standard_t(3, (rows_count, n)) * sigma[:, None]).astype(np.int32)
        rms = np.sqrt((rows.astype(np.float64) ** 2).mean(axis=1)) if n else np.zeros(rows_count)
        segments.append((rows, entropy.sigma_codes(rms)))
    return segments


@pytest.mark.parametrize("scale", [0.3, 2.0, 50.0, 1e4, 1e7])
def test_round_trip_is_exact(scale):
    segments = _segments(int(scale), [(40, 255), (9, 1), (13, 256), (0, 7), (5, 0)], scale)
    segments[0][0][3, 5] = 2**31 - 1  # escapes of any int32
    segments[0][0][4, 6] = -(2**31)
    blob = entropy.encode(segments)
    decoded = entropy.decode(blob, [(codes, rows.shape[1]) for rows, codes in segments])
    for (rows, _), out in zip(segments, decoded):
        assert out.shape == rows.shape and np.array_equal(out, rows)


def test_codes_that_disagree_with_the_data_still_round_trip():
    # the sigma code only picks a table: a wrong one costs bits (escapes), never correctness
    rows = np.random.default_rng(1).integers(-5000, 5000, (6, 33)).astype(np.int32)
    for code in (0, 64, 255):
        codes = np.full(6, code, np.uint8)
        blob = entropy.encode([(rows, codes)])
        assert np.array_equal(entropy.decode(blob, [(codes, 33)])[0], rows)


def test_every_code_has_a_table_that_fits_the_lookup():
    codes = np.arange(256)
    entropy._BANK.need(codes)
    for code in codes:
        shift, radius, weights = entropy.table_weights(int(code), entropy.TABLE_SIGMA_V2)
        assert 2 * radius + 2 == len(weights) <= rans.MAX_SYMBOLS
        freq = entropy._BANK.freqs[code, : len(weights)]
        assert freq.sum() == rans.PROB_SCALE and freq.min() >= 1


def test_quantize_is_exact_and_rejects_oversized_tables():
    freq = rans.quantize(np.array([1, 10**9, 3, 7]))
    assert freq.sum() == rans.PROB_SCALE and freq.min() == 1 and freq.argmax() == 1
    cum, lut = rans.tables(freq)
    assert cum[-1] == rans.PROB_SCALE and len(lut) == rans.PROB_SCALE
    assert ((lut & 0xFF) == np.repeat(np.arange(4), freq)).all()
    with pytest.raises(ValueError):
        rans.quantize(np.ones(rans.MAX_SYMBOLS + 1, dtype=np.int64))


def test_sizes_near_the_entropy():
    rng = np.random.default_rng(3)
    rows = np.rint(rng.standard_normal((64, 256)) * 2.0).astype(np.int32)
    codes = entropy.sigma_codes(np.sqrt((rows.astype(np.float64) ** 2).mean(axis=1)))
    values, counts = np.unique(rows, return_counts=True)
    p = counts / counts.sum()
    empirical_bits = float(-(counts * np.log2(p)).sum())
    bits = 8 * len(entropy.encode([(rows, codes)]))
    assert empirical_bits < bits < 1.05 * empirical_bits


SEGMENT_SHAPES = [(8, 31), (3, 2)]
GOOD = _segments(5, SEGMENT_SHAPES, 4.0)
GOOD_SHAPES = [(codes, rows.shape[1]) for rows, codes in GOOD]
GOOD_BLOB = entropy.encode(GOOD)


def _decodes_or_raises(blob):
    try:
        out = entropy.decode(blob, GOOD_SHAPES)
    except CodecError as exc:
        assert "entropy-coded section" in str(exc)
        return None
    assert [o.shape for o in out] == [(8, 31), (3, 2)]
    return out


def test_every_truncation_of_a_section_raises():
    for cut in range(len(GOOD_BLOB)):
        with pytest.raises(CodecError):
            entropy.decode(GOOD_BLOB[:cut], GOOD_SHAPES)
    with pytest.raises(CodecError):
        entropy.decode(GOOD_BLOB + b"\0\0", GOOD_SHAPES)


def test_flipped_bits_in_a_section_are_caught_or_harmless():
    caught = 0
    for position in range(len(GOOD_BLOB) * 8):
        bad = bytearray(GOOD_BLOB)
        bad[position // 8] ^= 1 << (position % 8)
        caught += _decodes_or_raises(bytes(bad)) is None
    # the codec's CRCs catch every flip before this decoder runs; on its own the final-state
    # check still catches nearly all of them
    assert caught > 0.9 * len(GOOD_BLOB) * 8


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_sections_never_crash(blob):
    _decodes_or_raises(blob)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 255), st.integers(1, 300))
def test_fuzz_random_codes_and_shapes_never_crash(words, code, n):
    try:
        out = entropy.decode(words, [(np.full(3, code, np.uint8), n)])
    except CodecError:
        return
    assert out[0].shape == (3, n)


def test_version_3_streams_and_delta_coding_round_trip():
    # strongly correlated tokens make the encoder pick anchor-delta coding
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.standard_normal((1, 2, 300, 16)) * 0.05, axis=2).astype(np.float32) + 1.0
    layers = [(torch.from_numpy(walk), torch.from_numpy(walk * 2), None)]
    blob = encode(layers, level="high", chunk_tokens=128)
    assert parse_header(blob).version == 3 and inspect(blob)["format"] == "KVLC/3"
    assert len(blob) < len(encode(layers, level="high", chunk_tokens=128, delta="off"))
    assert_within_bound(layers, decode_layers(blob), error_bound(blob))


def test_pre_rope_keys_with_partial_rotation_round_trip():
    layers = real_like_layers(n_layers=2, dim=16, tokens=77)
    rope = type(ROPE)(ROPE.theta, 8)  # only the first 8 of 16 dims rotate
    blob = encode(layers, level="lossless-ish", chunk_tokens=32, rope=rope)
    assert_within_bound(layers, decode_layers(blob), error_bound(blob))


DATA = __import__("pathlib").Path(__file__).parent / "data"


@pytest.mark.parametrize("level", ["lossless-ish", "balanced", "extreme"])
def test_version_1_streams_still_decode(level):
    # written by kvlife before format version 2 (constriction's ANS); stored caches stay readable
    blob = (DATA / f"v1-{level}.kvc").read_bytes()
    assert inspect(blob)["format"] == "KVLC/1"
    expected = np.load(DATA / f"v1-{level}.npz")
    decoded = decode_layers(blob)
    for li, (keys, values, _) in enumerate(decoded):
        for kind, x in ((0, keys), (1, values)):
            np.testing.assert_allclose(x.numpy(), expected[f"{li}_{kind}"], rtol=1e-6, atol=1e-6)


def test_mix_refuses_streams_of_two_versions():
    blob_v1 = (DATA / "v1-balanced.kvc").read_bytes()
    header = parse_header(blob_v1)
    layers = [(keys, values, positions) for keys, values, positions in decode_layers(blob_v1)]
    blob_v2 = encode(layers, level="extreme", chunk_tokens=header.chunk_tokens)
    with pytest.raises(CodecError, match="share"):
        mix({"a": blob_v1, "b": blob_v2}, ["a", "b", "a"])


def test_rotate_matches_the_rotate_half_formula():
    from kvlife.codec.rope import cos_sin, rotate

    rng = np.random.default_rng(2)
    keys = rng.standard_normal((3, 21, 16)).astype(np.float32)
    positions = np.stack([np.arange(21) + 7 * h for h in range(3)])
    spec = type(ROPE)(ROPE.theta, 12)
    cos, sin = cos_sin(positions, spec)
    first, second = keys[..., :6], keys[..., 6:12]
    expected = keys.copy()
    expected[..., :6] = first * cos - second * sin
    expected[..., 6:12] = second * cos + first * sin
    rotated = rotate(keys.copy(), positions, spec, inverse=False)
    np.testing.assert_allclose(rotated, expected, rtol=1e-6, atol=1e-6)


def test_channel_stats_match_numpy():
    from kvlife.codec.kvlife_scheme import channel_stats

    rng = np.random.default_rng(4)
    pair = tuple(rng.standard_normal((2, 30, 8)).astype(np.float32) * 3 + 1 for _ in range(2))
    means, rms, peaks = channel_stats([pair], exact_tokens=1)
    for x, mean, head_rms in zip(pair, means, rms):
        body = x[:, 1:].astype(np.float64)
        np.testing.assert_allclose(mean, body.mean(axis=1).astype(np.float16))
        centred = body - mean.astype(np.float64)[:, None, :]
        np.testing.assert_allclose(head_rms, np.sqrt((centred**2).mean(axis=(1, 2))), rtol=1e-9)
    assert peaks == [max(float(np.abs(x).max()) for x in pair)]
