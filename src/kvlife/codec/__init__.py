"""kvlife.codec: a CacheGen-style KV cache codec and its baselines, in one self-describing format.

    blob = encode(cache, level="balanced", rope=rope_from_config(model.config))
    cache = decode(blob)                      # a KVCache, positions and windows included
    part = decode_chunk(blob, 3)              # chunks of 256 tokens decode independently
    info = inspect(blob)                      # shapes, levels, sizes, bits per element
    base = encode_baseline("lmcache", cache)  # also "fp16", "int8", "int8+zstd"

Layers: api (entry points) -> encoder / decoder -> kvlife_scheme / baselines (chunk payloads) ->
entropy (ANS tables), rope -> format (container, CodecError). The byte layout is in
docs/codec-format.md.
"""

from kvlife.codec.api import (
    BASELINES,
    decode,
    decode_chunk,
    decode_chunk_part,
    decode_layers,
    encode,
    encode_baseline,
    encode_levels,
    error_bound,
    inspect,
    mix,
    warm_up,
)
from kvlife.codec.format import CodecError
from kvlife.codec.levels import DEFAULT_LEVEL, LEVELS, Level
from kvlife.codec.rope import RopeSpec, rope_from_config

SCHEMES = ("kvlife", *BASELINES)

__all__ = [
    "BASELINES", "DEFAULT_LEVEL", "LEVELS", "SCHEMES", "CodecError", "Level", "RopeSpec", "decode",
    "decode_chunk", "decode_chunk_part", "decode_layers", "encode", "encode_baseline", "encode_levels",
    "error_bound", "inspect", "mix", "rope_from_config", "warm_up",
]
