"""The kvlife scheme: mean removal, optional un-RoPE, uniform quantization, optional anchor deltas, ANS.

Per (layer, K/V, head, channel) the stream header stores the channel mean over the whole cache
(fp16). A chunk quantizes `x - mean` (keys un-rotated first when the RoPE is known) with one
uniform step per (layer, K/V, head): with an entropy coder after it, an equal step for every
channel of a head is what minimizes squared error for a given size (a low-variance channel then
costs almost nothing; no per-token scales, which spread outlier channels' range over all channels).
Delta coding against an anchor token per group of 10 (CacheGen) is tried per (layer, K/V) and kept
only when its estimated size is smaller. The integers go to `entropy.encode`.

Chunk layout (after the common chunk prefix, `format.CHUNK_PREFIX`):
    steps   float32 [sum over present layers of 2 * heads]   (layer-major, K then V, head)
    deltas  uint8   [2 * present layers]                      (1: anchor-delta coded)
    codes   uint8   [sum of 2 * heads * head_dim]             (sigma code of every channel)
    exact   raw tokens kept exact (chunk 0 only): per layer, K then V, [heads, exact, head_dim] in the
            stream dtype
    entropy the rest: `entropy.encode` of all channels' symbols
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kvlife.codec import entropy
from kvlife.codec.format import CodecError, Header
from kvlife.codec.rope import RopeSpec, cos_sin, rotate

DELTA_GROUP = 10


def multiplier_codes(values: np.ndarray) -> np.ndarray:
    """uint8 code of per-channel step multipliers: 2 ** ((code - 128) / 8)."""
    return np.clip(np.rint(np.log2(values) * 8) + 128, 0, 255).astype(np.uint8)


def multiplier_values(codes: np.ndarray) -> np.ndarray:
    return np.exp2((codes.astype(np.float32) - 128) / 8).astype(np.float32)


def rope_of(header: Header) -> RopeSpec | None:
    return RopeSpec(header.rope_theta, header.rotary_dim) if header.pre_rope else None


def unrope_keys(layers_np, positions, rope: RopeSpec | None):
    """Layers with keys rotated back to before RoPE (a copy), or the layers as they are without RoPE."""
    if rope is None:
        return layers_np
    out, angles = [], None
    for (keys, values), pos in zip(layers_np, positions):
        head_pos = _head_positions(pos, keys.shape[0])
        if angles is None or angles[0].shape != head_pos.shape or not np.array_equal(angles[0], head_pos):
            angles = (head_pos, *cos_sin(head_pos, rope))  # layers usually share positions
        out.append((rotate(keys.copy(), head_pos, rope, inverse=True, angles=angles[1:]), values))
    return out


@njit(cache=True, nogil=True, boundscheck=False)
def _channel_sums(x, exact_tokens):
    """Per channel [heads, dim]: sum and sum of squares over tokens >= exact_tokens (float64), and
    the largest |x| over all tokens, in one pass over x [heads, tokens, dim]."""
    heads, tokens, dim = x.shape
    sums = np.zeros((heads, dim), dtype=np.float64)
    squares = np.zeros((heads, dim), dtype=np.float64)
    peak = 0.0
    for h in range(heads):
        for t in range(tokens):
            for d in range(dim):
                v = np.float64(x[h, t, d])
                peak = max(peak, abs(v))
                if t >= exact_tokens:
                    sums[h, d] += v
                    squares[h, d] += v * v
    return sums, squares, peak


def channel_stats(coded_layers, exact_tokens: int):
    """Per (layer, kind): fp16 channel means [heads, head_dim] over the tokens after the exact ones,
    and the RMS of x - mean per head (what level steps scale); and per layer the largest |x|."""
    means, rms, peaks = [], [], []
    for pair in coded_layers:
        layer_peak = 0.0
        for x in pair:
            sums, squares, peak = _channel_sums(x, exact_tokens)
            layer_peak = max(layer_peak, peak)
            n = max(x.shape[1] - exact_tokens, 0)
            if n == 0:
                means.append(np.zeros((x.shape[0], x.shape[2]), dtype=np.float16))
                rms.append(np.ones(x.shape[0]))
                continue
            mean = np.clip(sums / n, -65504, 65504).astype(np.float16)
            means.append(mean)
            m = mean.astype(np.float64)
            # sum_t (x - m)^2 = sum x^2 - 2 m sum x + n m^2, per channel, without a centred copy
            per_channel = np.maximum(squares - 2 * m * sums + n * m * m, 0.0)
            rms.append(np.sqrt(per_channel.sum(axis=1) / (n * x.shape[2])))
        peaks.append(layer_peak)
    return means, rms, peaks


def _head_positions(pos: np.ndarray, heads: int) -> np.ndarray:
    """Positions [kv_heads, T] repeated over the batch to [batch * kv_heads, T]."""
    return np.tile(pos, (heads // pos.shape[0], 1)) if pos.shape[0] != heads else pos


def _anchors(n: int) -> np.ndarray:
    return np.repeat(np.arange(0, n, DELTA_GROUP), DELTA_GROUP)[:n]


def _delta(q: np.ndarray) -> np.ndarray:
    """Anchor deltas along tokens (axis 1): each token minus the first token of its group of 10."""
    out = q - q[:, _anchors(q.shape[1])]
    out[:, ::DELTA_GROUP] = q[:, ::DELTA_GROUP]
    return out


@njit(cache=True, nogil=True, boundscheck=False)
def _delta_saving(rows, n):
    """Estimated bits saved by anchor-delta coding the first n tokens of symbol rows [channels, T]:
    per channel log2 RMS (Gaussian model; RMS floored at 0.3) as they are minus after the deltas."""
    saving = 0.0
    for r in range(rows.shape[0]):
        plain = 0.0
        deltas = 0.0
        anchor = 0
        for t in range(n):
            q = rows[r, t]
            plain += np.float64(q) * q
            if t % DELTA_GROUP == 0:
                anchor = q
                deltas += np.float64(q) * q
            else:
                deltas += np.float64(q - anchor) * (q - anchor)
        saving += 0.5 * (np.log2(max(plain / n, 0.09)) - np.log2(max(deltas / n, 0.09)))
    return saving


@njit(cache=True, nogil=True, boundscheck=False)
def _quantize(x, means, inverse, rows):
    """rows[h * dim + d, t] = rint((x[h, t, d] - means[h, d]) * inverse[h, d]) for x [heads, n, dim];
    returns the sum of squares of each row (float64), from which the sigma codes come."""
    heads, n, dim = x.shape
    squares = np.zeros(heads * dim, dtype=np.float64)
    for h in range(heads):
        for d in range(dim):  # channel by channel: each output row is written front to back
            mean = means[h, d]
            scale = inverse[h, d]
            row = rows[h * dim + d]
            total = 0.0
            for t in range(n):
                q = np.rint((x[h, t, d] - mean) * scale)
                row[t] = np.int32(q)
                total += np.float64(q) * np.float64(q)
            squares[h * dim + d] = total
    return squares


def _layout(header: Header, index: int, exact_tokens: int):
    """Present layers of chunk `index` as (layer, start, first coded token, stop), and segment plan:
    {row length n: total rows} in order of first appearance."""
    present, plan = [], {}
    for li, s in enumerate(header.layers):
        start, stop = header.chunk_span(index, li)
        if start == stop:
            continue
        first = min(max(start, exact_tokens), stop) if index == 0 else start
        present.append((li, start, first, stop))
        plan[stop - first] = plan.get(stop - first, 0) + 2 * s.heads * s.head_dim
    return present, plan


def least_bytes(header: Header) -> int:
    """The fewest bytes the payloads of all chunks can take: per chunk and present layer a step per head
    and kind, two delta flags and a sigma code per channel; per chunk the entropy section's escape count."""
    total = 4 * header.n_chunks
    for s in header.layers:
        chunks = -(-s.tokens // header.chunk_tokens)
        total += chunks * (2 * s.heads * (4 + s.head_dim) + 2)
    return total


def encode_chunk(
    header: Header, means, steps, layers_np, coded_layers, index: int, exact_tokens: int, delta: str,
    multipliers=None,
) -> bytes:
    """The scheme part of chunk `index`: steps, delta flags, codes, exact tokens, entropy section.

    `layers_np` are the original layers (exact tokens come from them), `coded_layers` the same with
    keys before RoPE when the stream codes them so (`unrope_keys`).
    """
    present, plan = _layout(header, index, exact_tokens)
    matrices = {n: np.empty((rows, n), dtype=np.int32) for n, rows in plan.items()}
    code_mats = {n: np.empty(rows, dtype=np.uint8) for n, rows in plan.items()}
    filled = dict.fromkeys(plan, 0)
    step_parts, flag_parts, code_parts, exact_parts = [], [], [], []
    for li, start, first, stop in present:
        n = stop - first
        for k in range(2):
            x = coded_layers[li][k]
            heads, _, dim = x.shape
            step = steps[2 * li + k].astype(np.float32)
            step_parts.append(step)
            if first > start:
                exact_parts.append(np.ascontiguousarray(layers_np[li][k][:, start:first]))
            inverse = np.broadcast_to((1.0 / step)[:, None], (heads, dim)).astype(np.float32)
            if multipliers is not None:
                inverse = (inverse / multipliers[2 * li + k]).astype(np.float32)
            row = filled[n]
            rows = matrices[n][row : row + heads * dim]
            squares = _quantize(x[:, first:stop], means[2 * li + k].astype(np.float32), inverse, rows)
            use_delta = False
            if delta == "auto" and n > 2 * DELTA_GROUP:
                if _delta_saving(rows, 6 * DELTA_GROUP) > 0.01 * heads * dim:
                    rows[...] = _delta(rows)
                    squares = np.einsum("rt,rt->r", rows, rows, dtype=np.float64)
                    use_delta = True
            flag_parts.append(1 if use_delta else 0)
            codes = entropy.sigma_codes(np.sqrt(squares / max(n, 1)))
            code_parts.append(codes)
            code_mats[n][row : row + heads * dim] = codes
            filled[n] = row + heads * dim
    coded = entropy.encode([(matrices[n], code_mats[n]) for n in plan])
    out = bytearray()
    out += (np.concatenate(step_parts) if step_parts else np.zeros(0, np.float32)).astype("<f4").tobytes()
    out += bytes(flag_parts)
    out += (np.concatenate(code_parts) if code_parts else np.zeros(0, np.uint8)).tobytes()
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


@njit(cache=True, nogil=True, boundscheck=False)
def _dequantize(rows, steps, multipliers, means, delta, cos, sin, rotary_dim, out):
    """Integer symbols of one (layer, K/V) block back to float32, written into `out` [heads, n, dim].

    rows [heads * dim, n] int32 (row h * dim + d holds channel d of head h over the tokens); each
    element becomes (anchor-undelta'd symbol) * steps[h] * multipliers[h, d] + means[h, d]; keys
    coded before RoPE are rotated back with cos/sin [heads or 1, n, rotary_dim // 2] when rotary_dim
    is not 0. One pass, token by token (so each output row is written whole), no temporary arrays.
    """
    heads, n, dim = out.shape
    half = rotary_dim // 2
    scale = np.empty(dim, dtype=np.float64)
    mean = np.empty(dim, dtype=np.float32)
    anchor = np.zeros(dim, dtype=np.int64)
    token = np.empty(dim, dtype=np.float32)
    for h in range(heads):
        angle = h if cos.shape[0] > 1 else 0
        for d in range(dim):
            scale[d] = np.float64(steps[h]) * np.float64(multipliers[h, d])
            mean[d] = means[h, d]
        for t in range(n):
            if delta:
                for d in range(dim):
                    q = np.int64(rows[h * dim + d, t])
                    if t % DELTA_GROUP == 0:
                        anchor[d] = q
                    else:
                        q += anchor[d]
                    token[d] = np.float32(q * scale[d]) + mean[d]
            else:
                for d in range(dim):
                    token[d] = np.float32(rows[h * dim + d, t] * scale[d]) + mean[d]
            row = out[h, t]
            for d in range(half):
                c = cos[angle, t, d]
                s = sin[angle, t, d]
                row[d] = token[d] * c - token[d + half] * s
                row[d + half] = token[d + half] * c + token[d] * s
            for d in range(2 * half, dim):
                row[d] = token[d]


def decode_chunk(header: Header, means, part: memoryview, index: int, exact_tokens: int, multipliers=None,
                 into=None):
    """Per present layer (keys, values) float32 [heads, n, dim] of chunk `index`, and the chunk's steps.

    `into`: per layer (keys, values) float32 [heads, tokens, dim] arrays of the whole stream; the chunk
    is then written into them at its tokens and the returned arrays are views of them.
    """
    rope = rope_of(header)
    present, plan = _layout(header, index, exact_tokens)
    n_steps = sum(2 * header.layers[li].heads for li, *_ in present)
    n_codes = sum(plan.values())
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
    exact = {}
    item = 4 if header.dtype == "float32" else 2
    for li, start, first, _ in present:
        s = header.layers[li]
        for k in range(2):
            if first > start:
                shape = (s.heads, first - start, s.head_dim)
                raw = take(item * s.heads * (first - start) * s.head_dim)
                exact[(li, k)] = _from_raw(raw, header.dtype, shape)
    # codes are stored in block order; the entropy segments group blocks by row length
    code_mats = {n: [] for n in plan}
    cursor = 0
    for li, _, first, stop in present:
        size = 2 * header.layers[li].heads * header.layers[li].head_dim
        code_mats[stop - first].append(codes[cursor : cursor + size])
        cursor += size
    decode = entropy.decode if header.version >= 2 else entropy.decode_v1
    segments = decode(part[offset:], [(np.concatenate(code_mats[n]), n) for n in plan])
    matrices = dict(zip(plan, segments))
    filled = dict.fromkeys(plan, 0)
    out, step_at, angles = {}, 0, None
    for j, (li, start, first, stop) in enumerate(present):
        s, n = header.layers[li], stop - first
        if into is not None:
            pair = (into[li][0][:, start:stop], into[li][1][:, start:stop])
        else:
            pair = tuple(np.empty((s.heads, stop - start, s.head_dim), dtype=np.float32) for _ in range(2))
        for k in range(2):
            rows = filled[n]
            block = matrices[n][rows : rows + s.heads * s.head_dim]
            filled[n] = rows + s.heads * s.head_dim
            step = steps[step_at : step_at + s.heads]
            step_at += s.heads
            if multipliers is not None:
                multiplier = multipliers[2 * li + k]
            else:
                multiplier = np.ones((s.heads, s.head_dim), np.float32)
            if k == 0 and rope is not None and n:
                positions = _head_positions(header.positions[li][:, first:stop], s.heads)
                # layers usually share positions: reuse the previous layer's angles
                if (angles is None or angles[0].shape != positions.shape
                        or not np.array_equal(angles[0], positions)):
                    angles = (positions, *cos_sin(positions, rope))
                cos, sin, rotary_dim = angles[1], angles[2], rope.rotary_dim
            else:
                cos = sin = np.zeros((1, 1, 1), np.float32)
                rotary_dim = 0
            if first > start:
                pair[k][:, : first - start] = exact[(li, k)]
            _dequantize(block, step, multiplier, means[2 * li + k].astype(np.float32), bool(flags[2 * j + k]),
                        cos, sin, rotary_dim, pair[k][:, first - start :])
        out[li] = pair
    return out, steps
