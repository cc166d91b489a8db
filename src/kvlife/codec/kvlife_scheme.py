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
    return [
        (rotate(keys.copy(), _head_positions(pos, keys.shape[0]), rope, inverse=True), values)
        for (keys, values), pos in zip(layers_np, positions)
    ]


def channel_means(coded_layers, exact_tokens: int) -> list[np.ndarray]:
    """fp16 means per (layer, kind) of shape [heads, head_dim], over tokens after the exact ones."""
    means = []
    for pair in coded_layers:
        for x in pair:
            body = x[:, exact_tokens:]
            if body.shape[1] == 0:
                means.append(np.zeros((x.shape[0], x.shape[2]), dtype=np.float16))
                continue
            mean = body.mean(axis=1, dtype=np.float64)
            means.append(np.clip(mean, -65504, 65504).astype(np.float16))
    return means


def head_rms(coded_layers, means, exact_tokens: int) -> list[np.ndarray]:
    """RMS per (layer, kind, head) of x - mean over the coded tokens (what level steps scale)."""
    out = []
    for index, pair in enumerate(coded_layers):
        for k, x in enumerate(pair):
            body = x[:, exact_tokens:]
            n = body.shape[1]
            if n == 0:
                out.append(np.ones(x.shape[0]))
                continue
            mean = means[2 * index + k].astype(np.float64)
            # sum_t (x - m)^2 = sum x^2 - 2 m sum x + n m^2, per channel, without a centred copy
            squares = np.einsum("htd,htd->hd", body, body, dtype=np.float64)
            sums = body.sum(axis=1, dtype=np.float64)
            per_channel = np.maximum(squares - 2 * mean * sums + n * mean * mean, 0.0)
            out.append(np.sqrt(per_channel.sum(axis=1) / (n * x.shape[2])))
    return out


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


def _undelta(d: np.ndarray) -> np.ndarray:
    out = d + d[:, _anchors(d.shape[1])]
    out[:, ::DELTA_GROUP] = d[:, ::DELTA_GROUP]
    return out


def _est_bits(q: np.ndarray) -> float:
    """Estimated size of symbols [heads, n, dim]: sum over channels of log2 RMS (Gaussian model)."""
    rms = np.sqrt(np.einsum("htd,htd->hd", q, q) / max(q.shape[1], 1))
    return float(np.log2(np.maximum(rms, 0.3)).sum())


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
            inverse = 1.0 / step[:, None, None]
            if multipliers is not None:
                inverse = inverse / multipliers[2 * li + k][:, None, :]
            q = x[:, first:stop] - means[2 * li + k].astype(np.float32)[:, None, :]
            q *= inverse
            np.rint(q, out=q)
            use_delta = False
            if delta == "auto" and n > 2 * DELTA_GROUP:
                sample = q[:, : 6 * DELTA_GROUP]
                if _est_bits(_delta(sample)) < _est_bits(sample) - 0.01 * heads * dim:
                    q, use_delta = _delta(q), True
            flag_parts.append(1 if use_delta else 0)
            rms = np.sqrt(np.einsum("htd,htd->hd", q, q) / max(n, 1)).reshape(-1)
            codes = entropy.sigma_codes(rms)
            code_parts.append(codes)
            row = filled[n]
            if n:
                matrices[n][row : row + heads * dim].reshape(heads, dim, n)[...] = q.transpose(0, 2, 1)
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


def decode_chunk(header: Header, means, part: memoryview, index: int, exact_tokens: int, multipliers=None):
    """Per present layer (keys, values) float32 [heads, n, dim] of chunk `index`, and the chunk's steps."""
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
                exact[(li, k)] = _from_raw(take(item * s.heads * (first - start) * s.head_dim), header.dtype, shape)
    # codes are stored in block order; the entropy segments group blocks by row length
    code_mats = {n: [] for n in plan}
    cursor = 0
    for li, _, first, stop in present:
        size = 2 * header.layers[li].heads * header.layers[li].head_dim
        code_mats[stop - first].append(codes[cursor : cursor + size])
        cursor += size
    segments = entropy.decode(part[offset:], [(np.concatenate(code_mats[n]), n) for n in plan])
    matrices = dict(zip(plan, segments))
    filled = dict.fromkeys(plan, 0)
    out, step_at = {}, 0
    for j, (li, _, first, stop) in enumerate(present):
        s, n = header.layers[li], stop - first
        pair = []
        for k in range(2):
            rows = filled[n]
            q = matrices[n][rows : rows + s.heads * s.head_dim].reshape(s.heads, s.head_dim, n).transpose(0, 2, 1)
            filled[n] = rows + s.heads * s.head_dim
            if flags[2 * j + k]:
                q = _undelta(q)
            step = steps[step_at : step_at + s.heads][:, None, None]
            step_at += s.heads
            if multipliers is not None:
                step = step * multipliers[2 * li + k][:, None, :]
            x = np.empty((s.heads, n, s.head_dim), dtype=np.float32)
            np.multiply(q, step, out=x, casting="unsafe")
            x += means[2 * li + k].astype(np.float32)[:, None, :]
            if k == 0 and rope is not None and n:
                rotate(x, _head_positions(header.positions[li], s.heads)[:, first:stop], rope, inverse=False)
            if (li, k) in exact:
                x = np.concatenate([exact[(li, k)], x], axis=1)
            pair.append(x)
        out[li] = tuple(pair)
    return out, steps
