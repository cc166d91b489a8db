"""KIVI: packing, quantization error, the quantized layer's bookkeeping, bytes and rollback."""

from __future__ import annotations

import pytest
import torch

from kvlife.cache import KVLayer
from kvlife.errors import SpecError
from kvlife.methods.compress.kivi import KiviLayer, pack, quantize, unpack
from kvlife.recipe import parse
from kvlife.session import Session
from tiny import ByteTokenizer, tiny_model

KV_HEADS, HEAD_DIM = 2, 64


def dense_layer(n: int, dtype=torch.float32, seed: int = 0) -> KVLayer:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen)
    keys[..., 3] *= 20  # an outlier channel, as real keys have
    values = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen)
    layer = KVLayer()
    layer.update(keys.to(dtype), values.to(dtype))
    return layer


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_error_within_half_a_step(bits):
    x = torch.randn(4, 32, 16) * torch.linspace(0.1, 10, 16)
    codes, scale, low = quantize(x, bits, dim=1, dtype=torch.float32)
    assert int(codes.max()) < 1 << bits
    error = (codes.float() * scale + low - x).abs()
    assert bool((error <= scale / 2 + 1e-5).all())


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_layer_error_positions_and_residual(bits):
    layer = dense_layer(200)
    keys, values = layer.dense_kv()
    kivi = KiviLayer.from_layer(layer, bits=bits)
    assert kivi.key_codes.shape[2] == 160 and kivi.residual_keys.shape[2] == 40
    assert torch.equal(kivi.positions, layer.positions) and kivi.next_position == 200
    got_keys, got_values = kivi.dense_kv()
    assert torch.equal(got_keys[:, :, 160:], keys[:, :, 160:])  # the residual is exact
    # Keys: one step per (32-token group, channel); values: one per (token, 32-channel group).
    key_range = keys[:, :, :160].reshape(1, KV_HEADS, 5, 32, HEAD_DIM)
    key_step = (key_range.amax(3, keepdim=True) - key_range.amin(3, keepdim=True)) / ((1 << bits) - 1)
    key_error = (got_keys[:, :, :160] - keys[:, :, :160]).reshape(key_range.shape).abs()
    assert bool((key_error <= key_step / 2 + 1e-5).all())
    value_range = values[:, :, :160].reshape(1, KV_HEADS, 160, 2, 32)
    value_step = (value_range.amax(4, keepdim=True) - value_range.amin(4, keepdim=True)) / ((1 << bits) - 1)
    value_error = (got_values[:, :, :160] - values[:, :, :160]).reshape(value_range.shape).abs()
    assert bool((value_error <= value_step / 2 + 1e-5).all())


@pytest.mark.parametrize("bits, most", [(2, 0.25), (4, 0.37)])
def test_kivi_bytes_shrink_by_bits(bits, most):
    layer = dense_layer(1056, dtype=torch.float16)
    kivi = KiviLayer.from_layer(layer, bits=bits)
    n_quant, n_res = 1024, 32
    element = 2
    per_head = (2 * n_quant * HEAD_DIM * bits // 8  # packed key and value codes
                + 2 * (n_quant // 32) * HEAD_DIM * element  # key scale and minimum per group and channel
                + 2 * n_quant * (HEAD_DIM // 32) * element  # value scale and minimum per token and group
                + 2 * n_res * HEAD_DIM * element)  # the full-precision residual
    assert kivi.nbytes() == KV_HEADS * per_head
    assert kivi.nbytes() < most * layer.nbytes()


def test_kivi_decoding_quantizes_in_groups_and_rolls_back():
    layer = dense_layer(100)
    kivi = KiviLayer.from_layer(layer)
    state = kivi.checkpoint()
    snapshot = [t.clone() for t in kivi.dense_kv()]
    gen = torch.Generator().manual_seed(5)
    for step in range(70):
        new = torch.randn(1, KV_HEADS, 1, HEAD_DIM, generator=gen)
        keys, _ = kivi.update(new, new)
        assert torch.equal(keys[:, :, -1:], new)  # attention sees the new token exactly
        held = 101 + step
        assert kivi.next_position == held and kivi.get_seq_length() == held
        assert torch.equal(kivi.attn_positions, torch.arange(held).expand(KV_HEADS, -1))
        residual = kivi.residual_keys.shape[2]
        assert 32 <= residual < 64 and kivi.key_codes.shape[2] % 32 == 0
        assert kivi.key_codes.shape[2] + residual == held
    kivi.rollback(state)
    assert kivi.next_position == 100
    for got, want in zip(kivi.dense_kv(), snapshot):
        assert torch.equal(got, want)


def test_kivi_in_a_session_replaces_full_layers_only():
    context = "abcdefghij " * 20
    for kind in ("qwen2", "gemma3"):
        model = tiny_model(kind)
        errors = {}
        dense = Session(model, ByteTokenizer(), None, mode="multi-request", prompt_format="plain")
        dense.prefill(context)
        want = dense.forward(dense.format.query_ids("abc?"), phase="extend")
        for bits in (2, 4):
            session = Session(model, ByteTokenizer(), f"kivi(bits={bits})", mode="multi-request",
                              prompt_format="plain")
            session.prefill(context)
            for layer in session.cache.layers:
                assert isinstance(layer, KiviLayer) != layer.is_sliding
            got = session.forward(session.format.query_ids("abc?"), phase="extend")
            errors[bits] = float((got - want).abs().max())
        assert errors[4] < errors[2] < 0.2 * float(want.abs().max())


def test_kivi_takes_no_budget():
    with pytest.raises(SpecError):
        parse("kivi(ratio=0.5)")
    with pytest.raises(SpecError):
        parse("kivi(bits=3)")
    assert parse("kivi(bits=4)").compress.bits == 4
