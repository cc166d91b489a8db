"""Public entry points: encode / decode / decode_chunk / inspect / mix, for every scheme.

Encoding lives in `encoder.py`, decoding in `decoder.py`; this module adds what works on whole
streams (`mix` of several levels' chunks, `inspect`, `warm_up`) and re-exports the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvlife.codec.decoder import (
    decode,
    decode_chunk,
    decode_chunk_part,
    decode_layers,
    error_bound,
    parse,
)
from kvlife.codec.encoder import BASELINES, encode, encode_baseline, encode_levels
from kvlife.codec.format import (
    DTYPES,
    MAGIC,
    SCHEMES,
    CodecError,
    assemble,
    chunk_bytes,
)
from kvlife.codec.levels import LEVEL_NAMES, LEVELS
from kvlife.codec.rope import RopeSpec

# ---- streams of several levels ---------------------------------------------------------------------

def mix(streams: Mapping[str, bytes], choice: Sequence[str]) -> bytes:
    """A stream whose chunk i is chunk i of `streams[choice[i]]` (streams from one `encode_levels`)."""
    headers = {name: parse(blob) for name, blob in streams.items()}
    first = next(iter(headers.values()))
    for name, h in headers.items():
        fields = ("version", "scheme", "dtype", "chunk_tokens", "layers", "flags", "rope_theta", "rotary_dim",
                  "scheme_section", "next_position", "positions")
        if any(getattr(h, field) != getattr(first, field) for field in fields):
            raise CodecError(f"stream {name!r} does not share the others' header; "
                             "encode them with encode_levels")
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
            {"batch": s.batch, "kv_heads": s.kv_heads, "head_dim": s.head_dim, "tokens": s.tokens,
             "window": s.window}
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
    "BASELINES", "DTYPES", "SCHEMES", "decode", "decode_chunk", "decode_chunk_part", "decode_layers",
    "encode", "encode_baseline", "encode_levels", "error_bound", "inspect", "mix", "parse", "warm_up",
]
