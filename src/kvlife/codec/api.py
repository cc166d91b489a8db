"""Public entry points: encode / decode / decode_chunk / inspect / mix, for every scheme."""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kvlife.cache import KVCache
from kvlife.codec import baselines, kvlife_scheme
from kvlife.codec.format import (
    DEFAULT_MAX_BYTES,
    DTYPES,
    FLAG_CHANNEL_STEPS,
    FLAG_PRE_ROPE,
    MAGIC,
    SCHEMES,
    CodecError,
    Header,
    LayerShape,
    Positions,
    assemble,
    check_shapes,
    chunk_bytes,
    chunk_crc,
    parse_header,
)
from kvlife.codec.levels import DEFAULT_LEVEL, LEVEL_NAMES, LEVELS, Level
from kvlife.codec.rope import RopeSpec

BASELINES = ("fp16", "int8", "int8+zstd", "lmcache")
CUSTOM_LEVEL_ID = 255
_PREFIX = struct.Struct("<BBH")  # level id, exact tokens, reserved

_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_TORCH = {v: k for k, v in _TORCH_DTYPES.items()}

Layers = Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


# ---- input -----------------------------------------------------------------------------------------

def _collect(cache_or_layers: KVCache | Layers):
    """(numpy layers [(keys, values)] as float32 [B*H, T, D], positions [H, T], shapes, dtype, windows, next)."""
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
            raise CodecError(f"layer {index}: keys and values must both be [batch, kv_heads, tokens, head_dim]")
        if keys.dtype not in _TORCH_DTYPES or values.dtype != keys.dtype:
            raise CodecError(f"layer {index}: dtype {keys.dtype}/{values.dtype} is not float32, float16 or bfloat16")
        dtypes.add(_TORCH_DTYPES[keys.dtype])
        batch, heads, tokens, dim = keys.shape
        if pos is None:
            pos = torch.arange(tokens).expand(heads, tokens)
        if tuple(pos.shape) != (heads, tokens):
            raise CodecError(f"layer {index}: positions must be [kv_heads, tokens] = {[heads, tokens]}")
        shapes.append(LayerShape(batch, heads, dim, tokens, windows[index]))
        arrays.append(tuple(t.detach().to("cpu", torch.float32).reshape(batch * heads, tokens, dim).numpy() for t in (keys, values)))
        positions.append(pos.detach().to("cpu", torch.int64).numpy())
        for x in arrays[-1]:
            # max/min propagate NaN and show infinities without allocating a mask
            if x.size and not (np.isfinite(x.max()) and np.isfinite(x.min())):
                raise CodecError(f"layer {index}: the cache holds NaN or infinite values, which no scheme encodes")
    if len(dtypes) > 1:
        raise CodecError(f"all layers must share one dtype, got {sorted(dtypes)}")
    if next_position is None:
        next_position = max((int(p.max()) + 1 for p in positions if p.size), default=0)
    return arrays, positions, shapes, dtypes.pop(), next_position


def _level(level: str | Level) -> Level:
    if isinstance(level, Level):
        return level
    if level not in LEVELS:
        raise CodecError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    return LEVELS[level]


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
                floor = floors[li] if multipliers is None else floors[li] / multipliers[2 * li + k].min(axis=1)
                steps.append(np.maximum(alpha * rms[2 * li + k], floor))
        level_id = spec.id if LEVELS.get(spec.name) == spec else CUSTOM_LEVEL_ID
        chunks = []
        for index in range(header.n_chunks):
            body = kvlife_scheme.encode_chunk(header, means, steps, arrays, coded, index, exact, delta, multipliers)
            chunks.append(_PREFIX.pack(level_id, exact if index == 0 else 0, 0) + body)
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
                raise CodecError(f"layer {li}: weights must be finite, >= 0, of shape {(s.kv_heads, s.head_dim)}")
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
        chunks.append(_PREFIX.pack(0, 0, 0) + body)
    return assemble(header, chunks)


def _new_header(scheme, dtype, chunk_tokens, shapes, next_position, positions, rope, section) -> Header:
    return Header(
        scheme=scheme, dtype=dtype, chunk_tokens=chunk_tokens, layers=shapes, next_position=next_position,
        positions=Positions(shapes, arrays=positions), rope_theta=rope.theta if rope else 0.0,
        rotary_dim=rope.rotary_dim if rope else 0, flags=FLAG_PRE_ROPE if rope else 0, scheme_section=section,
    )


# ---- decode ----------------------------------------------------------------------------------------

