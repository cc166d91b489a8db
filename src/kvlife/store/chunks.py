"""One chunk's K/V (every layer, `chunk_size` tokens) as bytes: raw tensors or a codec bitstream.

    payload = encoding name length (u8) | encoding name (ascii) | body

- "raw": a safetensors blob of per-layer keys, values and positions, in the model's dtype (exact).
- "fp16", "int8", "int8+zstd", "lmcache": the codec's baselines (`kvlife.codec.encode_baseline`).
- "kvlife:LEVEL": the codec's own scheme at a level (`kvlife.codec.encode`), keys coded before RoPE;
  "kvlife:LEVEL+profile[=FILE]" with a channel-weights profile (`kvlife.store.profiles`).

Codec encodings are lossy (except where the codec says otherwise), so the encoding is part of the
chunk key: a raw lookup never returns a lossy chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvlife.store.base import ChunkCorrupt, StoreError

if TYPE_CHECKING:
    import torch

Layers = list[tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]]
BASELINE_ENCODINGS = ("fp16", "int8", "int8+zstd", "lmcache")


def check_encoding(encoding: str) -> str:
    from kvlife.store.profiles import check_profile_suffix, split_encoding

    check_profile_suffix(encoding)
    base = split_encoding(encoding)[0]
    if base == "raw" or base in BASELINE_ENCODINGS:
        return encoding
    if base.startswith("kvlife:"):
        from kvlife.codec.levels import LEVELS, OTHER_LEVELS

        level = codec_level(encoding)
        if level in LEVELS or level in OTHER_LEVELS:
            return encoding
        raise StoreError(f"unknown codec level {level!r} in encoding {encoding!r}; levels: "
                         f"{', '.join([*LEVELS, *OTHER_LEVELS])}")
    raise StoreError(f"unknown store encoding {encoding!r}; use raw, {', '.join(BASELINE_ENCODINGS)} or "
                     "kvlife:LEVEL[+profile]")


def codec_level(encoding: str) -> str:
    """The codec level of a kvlife:LEVEL[+profile[=FILE]] encoding."""
    from kvlife.store.profiles import split_encoding

    return split_encoding(encoding)[0].split(":", 1)[1]


def encode_chunk(layers: Layers, encoding: str = "raw", rope: Any = None, weights: Any = None) -> bytes:
    """Payload bytes of one chunk given per layer (keys [1, H, n, D], values, positions [H, n]); `weights`:
    a kvlife encoding's per-layer channel weights (`profiles.CodecSetup.weights`)."""
    check_encoding(encoding)
    name = encoding.split("=", 1)[0].encode()  # informational: a profile's file is not the payload's
    if encoding == "raw":
        from safetensors.torch import save

        tensors = {}
        for index, (keys, values, positions) in enumerate(layers):
            tensors[f"{index}.k"] = keys.detach().contiguous().cpu()
            tensors[f"{index}.v"] = values.detach().contiguous().cpu()
            tensors[f"{index}.p"] = positions.detach().contiguous().cpu()
        body = save(tensors)
    else:
        from kvlife import codec

        tokens = layers[0][0].shape[-2]
        if encoding.startswith("kvlife:"):
            body = codec.encode(layers, level=codec_level(encoding), chunk_tokens=tokens, rope=rope,
                                weights=weights)
        else:
            body = codec.encode_baseline(encoding, layers, chunk_tokens=tokens)
    return bytes([len(name)]) + name + body


def decode_chunk(payload: bytes) -> Layers:
    """Per layer (keys, values, positions) from a payload made by `encode_chunk`."""
    if not payload:
        raise ChunkCorrupt("empty chunk payload")
    name = payload[1:1 + payload[0]].decode("ascii", errors="replace")
    body = payload[1 + payload[0]:]
    try:
        if name == "raw":
            from safetensors.torch import load

            tensors = load(body)
            count = len(tensors) // 3
            return [(tensors[f"{i}.k"], tensors[f"{i}.v"], tensors[f"{i}.p"]) for i in range(count)]
        from kvlife import codec

        return codec.decode_layers(body)
    except Exception as exc:  # a payload that passed its checksum but does not decode is still refused
        raise ChunkCorrupt(f"chunk payload ({name}) does not decode: {exc}") from None


def slice_layers(layers: Layers, start: int, stop: int) -> Layers:
    return [(k[..., start:stop, :], v[..., start:stop, :], p[:, start:stop]) for k, v, p in layers]


def concat_layers(chunks: list[Layers]) -> Layers:
    import torch

    out = []
    for index in range(len(chunks[0])):
        parts = [chunk[index] for chunk in chunks]
        out.append((torch.cat([p[0] for p in parts], dim=-2), torch.cat([p[1] for p in parts], dim=-2),
                    torch.cat([p[2] for p in parts], dim=-1)))
    return out
