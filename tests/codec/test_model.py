"""The codec on a real (tiny, random) transformers model: RoPE from its config, calibration, logits."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvlife.cache import KVCache, cache_kwarg
from kvlife.codec import decode, encode, rope_from_config
from kvlife.codec.calibrate import channel_weights, load_weights, save_weights


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def test_rope_from_config(tiny):
    rope = rope_from_config(tiny.config)
    assert rope is not None and rope.rotary_dim == 16 and rope.theta > 0
    assert rope_from_config({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}, "hidden_size": 8,
                             "num_attention_heads": 1}) is None


@torch.no_grad()
def test_decoded_cache_reproduces_logits(tiny, tmp_path):
    ids = torch.randint(0, 128, (1, 90))
    cache = KVCache.for_model(tiny)
    tiny(ids[:, :80], **cache_kwarg(tiny, cache))
    layers = [(k.clone(), v.clone(), p.clone()) for k, v, p in cache.to_tensors()]
    reference = tiny(ids[:, 80:], **cache_kwarg(tiny, KVCache.from_tensors(layers))).logits
    weights = channel_weights(tiny, ids[:, :64])
    save_weights(tmp_path / "w.npz", weights)
    weights = load_weights(tmp_path / "w.npz")
    assert len(weights) == 2 and weights[0][0].shape == (2, 16) and (weights[0][0] > 0).all()
    for level, tolerance in (("lossless-ish", 1e-2), ("balanced", 0.5)):
        blob = encode(cache, level=level, rope=rope_from_config(tiny.config), weights=weights,
                      chunk_tokens=32)
        decoded = decode(blob)
        assert decoded.next_position == 80
        logits = tiny(ids[:, 80:], **cache_kwarg(tiny, decoded)).logits
        assert (logits - reference).abs().max() < tolerance
    assert np.isfinite(weights[1][1]).all()