def _means(header: Header) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The kvlife scheme section: channel means and (if flagged) per-channel step multipliers."""
    size = sum(2 * s.heads * s.head_dim for s in header.layers)
    with_steps = bool(header.flags & FLAG_CHANNEL_STEPS)
    if len(header.scheme_section) != (3 if with_steps else 2) * size:
        raise CodecError("the kvlife scheme section has the wrong size")
    flat = np.frombuffer(header.scheme_section, dtype="<f2", count=size)
    codes = np.frombuffer(header.scheme_section, dtype=np.uint8, offset=2 * size) if with_steps else None
    means, multipliers, offset = [], [] if with_steps else None, 0
    for s in header.layers:
        for _ in range(2):
            n = s.heads * s.head_dim
            means.append(flat[offset : offset + n].reshape(s.heads, s.head_dim))
            if with_steps:
                multipliers.append(kvlife_scheme.multiplier_values(codes[offset : offset + n].reshape(s.heads, s.head_dim)))
            offset += n
    return means, multipliers


def _decode_chunk_np(blob, header: Header, index: int, means=None, into=None):
    """(per present layer float32 (keys, values) [heads, n, dim], level name, steps or None).

    `into` (kvlife scheme): whole-stream arrays per layer that the chunk is decoded into in place.
    """
    part = chunk_bytes(blob, header, index)
    if len(part) < _PREFIX.size:
        raise CodecError(f"chunk {index} is truncated")
    level_id, exact, _ = _PREFIX.unpack(part[: _PREFIX.size])
    part = part[_PREFIX.size :]
    if header.scheme == "kvlife":
        if index > 0 and exact:
            raise CodecError(f"chunk {index} claims exact tokens; only chunk 0 may")
        if level_id not in LEVEL_NAMES and level_id != CUSTOM_LEVEL_ID:
            raise CodecError(f"chunk {index} has unknown level id {level_id}")
        means, multipliers = means if means is not None else _means(header)
    try:
        if header.scheme == "kvlife":
            layers, steps = kvlife_scheme.decode_chunk(header, means, part, index, exact, multipliers, into)
            return layers, LEVEL_NAMES.get(level_id, "custom"), steps
        if header.scheme == "lmcache":
            return baselines.decode_chunk_lmcache(header, part, index), None, None
        return baselines.decode_chunk_raw(header, part, index), None, None
    except MemoryError:
        raise CodecError(f"not enough memory to decode chunk {index} of this stream") from None


def _positions_tensor(positions: np.ndarray) -> torch.Tensor:
    """A tensor of its own (a header's counting positions are read-only broadcast views)."""
    if not (positions.flags.writeable and positions.flags.c_contiguous):
        positions = np.array(positions)
    return torch.from_numpy(positions)


def _to_torch(x: np.ndarray, shape: LayerShape, dtype: str) -> torch.Tensor:
    tokens = x.shape[1]
    return torch.from_numpy(np.ascontiguousarray(x)).reshape(shape.batch, shape.kv_heads, tokens, shape.head_dim).to(_DTYPE_TORCH[dtype])


def parse(blob: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> Header:
    """A whole stream's verified header, its claims checked against the bytes present.

    Beyond `parse_header`'s checks, every scheme's chunks have a least size for the shapes they claim
    (kvlife: a step per head and a sigma code per channel, a code then decoding to at most `chunk_tokens`
    values; fp16 and int8: every element), so a few bytes cannot claim a cache of gigabytes.
    """
    header = parse_header(blob, max_bytes)
    least = _PREFIX.size * header.n_chunks
    least += kvlife_scheme.least_bytes(header) if header.scheme == "kvlife" else baselines.least_bytes(header)
    if sum(header.chunk_lengths) < least:
        raise CodecError(f"the stream's chunks hold {sum(header.chunk_lengths)} bytes, fewer than the {least} its "
                         "shapes need at the least: it is truncated or its header is forged")
    return header


def _decode_whole(blob, header: Header) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (keys, values) float32 [B*H, T, D] of a parsed stream.

    Whole-stream arrays are made only once chunk 0 has decoded (checksum, layout and entropy section
    verified), so a forged stream fails before the decoder allocates what its header claims.
    """
    def empty(s: LayerShape) -> tuple[np.ndarray, np.ndarray]:
        return tuple(np.zeros((s.heads, 0, s.head_dim), np.float32) for _ in range(2))

    if header.n_chunks == 0:
        return [empty(s) for s in header.layers]
    try:
        if header.scheme != "kvlife":
            parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in header.layers]
            for index in range(header.n_chunks):
                layers, _, _ = _decode_chunk_np(blob, header, index)
                for li, pair in layers.items():
                    parts[li].append(pair)
            return [tuple(np.concatenate([p[k] for p in pieces], axis=1) for k in range(2)) if pieces else empty(s)
                    for s, pieces in zip(header.layers, parts)]
        means = _means(header)
        first, _, _ = _decode_chunk_np(blob, header, 0, means)
        if header.n_chunks == 1:
            return [first.get(li) or empty(s) for li, s in enumerate(header.layers)]
        # later chunks decode straight into whole-layer arrays: no per-chunk pieces to concatenate
        whole = [tuple(np.empty((s.heads, s.tokens, s.head_dim), np.float32) for _ in range(2)) for s in header.layers]
        for li, pair in first.items():
            for k in range(2):
                whole[li][k][:, : pair[k].shape[1]] = pair[k]
        for index in range(1, header.n_chunks):
            _decode_chunk_np(blob, header, index, means, into=whole)
        return whole
    except MemoryError:
        raise CodecError(f"not enough memory to decode this stream (it decodes to {header.elements() * 4 / 2**30:.1f} "
                         "GiB of float32 K/V); decode it chunk by chunk with decode_chunk") from None


def decode_layers(blob: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer (keys [B, H, T, D], values, positions [H, T]) in the stream's dtype."""
    return _layers(blob, parse(blob, max_bytes))


def _layers(blob, header: Header) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    whole = _decode_whole(blob, header)
    return [(_to_torch(keys, s, header.dtype), _to_torch(values, s, header.dtype),
             _positions_tensor(header.positions[li]))
            for li, (s, (keys, values)) in enumerate(zip(header.layers, whole))]


def decode(blob: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> KVCache:
    """Decode a whole stream (any scheme) back into a KVCache with its positions and windows."""
    header = parse(blob, max_bytes)
    return KVCache.from_tensors(_layers(blob, header), [s.window for s in header.layers], header.next_position)


def decode_chunk(blob: bytes, index: int, max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Decode chunk `index` alone: per layer (keys, values, positions) of its tokens, None where empty."""
    header = parse(blob, max_bytes)
    return _chunk_tensors(header, index, _decode_chunk_np(blob, header, index)[0])


def decode_chunk_part(header: Header, index: int, part: bytes,
                      crc: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Decode chunk `index` from its bytes alone, given its stream's parsed header (streaming: the header
    arrives once, chunks one by one, possibly from streams of several levels made by one `encode_levels`).

    `crc`: the chunk's checksum as its stream's chunk table records it (`format.chunk_crc`; default: the
    header's entry), checked before decoding.
    """
    if not 0 <= index < header.n_chunks:
        raise CodecError(f"chunk {index} does not exist (the stream has {header.n_chunks})")
    expected = header.chunk_crcs[index] if crc is None else crc
    if chunk_crc(part, header.version) != expected:
        raise CodecError(f"chunk {index} checksum mismatch: the chunk is corrupt")
    after = [0] * (header.n_chunks - index - 1)
    view = dataclasses.replace(header, chunk_lengths=[0] * index + [len(part)] + after,
                               chunk_crcs=[0] * index + [expected] + after, header_bytes=0)
    return _chunk_tensors(header, index, _decode_chunk_np(part, view, index)[0])


def _chunk_tensors(header: Header, index: int, layers) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    out = []
    for li, s in enumerate(header.layers):
        if li not in layers:
            out.append(None)
            continue
        start, stop = header.chunk_span(index, li)
        keys, values = layers[li]
        out.append((_to_torch(keys, s, header.dtype), _to_torch(values, s, header.dtype),
                    _positions_tensor(header.positions[li][:, start:stop])))
    return out


def error_bound(blob: bytes, index: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (key bound [B*H], value bound [B*H]): the largest |decoded - original| per element the
    kvlife scheme allows in chunk `index` (or over all chunks), before rounding to the stream dtype."""
    header = parse(blob)
    if header.scheme != "kvlife":
        raise CodecError(f"error_bound is defined for the kvlife scheme, not {header.scheme}")
    bounds = [(np.zeros(s.heads), np.zeros(s.heads)) for s in header.layers]
    key_factor = math.sqrt(2) / 2 if header.pre_rope else 0.5
    _, multipliers = _means(header)
    widest = [m.max(axis=1) for m in multipliers] if multipliers else [np.ones(s.heads) for s in header.layers for _ in range(2)]
    for i in range(header.n_chunks) if index is None else [index]:
        _, _, steps = _decode_chunk_np(blob, header, i)
        offset = 0
        for li, s in enumerate(header.layers):
            start, stop = header.chunk_span(i, li)
            if start == stop:
                continue
            kb, vb = bounds[li]
            np.maximum(kb, steps[offset : offset + s.heads] * widest[2 * li] * key_factor, out=kb)
            np.maximum(vb, steps[offset + s.heads : offset + 2 * s.heads] * widest[2 * li + 1] * 0.5, out=vb)
            offset += 2 * s.heads
    # float32 arithmetic in the decoder adds a few ulps of the largest value
    return bounds


# ---- streams of several levels ---------------------------------------------------------------------

def mix(streams: Mapping[str, bytes], choice: Sequence[str]) -> bytes:
    """A stream whose chunk i is chunk i of `streams[choice[i]]` (streams from one `encode_levels`)."""
    headers = {name: parse(blob) for name, blob in streams.items()}
    first = next(iter(headers.values()))
    for name, h in headers.items():
        same = (h.version, h.scheme, h.dtype, h.chunk_tokens, h.layers, h.flags, h.rope_theta, h.rotary_dim, h.scheme_section,
                h.next_position) == (first.version, first.scheme, first.dtype, first.chunk_tokens, first.layers, first.flags,
                                     first.rope_theta, first.rotary_dim, first.scheme_section, first.next_position)
        if not same or h.positions != first.positions:
            raise CodecError(f"stream {name!r} does not share the others' header; encode them with encode_levels")
    if len(choice) != first.n_chunks:
        raise CodecError(f"choice names {len(choice)} chunks, the streams have {first.n_chunks}")
    chunks = []
    for index, name in enumerate(choice):
        if name not in streams:
            raise CodecError(f"no stream named {name!r}")
        chunks.append(bytes(chunk_bytes(streams[name], headers[name], index)))
    return assemble(first, chunks)


# ---- inspect ---------------------------------------------------------------------------------------

_WARM = False


def warm_up() -> None:
    """Load the codec's compiled kernels now (once per process) by coding a tiny cache at every level.

    They are numba functions: the first call of each in a process takes ~0.4 s in all, loading them from
    numba's on-disk cache (several seconds on a fresh install, which compiles them), and holds the GIL
    while it does. A streaming client warms up when it is made, so that this is not paid inside a deadline
    (measured: the first chunk of a fetch took 0.5 s to decode instead of 0.02 s, and the fetching thread,
    starved of the GIL meanwhile, measured a link 4x slower than it was)."""
    global _WARM
    if _WARM:
        return
    generator = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(1, 2, 32, 64, generator=generator) for _ in range(2))
    streams = encode_levels([(keys, values, None)], list(LEVELS), 16, RopeSpec(10000.0, 64))
    for blob in streams.values():
        decode(blob)
    _WARM = True


def inspect(blob: bytes) -> dict[str, Any]:
    """What a stream holds: scheme, dtype, shapes, rope, chunk sizes and levels, bits per element."""
    header = parse(blob)
    levels = []
    for index in range(header.n_chunks):
        part = chunk_bytes(blob, header, index)
        level_id = part[0] if len(part) else 0
        levels.append(LEVEL_NAMES.get(level_id, "custom") if header.scheme == "kvlife" else None)
    elements = header.elements()
    return {
        "format": f"{MAGIC.decode()}/{header.version}",
        "scheme": header.scheme,
        "dtype": header.dtype,
        "layers": len(header.layers),
        "shapes": [
            {"batch": s.batch, "kv_heads": s.kv_heads, "head_dim": s.head_dim, "tokens": s.tokens, "window": s.window}
            for s in header.layers
        ],
        "next_position": header.next_position,
        "rope": {"theta": header.rope_theta, "rotary_dim": header.rotary_dim} if header.pre_rope else None,
        "chunk_tokens": header.chunk_tokens,
        "chunks": header.n_chunks,
        "chunk_bytes": header.chunk_lengths,
        "chunk_levels": levels,
        "header_bytes": header.header_bytes,
        "total_bytes": len(blob),
        "elements": elements,
        "bits_per_element": 8 * len(blob) / elements if elements else 0.0,
    }


__all__ = [
    "BASELINES", "DTYPES", "SCHEMES", "decode", "decode_chunk", "decode_chunk_part", "decode_layers", "encode", "encode_baseline",
    "encode_levels", "error_bound", "inspect", "mix",
]
