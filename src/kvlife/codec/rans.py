"""Interleaved rANS with one-lookup decoding, compiled with numba (format version 2).

constriction's Python decoder finds each symbol by a binary search over the table's cumulative
frequencies (40-55 M symbols/s here), which held the codec's decode near 80 MB/s of fp16 KV.
This coder quantizes each table to `PROB_BITS` = 12 bits (0.3% larger at the mid levels) so that a
table's whole decoder fits in 16 KiB: one u32 per slot packing the symbol's frequency, the slot's
offset inside the symbol and the symbol itself. A symbol then costs one lookup, a multiply and an
add, and two states are interleaved so that consecutive symbols do not wait on each other.

Coder: 32-bit states kept in [2^16, 2^32), renormalized 16 bits at a time. The encoder walks the
symbols backwards from a state of 2^16 per lane; symbol i of a group uses lane i % 2. The stream is
the two final states (high word first, lane 0 first) and then the renormalization words, all u16
little-endian, read front to back by the decoder. A group is a run of symbols sharing one table
(`shift` low bits, `radius`): a symbol v is sent as its table index (v >> shift) + radius, or as the
escape index 2*radius+1 when that falls outside the table, in which case v itself goes to the escape
list (int32, in decode order); otherwise its low `shift` bits follow as uniform pieces of at most
`LOW_PIECE` bits, high piece first, on the same lane. The decoder checks every read against the
stream's end, and that both lanes end at 2^16 with every word and escape used, so corrupt bytes are
reported, never used.
"""

from __future__ import annotations

import numpy as np
from numba import njit

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
MAX_SYMBOLS = 256  # the lookup entry keeps 8 bits of symbol
LOW_PIECE = 12
STATE_LOW = 1 << 16

OK = 0
ERR_TRUNCATED = -1
ERR_ESCAPES = -2
ERR_FINAL_STATE = -3
ERR_TRAILING = -4


