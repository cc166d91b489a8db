"""A streamable compressed context: its whole-context entry cut into layer groups, each at several levels.

A cache compressed in multi-request mode (kvzip, adakv, kivi, ...) is stored in the store as one
whole-context entry (`kvlife.store.entries`). To stream it, the same entry is cut by layers: piece g
holds layers g*G .. (g+1)*G-1 (`layers_per_piece` G), serialised by `encode_entry` exactly as a
whole-context entry is (head-ragged layers as one piece per KV head, KIVI's packed layers exact), at
every level of the context: `raw` (exact) and the codec's levels (`kvlife:LEVEL`, applied to the float
pieces only). Piece g at LEVEL is a store chunk under

    entry_key(compressed_namespace(model fingerprint, dtype, recipe identity, encoding of LEVEL,
                                   codec chunk tokens, salt="stream-piece:g:FIRST-LAST"), context tokens)

so its key names the recipe, model, dtype, level, layers and every context token. The manifest
(`PieceManifest`) lists per level and piece the bytes, SHA-256 and CRC-32, each piece's work (the
bytes its layers take as fp16, what its decode produces) and the recipe identity, which a session
must match before a piece is used (`kvlife.stream.sessions`).

A compressed cache has no per-chunk recompute (which tokens are kept depends on the whole context), so
the fetch plans pieces with levels only: when no plan meets the deadline, the plan ready soonest (the
cheapest level) is taken; a piece that cannot be had (lost or corrupt `max_attempts` times, or that does
not decode) makes the caller recompress the whole context locally (`fetch_into`), never use the piece.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvlife.codec import LEVELS
from kvlife.store.base import ChunkCorrupt
from kvlife.store.entries import StoredLayer, compressed_namespace, decode_entry, encode_entry, entry_key
from kvlife.store.keys import Namespace
from kvlife.stream.context import ChunkInfo, ManifestBase, StreamError, check_context_id

PIECES_FORMAT = "kvlife-stream-compressed/1"
RAW = "raw"
PIECE_LEVELS = (RAW, *LEVELS)  # best quality first: raw is exact


def level_encoding(level: str) -> str:
    """The store encoding of a piece level: `raw` or `kvlife:LEVEL`."""
    return RAW if level == RAW else f"kvlife:{level}"


def check_levels(levels: Sequence[str] | None) -> list[str]:
    """`levels` (None: all) in quality order; StreamError naming any unknown one."""
    levels = list(levels or PIECE_LEVELS)
    unknown = [level for level in levels if level not in PIECE_LEVELS]
    if unknown or not levels:
        raise StreamError(f"unknown level(s) {', '.join(unknown) or '(none)'} for a compressed context; "
                          f"levels: {', '.join(PIECE_LEVELS)}")
    return [level for level in PIECE_LEVELS if level in levels]


@dataclass(kw_only=True)
class PieceManifest(ManifestBase):
    """A compressed context's manifest: per piece its layers (`groups`) and work, and the recipe a session
    must match to use the pieces."""

    FORMAT = PIECES_FORMAT
    TABLE = ("pieces", "groups")

    groups: list[tuple[int, int]]  # per piece: its first and last layer (inclusive)
    work: list[int]  # per piece: bytes of its layers as fp16 (what decoding it produces)
    recipe: str  # the recipe identity (`Session.compressed_identity`): spec, kvlife version, turn end, files
    spec: str  # the recipe's spec alone, for messages and `kvlife fetch --method`
    codec_tokens: int = 256  # the codec's chunk tokens inside each piece

    @property
    def n_chunks(self) -> int:
        return len(self.groups)

    def chunk_ids(self, index: int) -> list[int]:
        raise StreamError("a compressed context's pieces have no tokens of their own to recompute")

    def namespace(self, level: str, index: int) -> Namespace:
        first, last = self.groups[index]
        return compressed_namespace(self.model_fingerprint, self.dtype, self.recipe, level_encoding(level),
                                    self.codec_tokens, salt=f"stream-piece:{index}:{first}-{last}")

    def _level_keys(self, level: str) -> list[str]:
        return [entry_key(self.namespace(level, i), self.token_ids) for i in range(self.n_chunks)]

    def _own_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return ({"recipe": self.recipe, "spec": self.spec, "codec_tokens": self.codec_tokens},
                {"groups": [list(g) for g in self.groups], "work": self.work})

    @classmethod
    def _own_from_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"groups": [(int(first), int(last)) for first, last in data["groups"]],
                "work": [int(w) for w in data["work"]], "recipe": str(data["recipe"]),
                "spec": str(data["spec"]), "codec_tokens": int(data["codec_tokens"])}

    @classmethod
    def _table_length(cls, own: dict[str, Any], token_ids: list[int]) -> int:
        return len(own["groups"])

    def _check(self) -> None:
        groups, levels = self.groups, self.levels
        expected = 0
        for first, last in groups:
            if first != expected or last < first:
                raise StreamError(f"manifest layer groups do not cover the layers in order: {groups}")
            expected = last + 1
        if not groups or not self.token_ids or len(self.work) != len(groups) or \
                any(level not in PIECE_LEVELS for level in levels) or not levels:
            raise StreamError(f"manifest needs tokens, layer groups, their work and known levels "
                              f"(got {levels})")


@dataclass
class PiecesContext:
    """A compressed context ready to upload: its manifest and every level's pieces."""

    manifest: PieceManifest
    chunks: dict[str, list[bytes]]  # level -> piece payloads

    def payloads(self) -> dict[str, bytes]:
        """Store key -> payload, in `PieceManifest.keys` order."""
        parts = [part for level in self.manifest.levels for part in self.chunks[level]]
        return dict(zip(self.manifest.keys(), parts, strict=True))


