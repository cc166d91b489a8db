"""Entropy coding of quantized KV symbols with parametric tables: kvlife's rANS (format 2) or
constriction's ANS (format 1, decode only).

Each channel of a chunk (one layer, K or V, one head, one of head_dim channels) sends one byte:
its `sigma code`, the RMS of its integer symbols on a log scale (8 steps per octave). The decoder
builds the channel's probability table from that byte alone: a discretized mixture of a Gaussian
and a Laplacian of that RMS (weight `LAPLACE_WEIGHT`, fitted on real caches: the symbols are
heavier-tailed than a Gaussian, lighter than a Laplacian). So a table costs 8 bits per channel
and chunk (0.03 bits/element at 256 tokens) instead of CacheGen's (bins+1) x 16 bits.

Wide distributions (near-lossless levels) are split: the high part `q >> shift` goes through the
table, the low `shift` bits are sent uniformly, which keeps tables small. Symbols beyond the
table's radius are escaped and sent raw. Tables are integer weights (probability x 2^22, floored,
plus one) computed from `math.erf` and `math.exp` in float64, so encoder and decoder agree bit for
bit across machines; format 2 quantizes them further to 12-bit frequencies with integer arithmetic
(`rans.quantize`).

Format 2 (`encode` / `decode`) codes every row (one channel of a chunk) with its code's table, rows
sorted by code, in one call of the compiled coder. Format 1 (`decode_v1`) made one constriction
call per distinct code; its encoder (`encode_v1`) is kept to test the reader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import constriction
import numpy as np

from kvlife.codec import rans
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
    """The version-1 table of `code` (a constriction model)."""
    shift, radius, weights = table_weights(code)
    return Table(shift, radius, constriction.stream.model.Categorical(weights, perfect=False))


@lru_cache(maxsize=512)
def table_weights(code: int, table_sigma: float = TABLE_SIGMA) -> tuple[int, int, np.ndarray]:
    """(low bits sent uniformly, table radius, integer weights of indices 0..2*radius+1) of `code`.

    Channels wider than `table_sigma` are split: their high part goes through the table.
    """
    sigma = code_sigma(code)
    shift = max(0, round(math.log2(sigma / table_sigma)) + 1) if sigma > table_sigma else 0
    unit = 1 << shift
    radius = int(math.ceil(TABLE_SPAN * sigma / unit)) + 2
    # High part h covers symbols h*unit .. h*unit+unit-1, i.e. values [h*unit - 0.5, (h+1)*unit - 0.5).
    edges = [_mixture_cdf((h * unit) - 0.5, sigma) for h in range(-radius, radius + 2)]
    probs = np.diff(np.array(edges))
    escape = max(1.0 - float(probs.sum()), 2.0**-20)
    weights = np.floor(np.append(probs, escape) * 2.0**WEIGHT_BITS) + 1.0
    return shift, radius, weights


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


def encode_v1(segments: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
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


def decode_v1(blob: bytes | memoryview, shapes: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
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
        # the encoder starts from an empty coder, so decoding every symbol must end there; this is also
        # what refuses a version-2 section read as version 1 (a forged version field)
        if not coder.is_empty():
            raise CodecError("entropy-coded section is corrupt: words are left over (or it is not version 1)")
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


# ---- version 2: kvlife's own interleaved rANS with one-lookup decoding (kvlife.codec.rans) -------

TABLE_SIGMA_V2 = 8.0  # keeps every table within rans.MAX_SYMBOLS symbols


class _Bank:
    """rANS tables of every sigma code, built on first use (for the encoder: frequencies and
    cumulative frequencies; for the decoder: the packed lookup)."""

    def __init__(self) -> None:
        self.freqs = np.ones((256, rans.MAX_SYMBOLS), dtype=np.int64)
        self.cums = np.zeros((256, rans.MAX_SYMBOLS + 1), dtype=np.int64)
        self.recips = np.ones((256, rans.MAX_SYMBOLS), dtype=np.float64)
        self.luts = np.zeros((256, rans.PROB_SCALE), dtype=np.uint32)
        self.shift = np.zeros(256, dtype=np.int64)
        self.radius = np.zeros(256, dtype=np.int64)
        self.built = np.zeros(256, dtype=bool)

    def need(self, codes: np.ndarray) -> None:
        for code in np.unique(codes[~self.built[codes]]):
            shift, radius, weights = table_weights(int(code), TABLE_SIGMA_V2)
            freq = rans.quantize(weights.astype(np.int64))
            cum, lut = rans.tables(freq)
            self.freqs[code, : len(freq)] = freq
            self.cums[code, : len(cum)] = cum
            self.recips[code, : len(freq)] = 1.0 / freq
            self.luts[code] = lut
            self.shift[code], self.radius[code] = shift, radius
            self.built[code] = True


_BANK = _Bank()


def _plan(shapes: list[tuple[np.ndarray, int]]):
    """One group per row, in coding order: by segment, then by code (so a table stays in cache),
    each with the offset of its row in the flat buffer of all segments' rows [R, n] in row order.
    Returns (codes, starts, counts, total symbols)."""
    tables, starts, counts, offset = [], [], [], 0
    for codes, n in shapes:
        codes = np.asarray(codes, dtype=np.int64)
        if n and len(codes):
            order = np.argsort(codes, kind="stable")
            tables.append(codes[order])
            starts.append(offset + order * n)
            counts.append(np.full(len(codes), n, dtype=np.int64))
        offset += len(codes) * n
    if not tables:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, offset
    tables = np.concatenate(tables)
    _BANK.need(tables)
    return tables, np.concatenate(starts), np.concatenate(counts), offset


def encode(segments: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """rANS-code integer symbols given as segments (rows [R, n] int32, sigma code per row uint8 [R]).

    Every row of a segment has the same length. Section layout: u32 escape count E, int32 escapes
    [E], then the rANS words (u16, the two states first). `decode` inverts it given the same codes
    and shapes.
    """
    shapes = [(codes, rows.shape[1] if rows.size else 0) for rows, codes in segments]
    tables, starts, counts, total = _plan(shapes)
    if len(segments) == 1:  # the usual case: no copy
        flat = np.ascontiguousarray(segments[0][0], dtype=np.int32).reshape(-1)
    else:
        pieces = [np.asarray(rows, dtype=np.int32).reshape(-1) for rows, _ in segments]
        flat = np.concatenate(pieces or [np.zeros(0, np.int32)])
    # each coding step (a table index, or one low piece) emits at most one word; plus the states
    steps = 1 + -(-_BANK.shift[tables] // rans.LOW_PIECE)
    words = np.empty(int((counts * steps).sum()) + 5, dtype=np.uint16)  # + states + one spare
    escapes = np.empty(total, dtype=np.int32)
    first, n_esc = rans.encode_kernel(
        flat, tables, starts, counts, _BANK.shift[tables], _BANK.radius[tables], _BANK.freqs, _BANK.cums,
        _BANK.recips, words, escapes,
    )
    return (np.array([n_esc], dtype="<u4").tobytes() + escapes[len(escapes) - n_esc :].astype("<i4").tobytes()
            + words[first:].astype("<u2").tobytes())


_RANS_ERRORS = {
    rans.ERR_TRUNCATED: "its rANS words end early",
    rans.ERR_ESCAPES: "it uses more escapes than it holds",
    rans.ERR_FINAL_STATE: "its rANS states do not check out",
    rans.ERR_TRAILING: "it has unused words or escapes",
}


def decode(blob: bytes | memoryview, shapes: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
    """Inverse of `encode`: per segment (codes [R], row length n), the int32 rows [R, n]."""
    blob = memoryview(blob)
    tables, starts, counts, total = _plan(shapes)
    if len(blob) < 4:
        raise CodecError("entropy-coded section is truncated")
    n_esc = int(np.frombuffer(blob, dtype="<u4", count=1)[0])
    if n_esc > total or 4 + 4 * n_esc > len(blob) or (len(blob) - 4 * n_esc) % 2:
        raise CodecError("entropy-coded section has a bad escape count or length")
    escapes = np.frombuffer(blob, dtype="<i4", count=n_esc, offset=4).astype(np.int32)
    words = np.frombuffer(blob, dtype="<u2", offset=4 + 4 * n_esc)
    if not words.flags.aligned or words.dtype.byteorder not in "=|":
        words = words.astype(np.uint16)  # a chunk may start at an odd offset of its stream
    flat = np.empty(total, dtype=np.int32)
    status = rans.decode_kernel(
        words, flat, tables, starts, counts, _BANK.shift[tables], _BANK.radius[tables], _BANK.luts, escapes,
    )
    if status != rans.OK:
        raise CodecError(f"entropy-coded section is corrupt: {_RANS_ERRORS[status]}")
    out, offset = [], 0
    for codes, n in shapes:
        size = len(codes) * n
        out.append(flat[offset : offset + size].reshape(len(codes), n))
        offset += size
    return out
