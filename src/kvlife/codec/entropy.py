"""Entropy coding of quantized KV symbols with constriction's ANS coder and parametric tables.

Each channel of a chunk (one layer, K or V, one head, one of head_dim channels) sends one byte:
its `sigma code`, the RMS of its integer symbols on a log scale (8 steps per octave). The decoder
builds the channel's probability table from that byte alone: a discretized mixture of a Gaussian
and a Laplacian of that RMS (weight `LAPLACE_WEIGHT`, fitted on real caches: the symbols are
heavier-tailed than a Gaussian, lighter than a Laplacian). So a table costs 8 bits per channel
and chunk (0.03 bits/element at 256 tokens) instead of CacheGen's (bins+1) x 16 bits.

Channels with the same code share the same table, so the coder makes one constriction call per
distinct code (tens per chunk) rather than one per channel, and each table is built once per
process. Wide distributions (near-lossless levels) are split: the high part `q >> shift` goes
through the table, the low `shift` bits through a uniform model, which keeps tables small (at most
~400 entries) and decoding fast. Symbols beyond the table's radius are escaped and sent raw.

Tables are integer weights (probability x 2^22, floored, plus one) computed from `math.erf` and
`math.exp` in float64, so encoder and decoder agree bit for bit across machines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import constriction
import numpy as np

from kvlife.codec.format import CodecError

CODE_OFFSET = 64  # sigma = 2 ** ((code - CODE_OFFSET) / CODE_STEPS)
CODE_STEPS = 8
LAPLACE_WEIGHT = 0.3
TABLE_SIGMA = 16.0  # the high part's RMS stays near this when a wide channel is split
TABLE_SPAN = 8.0  # table radius in RMS units; farther symbols are escaped
WEIGHT_BITS = 22


def sigma_codes(rms: np.ndarray) -> np.ndarray:
    """uint8 code of each channel's symbol RMS."""
    logs = np.log2(np.maximum(rms, 2.0**-8))
    return np.clip(np.rint(logs * CODE_STEPS) + CODE_OFFSET, 0, 255).astype(np.uint8)


def code_sigma(code: int) -> float:
    return 2.0 ** ((int(code) - CODE_OFFSET) / CODE_STEPS)


@dataclass(frozen=True)
class Table:
    shift: int  # low bits sent uniformly
    radius: int  # the table covers high parts -radius..radius, index 2*radius+1 is the escape
    model: object  # constriction Categorical


def _mixture_cdf(x: float, sigma: float) -> float:
    gauss = 0.5 * (1.0 + math.erf(x / (sigma * math.sqrt(2.0))))
    b = sigma / math.sqrt(2.0)
    laplace = 0.5 * math.exp(x / b) if x < 0 else 1.0 - 0.5 * math.exp(-x / b)
    return (1.0 - LAPLACE_WEIGHT) * gauss + LAPLACE_WEIGHT * laplace


@lru_cache(maxsize=256)
def table(code: int) -> Table:
    sigma = code_sigma(code)
    shift = max(0, round(math.log2(sigma / TABLE_SIGMA)) + 1) if sigma > TABLE_SIGMA else 0
    unit = 1 << shift
    radius = int(math.ceil(TABLE_SPAN * sigma / unit)) + 2
    # High part h covers symbols h*unit .. h*unit+unit-1, i.e. values [h*unit - 0.5, (h+1)*unit - 0.5).
    edges = [_mixture_cdf((h * unit) - 0.5, sigma) for h in range(-radius, radius + 2)]
    probs = np.diff(np.array(edges))
    escape = max(1.0 - float(probs.sum()), 2.0**-20)
    weights = np.floor(np.append(probs, escape) * 2.0**WEIGHT_BITS) + 1.0
    return Table(shift, radius, constriction.stream.model.Categorical(weights, perfect=False))


_U16 = constriction.stream.model.Uniform(1 << 16)


@lru_cache(maxsize=64)
def _uniform(size: int) -> object:
    return constriction.stream.model.Uniform(size)