def quantize(weights: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to PROB_SCALE, each >= 1, from positive integer weights.

    Integer arithmetic only, so encoder and decoder build the same table on any machine.
    """
    weights = np.asarray(weights, dtype=np.int64)
    if not 2 <= len(weights) <= MAX_SYMBOLS:
        raise ValueError(f"a table must have 2..{MAX_SYMBOLS} symbols, not {len(weights)}")
    freq = np.maximum(weights * PROB_SCALE // int(weights.sum()), 1)
    missing = PROB_SCALE - int(freq.sum())
    if missing > 0:
        freq[int(np.argmax(freq))] += missing
    while missing < 0:
        top = int(np.argmax(freq))
        take = min(-missing, int(freq[top]) - 1)
        freq[top] -= take
        missing += take
    return freq


def tables(freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative frequencies [S+1] int64, decoder lookup [PROB_SCALE] uint32).

    A lookup entry is frequency << 20 | (slot - cumulative) << 8 | symbol; frequencies are below
    2^12 because every table has at least two symbols.
    """
    cum = np.zeros(len(freq) + 1, dtype=np.int64)
    np.cumsum(freq, out=cum[1:])
    symbol = np.repeat(np.arange(len(freq), dtype=np.int64), freq)
    slot = np.arange(PROB_SCALE, dtype=np.int64)
    entry = (freq[symbol] << 20) | ((slot - cum[symbol]) << 8) | symbol
    return cum, entry.astype(np.uint32)


@njit(cache=True, nogil=True, boundscheck=False)
def _put(x, freq, cum, words, ptr):
    # renormalize so that x stays below 2^32 once (freq, cum) is coded
    if x >= (freq << (32 - PROB_BITS)):
        ptr -= 1
        words[ptr] = x & 0xFFFF
        x >>= 16
    return ((x // freq) << PROB_BITS) + (x % freq) + cum, ptr


@njit(cache=True, nogil=True, boundscheck=False)
def encode_kernel(symbols, group_table, group_start, group_count, group_shift, group_radius,
                  freqs, cums, recips, words, escapes):
    """Encode `symbols` (int32) group by group into the tail of `words` (uint16).

    Group g covers symbols[group_start[g] : group_start[g] + group_count[g]] with table
    group_table[g]. Returns (index of the first word, escape count); the escapes are the last
    entries of `escapes`, in decode order. `recips` holds 1/freq (float64) per table entry: the
    quotient x // freq is taken from it and corrected by one when rounding put it off (x < 2^32, so
    the float product is within one of the true quotient). Renormalization is branch-free: the low
    word is always written below `ptr` and kept only if due (the caller leaves one spare word at
    the front of `words`).
    """
    x0 = np.int64(STATE_LOW)
    x1 = np.int64(STATE_LOW)
    ptr = len(words)
    n_esc = 0
    for g in range(len(group_table) - 1, -1, -1):
        t = group_table[g]
        freq_row = freqs[t]
        cum_row = cums[t]
        recip_row = recips[t]
        start = group_start[g]
        count = group_count[g]
        shift = group_shift[g]
        radius = group_radius[g]
        escape = 2 * radius + 1
        # the general path: symbols with more than one low piece, and an odd group's last symbol
        paired = count - (count & 1) if shift <= LOW_PIECE else 0
        for i in range(count - 1, paired - 1, -1):
            v = np.int64(symbols[start + i])
            index = (v >> shift) + radius
            x = x0 if (i & 1) == 0 else x1
            if index < 0 or index >= escape:
                n_esc += 1
                escapes[len(escapes) - n_esc] = v
                index = escape
            elif shift > 0:
                # low pieces, least significant first (the decoder reads the high piece first)
                low = v & ((np.int64(1) << shift) - 1)
                rest = shift
                bits = shift % LOW_PIECE
                if bits == 0:
                    bits = LOW_PIECE
                while rest > 0:
                    piece = low & ((np.int64(1) << bits) - 1)
                    low >>= bits
                    scale = np.int64(1) << (PROB_BITS - bits)
                    x, ptr = _put(x, scale, piece * scale, words, ptr)
                    rest -= bits
                    bits = LOW_PIECE
            x, ptr = _put(x, freq_row[index], cum_row[index], words, ptr)
            if (i & 1) == 0:
                x0 = x
            else:
                x1 = x
        # pairs, backwards: symbol j + 1 (lane 1) then symbol j (lane 0); each its low piece
        # (at most one, shift <= LOW_PIECE) and then its table index
        low_bits = PROB_BITS - shift
        low_mask = (np.int64(1) << shift) - 1
        for j in range(paired - 2, -1, -2):
            for lane in range(2):
                v = np.int64(symbols[start + j + 1 - lane])
                x = x1 if lane == 0 else x0
                index = (v >> shift) + radius
                if index < 0 or index >= escape:
                    n_esc += 1
                    escapes[len(escapes) - n_esc] = v
                    index = escape
                elif shift > 0:
                    due = np.int64(x >= (np.int64(1) << (32 - shift)))  # uniform: freq 2^(12-shift)
                    words[ptr - 1] = x & 0xFFFF
                    ptr -= due
                    x >>= due << 4
                    x = (((x >> low_bits) << PROB_BITS) + (x & ((np.int64(1) << low_bits) - 1))
                         + ((v & low_mask) << low_bits))
                f = freq_row[index]
                due = np.int64(x >= (f << (32 - PROB_BITS)))
                words[ptr - 1] = x & 0xFFFF
                ptr -= due
                x >>= due << 4
                q = np.int64(x * recip_row[index])
                r = x - q * f
                if r < 0:
                    q -= 1
                    r += f
                elif r >= f:
                    q += 1
                    r -= f
                x = (q << PROB_BITS) + r + cum_row[index]
                if lane == 0:
                    x1 = x
                else:
                    x0 = x
    for x in (x1, x0):
        ptr -= 1
        words[ptr] = x & 0xFFFF
        ptr -= 1
        words[ptr] = x >> 16
    return ptr, n_esc


@njit(cache=True, nogil=True, boundscheck=False)
def decode_kernel(words, symbols, group_table, group_start, group_count, group_shift, group_radius,
                  luts, escapes):
    """Inverse of `encode_kernel`; returns OK or a negative error code. Never reads out of bounds:
    group ranges and tables are the caller's (checked), word and escape reads are checked here.

    Written out by hand (no helper calls, the two lanes side by side): that is what lets the
    compiler keep both states in registers and overlap their lookups.
    """
    n_words = len(words)
    n_escapes = len(escapes)
    if n_words < 4:
        return ERR_TRUNCATED
    x0 = (np.int64(words[0]) << 16) | np.int64(words[1])
    x1 = (np.int64(words[2]) << 16) | np.int64(words[3])
    if x0 < STATE_LOW or x1 < STATE_LOW:
        return ERR_FINAL_STATE
    pos = 4
    n_esc = 0
    for g in range(len(group_table)):
        lut = luts[group_table[g]]
        start = group_start[g]
        count = group_count[g]
        shift = group_shift[g]
        radius = group_radius[g]
        escape = 2 * radius + 1
        # pairs: symbol j on lane 0, then symbol j + 1 on lane 1, each its table index and then
        # (shift <= LOW_PIECE) its one low piece
        paired = count - (count & 1) if shift <= LOW_PIECE else 0
        low_bits = PROB_BITS - shift
        low_mask = (np.int64(1) << low_bits) - 1
        for j in range(0, paired, 2):
            e0 = np.int64(lut[x0 & (PROB_SCALE - 1)])
            x0 = (e0 >> 20) * (x0 >> PROB_BITS) + ((e0 >> 8) & 0xFFF)
            if x0 < STATE_LOW:
                if pos >= n_words:
                    return ERR_TRUNCATED
                x0 = (x0 << 16) | np.int64(words[pos])
                pos += 1
            v0 = (e0 & 0xFF) - radius
            if v0 == radius + 1:  # the escape index 2 * radius + 1
                if n_esc >= n_escapes:
                    return ERR_ESCAPES
                v0 = np.int64(escapes[n_esc])
                n_esc += 1
            elif shift:
                slot = x0 & (PROB_SCALE - 1)
                x0 = ((x0 >> PROB_BITS) << low_bits) + (slot & low_mask)
                if x0 < STATE_LOW:
                    if pos >= n_words:
                        return ERR_TRUNCATED
                    x0 = (x0 << 16) | np.int64(words[pos])
                    pos += 1
                v0 = (v0 << shift) | (slot >> low_bits)
            e1 = np.int64(lut[x1 & (PROB_SCALE - 1)])
            x1 = (e1 >> 20) * (x1 >> PROB_BITS) + ((e1 >> 8) & 0xFFF)
            if x1 < STATE_LOW:
                if pos >= n_words:
                    return ERR_TRUNCATED
                x1 = (x1 << 16) | np.int64(words[pos])
                pos += 1
            v1 = (e1 & 0xFF) - radius
            if v1 == radius + 1:
                if n_esc >= n_escapes:
                    return ERR_ESCAPES
                v1 = np.int64(escapes[n_esc])
                n_esc += 1
            elif shift:
                slot = x1 & (PROB_SCALE - 1)
                x1 = ((x1 >> PROB_BITS) << low_bits) + (slot & low_mask)
                if x1 < STATE_LOW:
                    if pos >= n_words:
                        return ERR_TRUNCATED
                    x1 = (x1 << 16) | np.int64(words[pos])
                    pos += 1
                v1 = (v1 << shift) | (slot >> low_bits)
            symbols[start + j] = v0
            symbols[start + j + 1] = v1
        # the general path: symbols with more than one low piece, and an odd group's last symbol
        for i in range(paired, count):
            x = x0 if (i & 1) == 0 else x1
            entry = np.int64(lut[x & (PROB_SCALE - 1)])
            x = (entry >> 20) * (x >> PROB_BITS) + ((entry >> 8) & 0xFFF)
            if x < STATE_LOW:
                if pos >= n_words:
                    return ERR_TRUNCATED
                x = (x << 16) | np.int64(words[pos])
                pos += 1
            index = entry & 0xFF
            if index == escape:
                if n_esc >= n_escapes:
                    return ERR_ESCAPES
                value = np.int64(escapes[n_esc])
                n_esc += 1
            else:
                value = index - radius
                rest = shift
                while rest > 0:
                    bits = LOW_PIECE if rest > LOW_PIECE else rest
                    slot = x & (PROB_SCALE - 1)
                    x = (((x >> PROB_BITS) << (PROB_BITS - bits))
                         + (slot & ((np.int64(1) << (PROB_BITS - bits)) - 1)))
                    if x < STATE_LOW:
                        if pos >= n_words:
                            return ERR_TRUNCATED
                        x = (x << 16) | np.int64(words[pos])
                        pos += 1
                    value = (value << bits) | (slot >> (PROB_BITS - bits))
                    rest -= bits
            symbols[start + i] = value
            if (i & 1) == 0:
                x0 = x
            else:
                x1 = x
    if x0 != STATE_LOW or x1 != STATE_LOW:
        return ERR_FINAL_STATE
    if pos != n_words or n_esc != n_escapes:
        return ERR_TRAILING
    return OK
