"""The kvlife scheme: mean removal, optional un-RoPE, uniform quantization, optional anchor deltas, ANS.

Per (layer, K/V, head, channel) the stream header stores the channel mean over the whole cache
(fp16). A chunk quantizes `x - mean` (keys un-rotated first when the RoPE is known) with one
uniform step per (layer, K/V, head): with an entropy coder after it, an equal step for every
channel of a head is what minimizes squared error for a given size (a low-variance channel then
costs almost nothing; no per-token scales, which spread outlier channels' range over all channels).
Delta coding against an anchor token per group of 10 (CacheGen) is tried per (layer, K/V) and kept
only when its estimated size is smaller. The integers go to `entropy.encode`.

Chunk layout (after the common chunk prefix written by `codec.api`):
    steps   float32 [sum over present layers of 2 * heads]   (layer-major, K then V, head)
    deltas  uint8   [2 * present layers]                      (1: anchor-delta coded)
    codes   uint8   [sum of 2 * heads * head_dim]             (sigma code of every channel)
    exact   raw tokens kept exact (chunk 0 only): per layer, K then V, [heads, exact, head_dim] in the
            stream dtype
    entropy the rest: `entropy.encode` of all channels' symbols
"""

from __future__ import annotations

import numpy as np

from kvlife.codec import entropy
from kvlife.codec.format import CodecError, Header
from kvlife.codec.rope import RopeSpec, rotate

DELTA_GROUP = 10
MAX_SYMBOL = 1 << 29


def multiplier_codes(values: np.ndarray) -> np.ndarray:
    """uint8 code of per-channel step multipliers: 2 ** ((code - 128) / 8)."""
    return np.clip(np.rint(np.log2(values) * 8) + 128, 0, 255).astype(np.uint8)


def multiplier_values(codes: np.ndarray) -> np.ndarray:
    return np.exp2((codes.astype(np.float32) - 128) / 8).astype(np.float32)


def rope_of(header: Header) -> RopeSpec | None:
    return RopeSpec(header.rope_theta, header.rotary_dim) if header.pre_rope else None


def channel_means(layers_np, positions, rope: RopeSpec | None, exact_tokens: int) -> list[np.ndarray]:
    """fp16 means per (layer, kind) of shape [heads, head_dim], over tokens after the exact ones."""
    means = []
    for (keys, values), pos in zip(layers_np, positions):
        for kind, x in (("k", keys), ("v", values)):
            body = x[:, exact_tokens:]
            if body.shape[1] == 0:
                means.append(np.zeros((x.shape[0], x.shape[2]), dtype=np.float16))
                continue
            if kind == "k" and rope is not None:
                body = rotate(body.copy(), _head_positions(pos, x.shape[0])[:, exact_tokens:], rope, inverse=True)
            mean = body.mean(axis=1, dtype=np.float64)
            means.append(np.clip(mean, -65504, 65504).astype(np.float16))
    return means


def head_rms(layers_np, positions, rope, means, exact_tokens: int) -> list[np.ndarray]:
    """RMS per (layer, kind, head) of x - mean over the coded tokens (what level steps scale)."""
    out = []
    for index, ((keys, values), pos) in enumerate(zip(layers_np, positions)):
        for k, (kind, x) in enumerate((("k", keys), ("v", values))):
            body = x[:, exact_tokens:]
            if body.shape[1] == 0:
                out.append(np.ones(x.shape[0]))
                continue
            if kind == "k" and rope is not None:
                body = rotate(body.copy(), _head_positions(pos, x.shape[0])[:, exact_tokens:], rope, inverse=True)
            resid = body - means[2 * index + k].astype(np.float32)[:, None, :]
            out.append(np.sqrt(np.mean(np.square(resid, dtype=np.float64), axis=(1, 2))))
    return out