def fp16_bytes(layer: StoredLayer) -> int:
    """What a stored layer's float pieces take as fp16, and its exact tensors as they are."""
    floats = sum(2 * (k.numel() + v.numel()) for k, v, _ in layer.pieces)
    return floats + sum(t.numel() * t.element_size() for t in layer.exact.values())


def build_pieces(layers: Sequence[StoredLayer], token_ids: Sequence[int], context_id: str,
                 model_fingerprint: str, dtype: str, recipe: str, spec: str,
                 levels: Sequence[str] | None = None,
                 layers_per_piece: int = 1, rope: Any = None, codec_tokens: int = 256, model: str = "",
                 extra: dict[str, Any] | None = None, weights: Any = None) -> PiecesContext:
    """Cut a compressed context's stored layers (`Session.stored_context`) into pieces of `layers_per_piece`
    layers and encode each at every level in `levels` (default: raw and every codec level); `weights`: the
    model's per-layer channel weights (a codec profile), for the codec levels."""
    check_context_id(context_id)
    levels = check_levels(levels)
    if layers_per_piece < 1:
        raise StreamError(f"layers per piece must be >= 1, not {layers_per_piece}")
    if not layers:
        raise StreamError("no layers to stream")
    groups = [(first, min(first + layers_per_piece, len(layers)) - 1)
              for first in range(0, len(layers), layers_per_piece)]
    chunks: dict[str, list[bytes]] = {}
    infos: dict[str, list[ChunkInfo]] = {}
    for level in levels:
        parts = [encode_entry(layers[first:last + 1], level_encoding(level), rope, codec_tokens,
                              None if weights is None else weights[first:last + 1])
                 for first, last in groups]
        chunks[level] = parts
        infos[level] = [ChunkInfo(len(p), hashlib.sha256(p).hexdigest(), zlib.crc32(p)) for p in parts]
    work = [sum(fp16_bytes(layer) for layer in layers[first:last + 1]) for first, last in groups]
    manifest = PieceManifest(context_id=context_id, token_ids=[int(t) for t in token_ids], levels=levels,
                             chunks=infos, model_fingerprint=model_fingerprint, dtype=dtype, model=model,
                             extra=dict(extra or {}), groups=groups, work=work, recipe=recipe, spec=spec,
                             codec_tokens=codec_tokens)
    return PiecesContext(manifest, chunks)


class PieceBuilder:
    """The fetch's worker side for pieces (`CacheBuilder`'s part for dense chunks): decodes each checked
    piece into its stored layers, a refined piece over the old one; `finish` gives every layer in order."""

    def __init__(self, manifest: PieceManifest) -> None:
        self.manifest = manifest
        self.pieces: list[list[StoredLayer] | None] = [None] * manifest.n_chunks
        self.tokens = 0  # `Fetch` reads it only to recompute, which pieces never do

    def _decode(self, index: int, data: bytes, crc32: int) -> list[StoredLayer]:
        if zlib.crc32(data) != crc32:
            raise StreamError(f"piece {index}: CRC-32 mismatch")
        try:
            layers = decode_entry(data)
        except ChunkCorrupt as exc:
            raise StreamError(f"piece {index}: {exc}") from None
        first, last = self.manifest.groups[index]
        if len(layers) != last - first + 1:
            raise StreamError(f"piece {index} holds {len(layers)} layers, the manifest names "
                              f"{last - first + 1}")
        return layers

    def add_encoded(self, index: int, data: bytes, crc32: int) -> None:
        self.pieces[index] = self._decode(index, data, crc32)

    def replace_encoded(self, index: int, data: bytes, crc32: int) -> None:
        self.pieces[index] = self._decode(index, data, crc32)

    def recompute(self, token_ids: Sequence[int]) -> None:
        raise StreamError("a compressed context's pieces cannot be recomputed one by one")

    def finish(self) -> list[StoredLayer]:
        missing = [i for i, piece in enumerate(self.pieces) if piece is None]
        if missing:
            raise StreamError(f"pieces {missing} never arrived")
        return [layer for piece in self.pieces for layer in piece]
