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


def _group_order(codes: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """Element gather index that puts rows in code order, and each code's (code, element count)."""
    order = np.argsort(codes, kind="stable")
    lengths_sorted = lengths[order]
    total = int(lengths_sorted.sum())
    offsets = np.cumsum(lengths_sorted) - lengths_sorted
    index = np.repeat(starts[order] - offsets, lengths_sorted) + np.arange(total, dtype=np.int64)
    sorted_codes = codes[order]
    unique, first = np.unique(sorted_codes, return_index=True)
    bounds = np.append(offsets[first], total)
    return index, [(int(c), int(bounds[i]), int(bounds[i + 1])) for i, c in enumerate(unique)]


def encode(symbols: np.ndarray, codes: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> bytes:
    """ANS-code int32 `symbols`, laid out as rows (start, length), each row with its sigma code.

    Returns the coder's words as bytes; `decode` with the same codes, starts and lengths inverts it.
    """
    index, groups = _group_order(codes, starts, lengths)
    ordered = symbols[index]
    coder = constriction.stream.stack.AnsCoder()
    # ANS is a stack: push in the reverse of the decoder's order (groups, then escapes).
    parts = []
    escapes = []
    for code, a, b in groups:
        t = table(code)
        values = ordered[a:b]
        high = values >> t.shift if t.shift else values
        escaped = np.abs(high) > t.radius
        idx = (high + t.radius).astype(np.int32)
        idx[escaped] = 2 * t.radius + 1
        low = (values[~escaped] & ((1 << t.shift) - 1)).astype(np.int32) if t.shift else None
        parts.append((t, idx, low))
        if escaped.any():
            escapes.append(values[escaped])
    if escapes:
        raw = np.concatenate(escapes).astype(np.int64)
        limit = int(np.abs(raw).max())
        _encode_escapes(coder, raw + limit, 2 * limit + 1)
        head = np.array([limit], dtype="<u4").tobytes()
    else:
        head = np.array([0], dtype="<u4").tobytes()
    for t, idx, low in reversed(parts):
        if low is not None and low.size:
            coder.encode_reverse(low, _uniform(1 << t.shift))
        coder.encode_reverse(idx, t.model)
    return head + coder.get_compressed().astype("<u4").tobytes()


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


def decode(blob: bytes | memoryview, codes: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Inverse of `encode`: int32 symbols in row layout."""
    if len(blob) < 4 or len(blob) % 4:
        raise CodecError("entropy-coded section has a bad length")
    limit = int(np.frombuffer(blob, dtype="<u4", count=1)[0])
    if limit >= 1 << 30:
        raise CodecError("entropy-coded section has an absurd escape range")
    words = np.frombuffer(blob, dtype="<u4", offset=4).astype(np.uint32)
    index, groups = _group_order(codes, starts, lengths)
    ordered = np.empty(index.size, dtype=np.int32)
    escaped_at = []
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        for code, a, b in groups:
            t = table(code)
            idx = coder.decode(t.model, b - a)
            escaped = idx == 2 * t.radius + 1
            high = idx - t.radius
            if t.shift:
                low = coder.decode(_uniform(1 << t.shift), int(b - a - escaped.sum()))
                values = high << t.shift
                values[~escaped] += low
            else:
                values = high
            ordered[a:b] = values
            if escaped.any():
                escaped_at.append(np.flatnonzero(escaped) + a)
        if escaped_at:
            where = np.concatenate(escaped_at)
            ordered[where] = _decode_escapes(coder, where.size, 2 * limit + 1) - limit
    except CodecError:
        raise
    except Exception as exc:  # constriction raises on words it cannot decode
        raise CodecError(f"entropy-coded section is corrupt: {exc}") from None
    symbols = np.empty_like(ordered)
    symbols[index] = ordered
    return symbols