def _head_positions(pos: np.ndarray, heads: int) -> np.ndarray:
    """Positions [kv_heads, T] repeated over the batch to [batch * kv_heads, T]."""
    return np.tile(pos, (heads // pos.shape[0], 1)) if pos.shape[0] != heads else pos


def _delta(q: np.ndarray) -> np.ndarray:
    """Anchor deltas along tokens (axis 1): each token minus the first token of its group of 10."""
    n = q.shape[1]
    anchors = np.repeat(np.arange(0, n, DELTA_GROUP), DELTA_GROUP)[:n]
    out = q - q[:, anchors]
    out[:, ::DELTA_GROUP] = q[:, ::DELTA_GROUP]
    return out


def _undelta(d: np.ndarray) -> np.ndarray:
    n = d.shape[1]
    anchors = np.repeat(np.arange(0, n, DELTA_GROUP), DELTA_GROUP)[:n]
    out = d + d[:, anchors]
    out[:, ::DELTA_GROUP] = d[:, ::DELTA_GROUP]
    return out


def _est_bits(rms: np.ndarray) -> float:
    return float(np.log2(np.maximum(rms, 0.3)).sum())


def encode_chunk(
    header: Header, means, steps, layers_np, positions, index: int, exact_tokens: int, delta: str, multipliers=None
) -> bytes:
    """The scheme part of chunk `index`: steps, delta flags, codes, exact tokens, entropy section."""
    rope = rope_of(header)
    step_parts, flag_parts, code_parts, exact_parts, rows = [], [], [], [], []
    for li, ((keys, values), pos) in enumerate(zip(layers_np, positions)):
        start, stop = header.chunk_span(index, li)
        if start == stop:
            continue
        first = max(start, exact_tokens) if index == 0 else start
        for k, x in enumerate((keys, values)):
            heads, _, dim = x.shape
            step = steps[2 * li + k].astype(np.float32)
            step_parts.append(step)
            if index == 0 and first > start:
                exact_parts.append(np.ascontiguousarray(x[:, start:first]))
            body = x[:, first:stop]
            if k == 0 and rope is not None:
                body = rotate(body.copy(), _head_positions(pos, heads)[:, first:stop], rope, inverse=True)
            full_step = step[:, None, None] if multipliers is None else step[:, None, None] * multipliers[2 * li + k][:, None, :]
            q = np.rint((body - means[2 * li + k].astype(np.float32)[:, None, :]) / full_step)
            if not np.isfinite(q).all() or np.abs(q).max(initial=0) >= MAX_SYMBOL:
                raise CodecError(f"layer {li}: values too large for the chosen step (non-finite or > 2^29 steps)")
            q = q.astype(np.int32)
            use_delta = False
            if delta == "auto" and q.shape[1] > DELTA_GROUP:
                d = _delta(q)
                rms_q = np.sqrt(np.mean(np.square(q, dtype=np.float64), axis=1))
                rms_d = np.sqrt(np.mean(np.square(d, dtype=np.float64), axis=1))
                if _est_bits(rms_d) < _est_bits(rms_q) - 0.01 * rms_q.size:
                    q, use_delta = d, True
            flag_parts.append(1 if use_delta else 0)
            channel_major = np.ascontiguousarray(q.transpose(0, 2, 1)).reshape(heads * dim, -1)
            rms = np.sqrt(np.mean(np.square(channel_major, dtype=np.float64), axis=1)) if q.shape[1] else np.zeros(heads * dim)
            code_parts.append(entropy.sigma_codes(rms))
            rows.append(channel_major)
    codes = np.concatenate(code_parts) if code_parts else np.zeros(0, np.uint8)
    lengths = np.concatenate([np.full(r.shape[0], r.shape[1], dtype=np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    symbols = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0, np.int32)
    coded = entropy.encode(symbols, codes, starts, lengths)
    out = bytearray()
    out += (np.concatenate(step_parts) if step_parts else np.zeros(0, np.float32)).astype("<f4").tobytes()
    out += bytes(flag_parts)
    out += codes.tobytes()
    for part in exact_parts:
        out += _raw(part, header.dtype)
    out += coded
    return bytes(out)


def _raw(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return x.astype("<f4").tobytes()
    if dtype == "float16":
        return x.astype("<f2").tobytes()
    # bfloat16: the top 16 bits of float32 (the values came from bfloat16, so this is exact)
    return (x.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()


def _from_raw(blob: memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "float32":
        return np.frombuffer(blob, dtype="<f4").reshape(shape).astype(np.float32)
    if dtype == "float16":
        return np.frombuffer(blob, dtype="<f2").reshape(shape).astype(np.float32)
    return (np.frombuffer(blob, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)


def decode_chunk(header: Header, means, part: memoryview, index: int, exact_tokens: int, multipliers=None):
    """Per layer (keys, values) float32 [heads, n, dim] of chunk `index` (None where the layer is empty)."""
    rope = rope_of(header)
    present = [li for li in range(len(header.layers)) if header.chunk_span(index, li)[0] < header.chunk_span(index, li)[1]]
    n_steps = sum(2 * header.layers[li].heads for li in present)
    n_codes = sum(2 * header.layers[li].heads * header.layers[li].head_dim for li in present)
    offset = 0

    def take(size: int) -> memoryview:
        nonlocal offset
        if offset + size > len(part):
            raise CodecError(f"chunk {index} is truncated")
        view = part[offset : offset + size]
        offset += size
        return view

    steps = np.frombuffer(take(4 * n_steps), dtype="<f4")
    if not (np.isfinite(steps).all() and (steps > 0).all()):
        raise CodecError(f"chunk {index} has invalid quantization steps")
    flags = np.frombuffer(take(2 * len(present)), dtype=np.uint8)
    if (flags > 1).any():
        raise CodecError(f"chunk {index} has invalid delta flags")
    codes = np.frombuffer(take(n_codes), dtype=np.uint8)
    exact, bodies = {}, []
    item = 2 if header.dtype != "float32" else 4
    for li in present:
        start, stop = header.chunk_span(index, li)
        first = max(start, exact_tokens) if index == 0 else start
        first = min(first, stop)
        s = header.layers[li]
        for k in range(2):
            if first > start:
                shape = (s.heads, first - start, s.head_dim)
                exact[(li, k)] = _from_raw(take(item * int(np.prod(shape))), header.dtype, shape)
            bodies.append((li, k, first, stop))
    lengths = np.concatenate(
        [np.full(header.layers[li].heads * header.layers[li].head_dim, stop - first, dtype=np.int64) for li, _, first, stop in bodies]
    ) if bodies else np.zeros(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    symbols = entropy.decode(part[offset:], codes, starts, lengths)
    out: dict[int, list] = {}
    cursor = 0
    for j, (li, k, first, stop) in enumerate(bodies):
        s = header.layers[li]
        n = stop - first
        q = symbols[cursor : cursor + s.heads * s.head_dim * n].reshape(s.heads, s.head_dim, n).transpose(0, 2, 1)
        cursor += s.heads * s.head_dim * n
        if flags[j]:
            q = _undelta(q)
        step = steps[2 * sum(header.layers[p].heads for p in present[: present.index(li)]) + k * s.heads :][: s.heads]
        full_step = step[:, None, None] if multipliers is None else step[:, None, None] * multipliers[2 * li + k][:, None, :]
        x = q * full_step + means[2 * li + k].astype(np.float32)[:, None, :]
        x = x.astype(np.float32)
        if k == 0 and rope is not None and n:
            rotate(x, _head_positions(header.positions[li], s.heads)[:, first:stop], rope, inverse=False)
        if (li, k) in exact:
            x = np.concatenate([exact[(li, k)], x], axis=1)
        out.setdefault(li, []).append(x)
    return {li: (kv[0], kv[1]) for li, kv in out.items()}, steps
