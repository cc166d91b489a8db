"""Whole-context entries: one compressed cache stored as one blob, keyed by its recipe and every token.

A cache compressed in multi-request mode depends only on the model, dtype, recipe and the context's
tokens, but it is not prefix-decomposable (the tokens kept anywhere depend on the whole context), so
it is stored whole, under one key:

    key = sha256(namespace digest || "whole-context" || token count (u64 LE) || tokens as int64 LE)

where the namespace's recipe part names the recipe (`compressed_namespace`), so a lookup by another
recipe, model, dtype, encoding or tenant salt computes another key and misses.

The entry holds the cache layer by layer as `StoredLayer`s (kind and parameters, float pieces, exact
tensors; `kvlife.methods.compress.stored` converts layers to and from them):

    payload = safetensors blob; its metadata: {"format": "kvlife-entry/1", "encoding": ..., "layers": [...]}
      raw:   "L{i}.P{j}.k|v|p"  every piece's keys, values and positions (exact)
      codec: "codec"            one codec stream (`kvlife.codec`) of every piece in order
      both:  "L{i}.X.{name}"    exact tensors (positions of padded layers, KIVI's packed codes and scales)

A head-ragged layer is stored as one piece per KV head holding only that head's real tokens, so the
codec codes no padding and every kept token keeps its position; KIVI's packed layers are exact tensors
in every encoding (the codec is not applied to 2-bit codes). `decode_entry` refuses any payload whose
structure does not match its metadata (`ChunkCorrupt`): the caller recomputes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvlife.store.base import ChunkCorrupt
from kvlife.store.chunks import check_encoding, codec_level
from kvlife.store.keys import Namespace

if TYPE_CHECKING:
    import torch

ENTRY_FORMAT = "kvlife-entry/1"
COMPRESSED = "compressed:"  # the recipe part of a whole-context entry's namespace starts with it


@dataclass
class StoredLayer:
    """One cache layer as stored: its kind and parameters, the float pieces a codec may encode, and
    tensors stored exactly."""

    kind: str  # "dense", "headwise", "kivi": which layer class rebuilds it
    meta: dict[str, Any] = field(default_factory=dict)  # json-able parameters (window, next position, ...)
    # k, v [1, H, n, D], p [H, n]
    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    exact: dict[str, torch.Tensor] = field(default_factory=dict)


def compressed_namespace(model: str, dtype: str, recipe: str, encoding: str, chunk_size: int,
                         salt: str = "") -> Namespace:
    """The namespace of a compressed context's entry: `recipe` is the recipe's identity (spec and
    whatever else shapes the cache, see `kvlife.methods.compress.stored.recipe_identity`)."""
    return Namespace(model, dtype, COMPRESSED + recipe, encoding, chunk_size, salt)


def entry_key(namespace: Namespace, token_ids: Sequence[int]) -> str:
    import numpy as np

    ids = np.asarray(token_ids, dtype="<i8")
    digest = hashlib.sha256(namespace.digest() + b"whole-context" + struct.pack("<Q", len(ids))
                            + ids.tobytes())
    return digest.hexdigest()


def encode_entry(layers: Sequence[StoredLayer], encoding: str = "raw", rope: Any = None,
                 chunk_tokens: int = 256, weights: Any = None) -> bytes:
    """The payload of a whole-context entry; codec encodings apply to the float pieces only. `weights`:
    a kvlife encoding's per-layer channel weights for `layers` (`profiles.CodecSetup.weights`), mapped
    to each piece's heads."""
    from safetensors.torch import save

    check_encoding(encoding)
    tensors: dict[str, Any] = {}
    pieces = [piece for layer in layers for piece in layer.pieces]
    coded = encoding != "raw" and bool(pieces)
    if coded:
        import torch

        from kvlife import codec

        if encoding.startswith("kvlife:"):
            from kvlife.store.profiles import piece_weights

            own = piece_weights(weights, layers) if weights is not None else None
            stream = codec.encode(pieces, level=codec_level(encoding), chunk_tokens=chunk_tokens, rope=rope,
                                  weights=own)
        else:
            stream = codec.encode_baseline(encoding, pieces, chunk_tokens=chunk_tokens)
        tensors["codec"] = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    described = []
    for i, layer in enumerate(layers):
        if not coded:
            for j, (keys, values, positions) in enumerate(layer.pieces):
                tensors[f"L{i}.P{j}.k"] = keys.detach().contiguous().cpu()
                tensors[f"L{i}.P{j}.v"] = values.detach().contiguous().cpu()
                tensors[f"L{i}.P{j}.p"] = positions.detach().contiguous().cpu()
        for name, tensor in layer.exact.items():
            tensors[f"L{i}.X.{name}"] = tensor.detach().contiguous().cpu()
        described.append({"kind": layer.kind, "meta": layer.meta, "pieces": len(layer.pieces),
                          "exact": sorted(layer.exact)})
    header = {"format": ENTRY_FORMAT, "encoding": encoding.split("=", 1)[0], "coded": "1" if coded else "0",
              "layers": json.dumps(described)}
    return save(tensors, metadata=header)


def decode_entry(payload: bytes) -> list[StoredLayer]:
    """The layers of an entry made by `encode_entry`; `ChunkCorrupt` if it is not one."""
    try:
        from safetensors.torch import load

        header = _metadata(payload)
        if header.get("format") != ENTRY_FORMAT:
            raise ValueError(f"not a {ENTRY_FORMAT} entry")
        described = json.loads(header["layers"])
        tensors = load(payload)
        coded = header.get("coded") == "1"
        pieces = iter(_codec_pieces(tensors["codec"]) if coded else [])
        layers = []
        for i, item in enumerate(described):
            count = int(item["pieces"])
            if coded:
                own = [next(pieces) for _ in range(count)]
            else:
                own = [(tensors[f"L{i}.P{j}.k"], tensors[f"L{i}.P{j}.v"], tensors[f"L{i}.P{j}.p"])
                       for j in range(count)]
            exact = {name: tensors[f"L{i}.X.{name}"] for name in item["exact"]}
            layers.append(StoredLayer(str(item["kind"]), dict(item["meta"]), own, exact))
        if next(pieces, None) is not None:
            raise ValueError("the codec stream holds more pieces than the layers name")
        return layers
    except ChunkCorrupt:
        raise
    except Exception as exc:  # safetensors, json and the codec raise several types on a bad payload
        raise ChunkCorrupt(f"whole-context entry does not decode: {type(exc).__name__}: {exc}") from None


def _metadata(payload: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (its first 8 bytes give the header's length)."""
    (length,) = struct.unpack_from("<Q", payload, 0)
    if length > len(payload) - 8:
        raise ValueError("truncated safetensors header")
    return json.loads(payload[8:8 + length]).get("__metadata__", {})


def _codec_pieces(stream: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    from kvlife import codec

    return codec.decode_layers(stream.numpy().tobytes())