def _groups(codes: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Row order putting equal codes together, and each code's (code, first row, end row) in it."""
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    unique, first = np.unique(sorted_codes, return_index=True)
    bounds = np.append(first, len(codes))
    return order, [(int(c), int(bounds[i]), int(bounds[i + 1])) for i, c in enumerate(unique)]


def encode(segments: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """ANS-code integer symbols given as segments (rows [R, n] int32, sigma code per row uint8 [R]).

    Every row of a segment has the same length; a stream usually has one segment (one per distinct
    token count when layers differ). Returns bytes that `decode` inverts given the same codes and shapes.
    """
    coder = constriction.stream.stack.AnsCoder()
    # ANS is a stack: push in the reverse of the decoder's order (segments and groups, then escapes).
    parts, escapes = [], []
    for rows, codes in segments:
        if rows.size == 0:
            continue
        order, groups = _groups(codes)
        ordered = rows[order]
        for code, a, b in groups:
            t = table(code)
            values = ordered[a:b].reshape(-1)
            high = values >> t.shift if t.shift else values
            idx = high + t.radius
            escaped = None
            if int(idx.min()) < 0 or int(idx.max()) > 2 * t.radius:
                escaped = (idx < 0) | (idx > 2 * t.radius)
                idx = idx.copy()
                idx[escaped] = 2 * t.radius + 1
                escapes.append(values[escaped])
            low = None
            if t.shift:
                low = values & ((1 << t.shift) - 1)
                if escaped is not None:
                    low = low[~escaped]
            parts.append((t, idx, low))
    if escapes:
        raw = np.concatenate(escapes).astype(np.int64)
        limit = int(np.abs(raw).max())
        _encode_escapes(coder, raw + limit, 2 * limit + 1)
    else:
        limit = 0
    for t, idx, low in reversed(parts):
        if low is not None and low.size:
            coder.encode_reverse(low, _uniform(1 << t.shift))
        coder.encode_reverse(idx, t.model)
    return np.array([limit], dtype="<u4").tobytes() + coder.get_compressed().astype("<u4").tobytes()


def _encode_escapes(coder, unsigned: np.ndarray, size: int) -> None:
    if size <= 1 << 16:
        coder.encode_reverse(unsigned.astype(np.int32), _uniform(max(size, 2)))
        return
    high_size = ((size - 1) >> 16) + 1
    # decoder order: low halves, then high halves
    coder.encode_reverse((unsigned >> 16).astype(np.int32), _uniform(max(high_size, 2)))
    coder.encode_reverse((unsigned & 0xFFFF).astype(np.int32), _U16)


def _decode_escapes(coder, count: int, size: int) -> np.ndarray:
    if size <= 1 << 16:
        return coder.decode(_uniform(max(size, 2)), count).astype(np.int64)
    high_size = ((size - 1) >> 16) + 1
    low = coder.decode(_U16, count).astype(np.int64)
    high = coder.decode(_uniform(max(high_size, 2)), count).astype(np.int64)
    return (high << 16) | low


def decode(blob: bytes | memoryview, shapes: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
    """Inverse of `encode`: per segment (codes [R], row length n), the int32 rows [R, n]."""
    if len(blob) < 4 or len(blob) % 4:
        raise CodecError("entropy-coded section has a bad length")
    limit = int(np.frombuffer(blob, dtype="<u4", count=1)[0])
    if limit >= 1 << 30:
        raise CodecError("entropy-coded section has an absurd escape range")
    words = np.frombuffer(blob, dtype="<u4", offset=4).astype(np.uint32)
    segments, escape_sites = [], []
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        for si, (codes, n) in enumerate(shapes):
            ordered = np.empty((len(codes), n), dtype=np.int32)
            order, groups = _groups(codes) if ordered.size else (np.arange(len(codes)), [])
            flat = ordered.reshape(-1)
            for code, a, b in groups:
                t = table(code)
                count = (b - a) * n
                idx = coder.decode(t.model, count)
                escape = 2 * t.radius + 1
                escaped = idx == escape if int(idx.max()) == escape else None
                high = idx - t.radius
                if t.shift:
                    kept = count if escaped is None else count - int(escaped.sum())
                    low = coder.decode(_uniform(1 << t.shift), kept)
                    high <<= t.shift
                    if escaped is None:
                        high += low
                    else:
                        high[~escaped] += low
                flat[a * n : b * n] = high
                if escaped is not None:
                    escape_sites.append((si, np.flatnonzero(escaped) + a * n))
            segments.append((order, ordered))
        if escape_sites:
            total = sum(where.size for _, where in escape_sites)
            values = _decode_escapes(coder, total, 2 * limit + 1) - limit
            cursor = 0
            for si, where in escape_sites:
                segments[si][1].reshape(-1)[where] = values[cursor : cursor + where.size]
                cursor += where.size
    except CodecError:
        raise
    except Exception as exc:  # constriction raises on words it cannot decode
        raise CodecError(f"entropy-coded section is corrupt: {exc}") from None
    out = []
    for order, ordered in segments:
        rows = np.empty_like(ordered)
        rows[order] = ordered
        out.append(rows)
    return out
