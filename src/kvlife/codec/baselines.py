"""Baseline schemes in the same container: `fp16`, `int8`, `int8+zstd` and `lmcache`.

- fp16: raw float16 (values beyond float16's range are clipped to +-65504).
- int8: symmetric 8-bit quantization with one float16 absmax scale per (layer, K/V, head, token).
- int8+zstd: the int8 chunk compressed with zstd (level 3).
- lmcache: LMCache's CacheGen serde settings: per-token absmax over all channels of a layer (one
  float16 scale per layer, K/V and token), symbols in -(bins/2-1)..bins/2-1, 32 bins for keys of the
  first 10/32 of the layers and values of the first 2/32, 16 bins elsewhere, no delta coding, and a
  probability table per (layer, K/V, channel) and chunk: (bins+1) x 16-bit CDF, as LMCache sends it.
  Symbols are ANS-coded (constriction) with exactly those tables, one call per channel as LMCache does.
  Levels "fine" (twice the bins) and "coarse" (half) trace LMCache's size/quality curve around it;
  the bins are stored in the header.
"""

from __future__ import annotations

import constriction
import numpy as np
import zstandard

from kvlife.codec.format import CodecError, Header

LMCACHE_LEVELS = {"default": 1, "fine": 2, "coarse": 0.5}  # bins multiplier; "default" is LMCache's own


def lmcache_bins(n_layers: int, level: str = "default") -> tuple[list[int], list[int]]:
    """Bins per layer for keys and values: LMCache's settings (scaled by the level's multiplier)."""
    factor = LMCACHE_LEVELS[level]
    key_first = round(n_layers * 10 / 32)
    value_first = max(1, round(n_layers * 2 / 32))
    keys = [int((32 if i < key_first else 16) * factor) for i in range(n_layers)]
    values = [int((32 if i < value_first else 16) * factor) for i in range(n_layers)]
    return keys, values


def pack_bins(key_bins: list[int], value_bins: list[int]) -> bytes:
    return np.array([b for pair in zip(key_bins, value_bins) for b in pair], dtype="<u2").tobytes()


def unpack_bins(header: Header) -> tuple[list[int], list[int]]:
    n = len(header.layers)
    if len(header.scheme_section) != 4 * n:
        raise CodecError("the lmcache scheme section has the wrong size")
    bins = np.frombuffer(header.scheme_section, dtype="<u2").reshape(n, 2)
    if (bins < 4).any() or (bins > 4096).any():
        raise CodecError("the lmcache scheme section has invalid bin counts")
    return [int(b) for b in bins[:, 0]], [int(b) for b in bins[:, 1]]


