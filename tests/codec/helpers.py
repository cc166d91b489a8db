"""Synthetic caches for codec tests: random, and 'real-like' (bias channels, outliers, a sink token)."""

from __future__ import annotations

import numpy as np
import torch

from kvlife.codec import RopeSpec
from kvlife.codec.rope import rotate

DTYPE_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def random_layers(n_layers=2, batch=1, heads=2, tokens=37, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, heads, tokens, dim, generator=g).to(dtype),
            torch.randn(batch, heads, tokens, dim, generator=g).to(dtype),
            None,
        )
        for _ in range(n_layers)
    ]


def real_like_layers(n_layers=3, heads=2, tokens=301, dim=16, dtype=torch.float32, seed=0, rope=None):
    """Keys with a constant per-channel bias (rotated by RoPE if given), outlier channels and a sink."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(n_layers):
        keys = rng.standard_normal((heads, tokens, dim)).astype(np.float32)
        keys += rng.standard_normal((heads, 1, dim)).astype(np.float32) * 8  # k_proj bias
        keys[:, :, : 2] *= 6  # outlier channels
        values = rng.standard_normal((heads, tokens, dim)).astype(np.float32) * 0.5
        keys[:, 0] *= 20  # attention sink
        values[:, 0] *= 10
        for t in range(1, tokens):  # some token-to-token correlation
            keys[:, t] = 0.3 * keys[:, t - 1] + 0.7 * keys[:, t]
        if rope is not None:
            positions = np.broadcast_to(np.arange(tokens), (heads, tokens))
            keys = rotate(keys, positions, rope, inverse=False)
        layers.append((torch.from_numpy(keys)[None].to(dtype), torch.from_numpy(values)[None].to(dtype),
                       None))
    return layers


def assert_within_bound(original, decoded, bounds):
    """|decoded - original| <= bound + the output dtype's rounding, per (layer, K/V, head)."""
    for (k, v, _), (k2, v2, _), (kb, vb) in zip(original, decoded, bounds):
        assert k2.shape == k.shape and v2.shape == v.shape and k2.dtype == k.dtype
        eps = DTYPE_EPS[k.dtype]
        for x, y, bound in ((k, k2, kb), (v, v2, vb)):
            b, h, t, d = x.shape
            x32, y32 = x.float().reshape(b * h, t, d), y.float().reshape(b * h, t, d)
            allowed = torch.as_tensor(bound, dtype=torch.float32)[:, None, None] * (1 + 1e-5)
            if x32.numel():
                allowed = allowed + (x32.abs() + allowed) * eps * 2 + 1e-6 * float(x32.abs().max())
            assert ((x32 - y32).abs() <= allowed).all(), float((x32 - y32).abs().max())


ROPE = RopeSpec(10000.0, 16)
