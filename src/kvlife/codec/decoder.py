"""Decoding: a stream (any scheme) back into a KVCache, into per-layer tensors, or one chunk at a
time (`decode_chunk`, and `decode_chunk_part` from a chunk's bytes alone); `parse` checks a header
against the bytes present; `error_bound` gives the kvlife scheme's largest error per head."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from kvlife.cache import KVCache
from kvlife.codec import baselines, kvlife_scheme
from kvlife.codec.format import (
    CHUNK_PREFIX,
    CUSTOM_LEVEL_ID,
    DEFAULT_MAX_BYTES,
    FLAG_CHANNEL_STEPS,
    CodecError,
    Header,
    LayerShape,
    chunk_bytes,
    chunk_crc,
    parse_header,
)
from kvlife.codec.levels import LEVEL_NAMES

_DTYPE_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys [B, H, T, D], values, positions [H, T]


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
                layer_codes = codes[offset : offset + n].reshape(s.heads, s.head_dim)
                multipliers.append(kvlife_scheme.multiplier_values(layer_codes))
            offset += n
    return means, multipliers


def _decode_chunk_np(blob, header: Header, index: int, means=None, into=None):
    """(per present layer float32 (keys, values) [heads, n, dim], level name, steps or None).

    `into` (kvlife scheme): whole-stream arrays per layer that the chunk is decoded into in place.
    """
    part = chunk_bytes(blob, header, index)
    if len(part) < CHUNK_PREFIX.size:
        raise CodecError(f"chunk {index} is truncated")
    level_id, exact, _ = CHUNK_PREFIX.unpack(part[: CHUNK_PREFIX.size])
    part = part[CHUNK_PREFIX.size :]
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
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    return tensor.reshape(shape.batch, shape.kv_heads, tokens, shape.head_dim).to(_DTYPE_TORCH[dtype])


def parse(blob: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> Header:
    """A whole stream's verified header, its claims checked against the bytes present.

    Beyond `parse_header`'s checks, every scheme's chunks have a least size for the shapes they claim
    (kvlife: a step per head and a sigma code per channel, a code then decoding to at most `chunk_tokens`
    values; fp16 and int8: every element), so a few bytes cannot claim a cache of gigabytes.
    """
    header = parse_header(blob, max_bytes)
    least = CHUNK_PREFIX.size * header.n_chunks
    least += kvlife_scheme.least_bytes(header) if header.scheme == "kvlife" else baselines.least_bytes(header)
    if sum(header.chunk_lengths) < least:
        raise CodecError(f"the stream's chunks hold {sum(header.chunk_lengths)} bytes, fewer than the "
                         f"{least} its shapes need at the least: it is truncated or its header is forged")
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
            return [tuple(np.concatenate([p[k] for p in pieces], axis=1) for k in range(2))
                    if pieces else empty(s)
                    for s, pieces in zip(header.layers, parts)]
        means = _means(header)
        first, _, _ = _decode_chunk_np(blob, header, 0, means)
        if header.n_chunks == 1:
            return [first.get(li) or empty(s) for li, s in enumerate(header.layers)]
        # later chunks decode straight into whole-layer arrays: no per-chunk pieces to concatenate
        whole = [tuple(np.empty((s.heads, s.tokens, s.head_dim), np.float32) for _ in range(2))
                 for s in header.layers]
        for li, pair in first.items():
            for k in range(2):
                whole[li][k][:, : pair[k].shape[1]] = pair[k]
        for index in range(1, header.n_chunks):
            _decode_chunk_np(blob, header, index, means, into=whole)
        return whole
    except MemoryError:
        gib = header.elements() * 4 / 2**30
        raise CodecError(f"not enough memory to decode this stream (it decodes to {gib:.1f} GiB of float32 "
                         "K/V); decode it chunk by chunk with decode_chunk") from None


def decode_layers(blob: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Tensors]:
    """Per layer (keys [B, H, T, D], values, positions [H, T]) in the stream's dtype."""
    return _layers(blob, parse(blob, max_bytes))


def _layers(blob, header: Header) -> list[Tensors]:
    whole = _decode_whole(blob, header)
    return [(_to_torch(keys, s, header.dtype), _to_torch(values, s, header.dtype),
             _positions_tensor(header.positions[li]))
            for li, (s, (keys, values)) in enumerate(zip(header.layers, whole))]


def decode(blob: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> KVCache:
    """Decode a whole stream (any scheme) back into a KVCache with its positions and windows."""
    header = parse(blob, max_bytes)
    windows = [s.window for s in header.layers]
    return KVCache.from_tensors(_layers(blob, header), windows, header.next_position)


def decode_chunk(blob: bytes, index: int, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Tensors | None]:
    """Decode chunk `index` alone: per layer (keys, values, positions) of its tokens, None where empty."""
    header = parse(blob, max_bytes)
    return _chunk_tensors(header, index, _decode_chunk_np(blob, header, index)[0])


def decode_chunk_part(header: Header, index: int, part: bytes,
                      crc: int | None = None) -> list[Tensors | None]:
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


def _chunk_tensors(header: Header, index: int, layers) -> list[Tensors | None]:
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
    if multipliers:
        widest = [m.max(axis=1) for m in multipliers]
    else:
        widest = [np.ones(s.heads) for s in header.layers for _ in range(2)]
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