def least_bytes(header: Header) -> int:
    """The fewest bytes the payloads of all chunks can take (fp16 and int8: exactly this; int8+zstd: 0)."""
    total = 0
    bins = unpack_bins(header) if header.scheme == "lmcache" else None
    for li, s in enumerate(header.layers):
        elements = 2 * s.heads * s.tokens * s.head_dim
        if header.scheme == "fp16":
            total += 2 * elements
        elif header.scheme == "int8":
            total += elements + 4 * s.heads * s.tokens
        elif bins is not None:  # a float16 scale per (kind, token), a CDF per (kind, channel) and chunk
            chunks = -(-s.tokens // header.chunk_tokens)
            total += 4 * s.tokens + chunks * 2 * s.heads * s.head_dim * (bins[0][li] + bins[1][li] + 2)
    return total


def _present(header: Header, index: int):
    for li in range(len(header.layers)):
        start, stop = header.chunk_span(index, li)
        if start < stop:
            yield li, start, stop


class _Take:
    def __init__(self, part: memoryview, index: int) -> None:
        self.part, self.offset, self.index = part, 0, index

    def __call__(self, size: int) -> memoryview:
        if self.offset + size > len(self.part):
            raise CodecError(f"chunk {self.index} is truncated")
        view = self.part[self.offset : self.offset + size]
        self.offset += size
        return view

    def done(self) -> None:
        if self.offset != len(self.part):
            raise CodecError(f"chunk {self.index} has {len(self.part) - self.offset} trailing bytes")


# ---- fp16 / int8 -----------------------------------------------------------------------------------

def encode_chunk_raw(header: Header, layers_np, index: int) -> bytes:
    out = bytearray()
    for li, start, stop in _present(header, index):
        for x in layers_np[li]:
            block = x[:, start:stop]
            if header.scheme == "fp16":
                out += np.clip(block, -65504, 65504).astype("<f2").tobytes()
                continue
            scale = np.abs(block).max(axis=2) / 127.0
            scale16 = np.clip(scale, 0, 65504).astype(np.float16)
            safe = np.where(scale16 > 0, scale16.astype(np.float32), 1.0)
            q = np.clip(np.rint(block / safe[..., None]), -127, 127).astype(np.int8)
            out += scale16.astype("<f2").tobytes() + q.tobytes()
    if header.scheme == "int8+zstd":
        return zstandard.ZstdCompressor(level=3).compress(bytes(out))
    return bytes(out)


def decode_chunk_raw(header: Header, part: memoryview, index: int):
    if header.scheme == "int8+zstd":
        limit = sum(2 * header.layers[li].heads * (stop - start) * (header.layers[li].head_dim + 2)
                    for li, start, stop in _present(header, index))
        try:
            part = memoryview(zstandard.ZstdDecompressor().decompress(bytes(part), max_output_size=limit))
        except zstandard.ZstdError as exc:
            raise CodecError(f"chunk {index} is corrupt: {exc}") from None
    take = _Take(part, index)
    out = {}
    for li, start, stop in _present(header, index):
        s, n = header.layers[li], stop - start
        pair = []
        for _ in range(2):
            if header.scheme == "fp16":
                x = np.frombuffer(take(2 * s.heads * n * s.head_dim), dtype="<f2").astype(np.float32)
                pair.append(x.reshape(s.heads, n, s.head_dim))
                continue
            scale = np.frombuffer(take(2 * s.heads * n), dtype="<f2").astype(np.float32)
            scale = scale.reshape(s.heads, n, 1)
            q = np.frombuffer(take(s.heads * n * s.head_dim), dtype=np.int8).reshape(s.heads, n, s.head_dim)
            pair.append(q.astype(np.float32) * scale)
        out[li] = tuple(pair)
    take.done()
    return out


# ---- lmcache ---------------------------------------------------------------------------------------

def encode_chunk_lmcache(header: Header, layers_np, index: int) -> bytes:
    key_bins, value_bins = unpack_bins(header)
    scales, tables, coder = bytearray(), bytearray(), constriction.stream.stack.AnsCoder()
    calls = []
    for li, start, stop in _present(header, index):
        for k, x in enumerate(layers_np[li]):
            bins = (key_bins, value_bins)[k][li]
            limit = bins // 2 - 1
            heads, n, dim = x.shape[0], stop - start, x.shape[2]
            tokens = x[:, start:stop].transpose(1, 0, 2).reshape(n, heads * dim)  # [n, channels]
            peak = np.clip(np.abs(tokens).max(axis=1), 0, 65504).astype(np.float16)
            safe = np.where(peak > 0, peak.astype(np.float32), 1.0)
            q = np.clip(np.rint(tokens * (limit / safe[:, None])), -limit, limit).astype(np.int32) + limit
            scales += peak.astype("<f2").tobytes()
            for c in range(heads * dim):
                column = q[:, c]
                counts = np.bincount(column, minlength=bins)[:bins]
                cdf = np.rint(np.concatenate([[0], np.cumsum(counts)]) * (65535 / n)).astype(np.int64)
                tables += cdf.astype("<u2").tobytes()
                calls.append((column, _cdf_model(cdf)))
    for column, model in reversed(calls):
        coder.encode_reverse(column, model)
    return bytes(scales) + bytes(tables) + coder.get_compressed().astype("<u4").tobytes()


def _cdf_model(cdf: np.ndarray):
    weights = np.diff(cdf).astype(np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    return constriction.stream.model.Categorical(weights, perfect=False)


def decode_chunk_lmcache(header: Header, part: memoryview, index: int):
    key_bins, value_bins = unpack_bins(header)
    take = _Take(part, index)
    present = list(_present(header, index))
    scales = {}
    for li, start, stop in present:
        for k in range(2):
            scales[(li, k)] = np.frombuffer(take(2 * (stop - start)), dtype="<f2").astype(np.float32)
    models = []
    for li, _start, _stop in present:
        s = header.layers[li]
        for k in range(2):
            bins = (key_bins, value_bins)[k][li]
            cdfs = np.frombuffer(take(2 * (bins + 1) * s.heads * s.head_dim), dtype="<u2")
            cdfs = cdfs.reshape(-1, bins + 1)
            models.append([_cdf_model(cdf.astype(np.int64)) for cdf in cdfs])
    rest = part[take.offset :]
    if len(rest) % 4:
        raise CodecError(f"chunk {index} has a bad entropy section length")
    out, j = {}, 0
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(rest, dtype="<u4").astype(np.uint32))
        for li, start, stop in present:
            s, n = header.layers[li], stop - start
            pair = []
            for k in range(2):
                bins = (key_bins, value_bins)[k][li]
                limit = bins // 2 - 1
                q = np.stack([coder.decode(model, n) for model in models[j]], axis=1)
                q = q.astype(np.float32) - limit
                j += 1
                x = q * (scales[(li, k)] / limit)[:, None]
                pair.append(x.reshape(n, s.heads, s.head_dim).transpose(1, 0, 2))
            out[li] = tuple(pair)
        if not coder.is_empty():
            raise CodecError(f"chunk {index} entropy section has words left over")
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"chunk {index} entropy section is corrupt: {exc}") from None
    return out
