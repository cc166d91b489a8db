"""Encoding: a cache (a KVCache or per-layer tensors) into a stream, with the kvlife scheme at one
or several levels (`encode`, `encode_levels`) or with a baseline scheme (`encode_baseline`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvlife.cache import KVCache
from kvlife.codec import baselines, kvlife_scheme
from kvlife.codec.format import (
    CHUNK_PREFIX,
    CUSTOM_LEVEL_ID,
    FLAG_CHANNEL_STEPS,
    FLAG_PRE_ROPE,
    CodecError,
    Header,
    LayerShape,
    Positions,
    assemble,
    check_shapes,
)
from kvlife.codec.levels import DEFAULT_LEVEL, LEVELS, OTHER_LEVELS, Level, named_level
from kvlife.codec.rope import RopeSpec

BASELINES = ("fp16", "int8", "int8+zstd", "lmcache")

_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

Layers = Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


# ---- input -----------------------------------------------------------------------------------------

def _collect(cache_or_layers: KVCache | Layers):
    """(numpy layers [(keys, values)] as float32 [B*H, T, D], positions [H, T], shapes, dtype, windows,
    next position)."""
    if isinstance(cache_or_layers, KVCache):
        layers = cache_or_layers.to_tensors()
        windows = [layer.sliding_window for layer in cache_or_layers.layers]
        next_position = cache_or_layers.next_position
    else:
        layers = list(cache_or_layers)
        windows = [None] * len(layers)
        next_position = None
    if not layers:
        raise CodecError("nothing to encode: the cache has no layers")
    dtypes = set()
    arrays, positions, shapes = [], [], []
    for index, layer in enumerate(layers):
        if len(layer) != 3:
            raise CodecError(f"layer {index}: expected (keys, values, positions)")
        keys, values, pos = layer
        if keys is None or keys.dim() != 4 or values.shape != keys.shape:
            raise CodecError(f"layer {index}: keys and values must both be "
                             "[batch, kv_heads, tokens, head_dim]")
        if keys.dtype not in _TORCH_DTYPES or values.dtype != keys.dtype:
            raise CodecError(f"layer {index}: dtype {keys.dtype}/{values.dtype} is not float32, float16 "
                             "or bfloat16")
        dtypes.add(_TORCH_DTYPES[keys.dtype])
        batch, heads, tokens, dim = keys.shape
        if pos is None:
            pos = torch.arange(tokens).expand(heads, tokens)
        if tuple(pos.shape) != (heads, tokens):
            raise CodecError(f"layer {index}: positions must be [kv_heads, tokens] = {[heads, tokens]}")
        shapes.append(LayerShape(batch, heads, dim, tokens, windows[index]))
        arrays.append(tuple(t.detach().to("cpu", torch.float32).reshape(batch * heads, tokens, dim).numpy()
                            for t in (keys, values)))
        positions.append(pos.detach().to("cpu", torch.int64).numpy())
        for x in arrays[-1]:
            # max/min propagate NaN and show infinities without allocating a mask
            if x.size and not (np.isfinite(x.max()) and np.isfinite(x.min())):
                raise CodecError(f"layer {index}: the cache holds NaN or infinite values, "
                                 "which no scheme encodes")
    if len(dtypes) > 1:
        raise CodecError(f"all layers must share one dtype, got {sorted(dtypes)}")
    if next_position is None:
        next_position = max((int(p.max()) + 1 for p in positions if p.size), default=0)
    return arrays, positions, shapes, dtypes.pop(), next_position


def _level(level: str | Level) -> Level:
    if isinstance(level, Level):
        return level
    found = named_level(level)
    if found is None:
        raise CodecError(f"unknown level {level!r}; choose one of {', '.join([*LEVELS, *OTHER_LEVELS])}")
    return found


# ---- encode ----------------------------------------------------------------------------------------

def encode(
    cache_or_layers: KVCache | Layers,
    level: str | Level = DEFAULT_LEVEL,
    chunk_tokens: int = 256,
    rope: RopeSpec | None = None,
    delta: str = "auto",
    weights: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> bytes:
    """Encode a cache with the kvlife scheme at a named level (see `levels.LEVELS`).

    `rope`: the model's RoPE (`rope_from_config(model.config)`); when given, keys are coded before
    RoPE and rotated back on decode, which is smaller for models whose keys have a constant part.
    `delta`: "auto" (anchor-delta coding per layer and K/V where it estimates smaller) or "off".
    `weights`: per layer (key, value) channel importance [kv_heads, head_dim] from
    `calibrate.channel_weights` (a once-per-model profile); steps then follow 1/sqrt(weight) inside
    each head. The stream stores the resulting multipliers, so decoding needs no profile.
    """
    return encode_levels(cache_or_layers, [level], chunk_tokens, rope, delta, weights)[_level(level).name]


def encode_levels(
    cache_or_layers: KVCache | Layers,
    levels: Sequence[str | Level],
    chunk_tokens: int = 256,
    rope: RopeSpec | None = None,
    delta: str = "auto",
    weights: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, bytes]:
    """One stream per level, sharing one header layout so `mix` can combine their chunks."""
    if delta not in ("auto", "off"):
        raise CodecError(f"delta must be 'auto' or 'off', not {delta!r}")
    arrays, positions, shapes, dtype, next_position = _collect(cache_or_layers)
    check_shapes(shapes, chunk_tokens)
    specs = [_level(level) for level in levels]
    exact = max((s.exact_tokens for s in specs), default=0)
    if any(s.exact_tokens != exact for s in specs):
        raise CodecError("levels mixed in one call must keep the same number of exact tokens")
    if exact > 255:
        raise CodecError("at most 255 exact tokens")
    if rope is not None:
        if not (1.0 < rope.theta < 1e30 and rope.rotary_dim >= 2 and rope.rotary_dim % 2 == 0):
            raise CodecError(f"invalid RoPE parameters {rope}")
        if any(rope.rotary_dim > s.head_dim for s in shapes):
            raise CodecError(f"rotary_dim {rope.rotary_dim} exceeds a layer's head_dim")
    coded = kvlife_scheme.unrope_keys(arrays, positions, rope)
    means, rms, peaks = kvlife_scheme.channel_stats(coded, exact)
    section = b"".join(m.astype("<f2").tobytes() for m in means)
    # |x - mean| <= 2 peak (of the coded layer), so this floor keeps every symbol below 2^27 in
    # magnitude; it only binds on (near-)constant heads.
    floors = [max(peak * 2.0**-26, 1e-30) for peak in peaks]
    multipliers = None
    if weights is not None:
        codes = _weight_codes(weights, shapes, rms)
        multipliers = [kvlife_scheme.multiplier_values(c) for c in codes]
        section += b"".join(c.tobytes() for c in codes)
    out = {}
    for spec in specs:
        header = _new_header("kvlife", dtype, chunk_tokens, shapes, next_position, positions, rope, section)
        if multipliers is not None:
            header.flags |= FLAG_CHANNEL_STEPS
        steps = []
        for li in range(len(shapes)):
            for k, kind in enumerate("kv"):
                alpha = spec.alpha(kind, li, len(shapes))
                floor = floors[li]
                if multipliers is not None:
                    floor = floor / multipliers[2 * li + k].min(axis=1)
                steps.append(np.maximum(alpha * rms[2 * li + k], floor))
        level_id = spec.id if named_level(spec.name) == spec else CUSTOM_LEVEL_ID
        chunks = []
        for index in range(header.n_chunks):
            body = kvlife_scheme.encode_chunk(header, means, steps, arrays, coded, index, exact, delta,
                                              multipliers)
            chunks.append(CHUNK_PREFIX.pack(level_id, exact if index == 0 else 0, 0) + body)
        out[spec.name] = assemble(header, chunks)
    return out


WEIGHT_MODE = "head"


def _weight_codes(weights, shapes: list[LayerShape], rms) -> list[np.ndarray]:
    """uint8 multiplier codes per (layer, kind) [heads, head_dim] from channel importance weights."""
    if len(weights) != len(shapes):
        raise CodecError(f"weights cover {len(weights)} layers, the cache has {len(shapes)}")
    raw = []
    for li, (pair, s) in enumerate(zip(weights, shapes)):
        for k in range(2):
            w = np.asarray(pair[k], dtype=np.float64)
            if w.shape != (s.kv_heads, s.head_dim) or not np.isfinite(w).all() or (w < 0).any():
                raise CodecError(f"layer {li}: weights must be finite, >= 0, "
                                 f"of shape {(s.kv_heads, s.head_dim)}")
            w = np.tile(w, (s.batch, 1))
            inv = 1.0 / np.sqrt(np.maximum(w, w.max(initial=0) * 1e-6 + 1e-30))
            raw.append(inv)
    out = []
    if WEIGHT_MODE == "head":
        for inv in raw:
            out.append(inv / np.exp(np.log(inv).mean(axis=1, keepdims=True)))
    else:  # global: absolute 1/sqrt(w) over all heads of a kind, relative to each head's RMS step
        for k in range(2):
            rel = [raw[2 * li + k] / np.maximum(rms[2 * li + k], 1e-30)[:, None] for li in range(len(shapes))]
            norm = np.exp(np.mean(np.concatenate([np.log(r).ravel() for r in rel])))
            for li in range(len(shapes)):
                raw[2 * li + k] = rel[li] / norm
        out = raw
    return [kvlife_scheme.multiplier_codes(m) for m in out]


def encode_baseline(
    name: str, cache_or_layers: KVCache | Layers, chunk_tokens: int = 256, level: str = "default"
) -> bytes:
    """Encode with a baseline scheme: "fp16", "int8", "int8+zstd" or "lmcache" (see `baselines`).

    `level` applies to lmcache only: "default" (LMCache's bins), "fine" (x2 bins) or "coarse" (/2).
    """
    if name not in BASELINES:
        raise CodecError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    if level not in baselines.LMCACHE_LEVELS or (name != "lmcache" and level != "default"):
        raise CodecError(f"unknown level {level!r} for baseline {name}")
    arrays, positions, shapes, dtype, next_position = _collect(cache_or_layers)
    check_shapes(shapes, chunk_tokens)
    section = baselines.pack_bins(*baselines.lmcache_bins(len(shapes), level)) if name == "lmcache" else b""
    header = _new_header(name, dtype, chunk_tokens, shapes, next_position, positions, None, section)
    chunks = []
    for index in range(header.n_chunks):
        if name == "lmcache":
            body = baselines.encode_chunk_lmcache(header, arrays, index)
        else:
            body = baselines.encode_chunk_raw(header, arrays, index)
        chunks.append(CHUNK_PREFIX.pack(0, 0, 0) + body)
    return assemble(header, chunks)


def _new_header(scheme, dtype, chunk_tokens, shapes, next_position, positions, rope, section) -> Header:
    return Header(
        scheme=scheme, dtype=dtype, chunk_tokens=chunk_tokens, layers=shapes, next_position=next_position,
        positions=Positions(shapes, arrays=positions), rope_theta=rope.theta if rope else 0.0,
        rotary_dim=rope.rotary_dim if rope else 0, flags=FLAG_PRE_ROPE if rope else 0, scheme_section=section,
    )

