"""Undo and redo rotary position embeddings (RoPE) on cached keys.

Caches hold keys after RoPE. Before RoPE, a key's constant part (Qwen2's k_proj bias, outlier
channels) is a constant per channel, which the codec's per-channel mean removes; after RoPE it is a
sinusoid over positions that costs bits in every token. The codec can therefore code keys
un-rotated and rotate them back after decoding, when the caller names the model's RoPE (only the
plain "default" RoPE of Llama/Qwen/Mistral, `rotate_half` layout, is supported; other variants are
coded post-RoPE). The angles are computed as transformers does (float32), so un-rotation matches
the model's own rotation closely; the decoder uses the same angles, so the round trip is exact up
to the quantization error, which the rotation does not grow beyond a factor sqrt(2) per element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit


@dataclass(frozen=True)
class RopeSpec:
    """RoPE parameters: base `theta` and the number of leading head dims it rotates (`rotary_dim`)."""

    theta: float
    rotary_dim: int


def rope_from_config(config: Any) -> RopeSpec | None:
    """The RoPE of a transformers config (or its dict), or None if it is absent or not plain RoPE."""
    if isinstance(config, dict):
        get = config.get
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        def get(name, default=None):
            return getattr(text, name, default)
    params = get("rope_parameters") or get("rope_scaling") or {}
    if isinstance(params, dict) and "full_attention" in params:  # per layer-type parameters
        params = params["full_attention"]
    kind = (params or {}).get("rope_type", (params or {}).get("type", "default"))
    theta = (params or {}).get("rope_theta", get("rope_theta"))
    if kind != "default" or not theta:
        return None
    head_dim = get("head_dim") or (get("hidden_size") // get("num_attention_heads"))
    partial = (params or {}).get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) or 1.0
    rotary_dim = int(head_dim * partial)
    return RopeSpec(float(theta), rotary_dim - rotary_dim % 2)


def cos_sin(positions: np.ndarray, spec: RopeSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape [heads, tokens, rotary_dim // 2] (float32, as transformers computes them)."""
    even = np.arange(0, spec.rotary_dim, 2, dtype=np.int64).astype(np.float32)
    exponent = even / np.float32(spec.rotary_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(spec.theta), exponent)).astype(np.float32)
    angles = positions.astype(np.float32)[..., None] * inv_freq
    return np.cos(angles), np.sin(angles)


def rotate(keys: np.ndarray, positions: np.ndarray, spec: RopeSpec, inverse: bool, angles=None) -> np.ndarray:
    """Apply (or undo, `inverse=True`) RoPE on keys [heads, tokens, head_dim] in place; returns keys.

    `positions` is [heads, tokens] (or broadcastable to it); `angles` may pass `cos_sin(positions,
    spec)` when the caller already has it (layers usually share positions).
    """
    cos, sin = angles if angles is not None else cos_sin(positions, spec)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    if keys.dtype != np.float32 or cos.shape[1] != keys.shape[1]:
        raise ValueError("rotate needs float32 keys [heads, tokens, dim] and angles for every token")
    _rotate(keys, np.ascontiguousarray(cos, dtype=np.float32), np.ascontiguousarray(sin, dtype=np.float32),
            spec.rotary_dim, -1.0 if inverse else 1.0)
    return keys


@njit(cache=True, nogil=True, boundscheck=False)
def _rotate(keys, cos, sin, rotary_dim, sign):
    # rotate_half layout: dims d and d + half form a pair; sign -1 undoes the rotation
    heads, tokens, _ = keys.shape
    half = rotary_dim // 2
    sign = np.float32(sign)
    for h in range(heads):
        angle = h if cos.shape[0] > 1 else 0
        for t in range(tokens):
            for d in range(half):
                c = cos[angle, t, d]
                s = sin[angle, t, d] * sign
                first = keys[h, t, d]
                second = keys[h, t, d + half]
                keys[h, t, d] = first * c - second * s
                keys[h, t, d + half] = second * c + first * s
