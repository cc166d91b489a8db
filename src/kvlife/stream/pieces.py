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
from dataclasses import dataclass, field
from typing import Any

from kvlife.codec import LEVELS
from kvlife.store.base import ChunkCorrupt
from kvlife.store.entries import StoredLayer, compressed_namespace, decode_entry, encode_entry, entry_key
from kvlife.store.keys import Namespace
from kvlife.stream.context import ChunkInfo, StreamError, check_context_id

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


@dataclass
class PieceManifest:
    context_id: str
    token_ids: list[int]
    levels: list[str]  # best quality first
    chunks: dict[str, list[ChunkInfo]]  # level -> per piece (the name `Fetch` and `StreamClient.chunk` read)
    groups: list[tuple[int, int]]  # per piece: its first and last layer (inclusive)
    work: list[int]  # per piece: bytes of its layers as fp16 (what decoding it produces)
    model_fingerprint: str
    dtype: str
    recipe: str  # the recipe identity (`Session.compressed_identity`): spec, kvlife version, turn end, files
    spec: str  # the recipe's spec alone, for messages and `kvlife fetch --method`
    codec_tokens: int = 256  # the codec's chunk tokens inside each piece
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    _keys: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_chunks(self) -> int:
        return len(self.groups)

    def chunk_ids(self, index: int) -> list[int]:
        raise StreamError("a compressed context's pieces have no tokens of their own to recompute")

    def size(self, level: str, index: int) -> int:
        return self.chunks[level][index].bytes

    def namespace(self, level: str, index: int) -> Namespace:
        first, last = self.groups[index]
        return compressed_namespace(self.model_fingerprint, self.dtype, self.recipe, level_encoding(level),
                                    self.codec_tokens, salt=f"stream-piece:{index}:{first}-{last}")

    def chunk_key(self, level: str, index: int) -> str:
        if level not in self._keys:
            self._keys[level] = [entry_key(self.namespace(level, i), self.token_ids)
                                 for i in range(self.n_chunks)]
        return self._keys[level][index]

    def keys(self) -> list[str]:
        """Every store key the context names: each level's pieces in order."""
        return [self.chunk_key(level, i) for level in self.levels for i in range(self.n_chunks)]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PIECES_FORMAT, "context_id": self.context_id, "model": self.model,
            "model_fingerprint": self.model_fingerprint, "dtype": self.dtype, "recipe": self.recipe,
            "spec": self.spec, "codec_tokens": self.codec_tokens, "levels": self.levels,
            "groups": [list(g) for g in self.groups], "work": self.work,
            "chunks": {level: [[c.bytes, c.sha256, c.crc32] for c in infos]
                       for level, infos in self.chunks.items()},
            "token_ids": self.token_ids, "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: Any) -> PieceManifest:
        """Validate a manifest read from the network; raises StreamError naming what is wrong."""
        if not isinstance(data, dict) or data.get("format") != PIECES_FORMAT:
            raise StreamError(f"not a {PIECES_FORMAT} manifest")
        try:
            groups = [(int(first), int(last)) for first, last in data["groups"]]
            levels = [str(level) for level in data["levels"]]
            chunks = {}
            for level in levels:
                rows = data["chunks"][level]
                if len(rows) != len(groups):
                    raise StreamError(f"manifest level {level}: {len(rows)} pieces, the groups need "
                                      f"{len(groups)}")
                chunks[level] = [ChunkInfo(int(b), str(s), int(c)) for b, s, c in rows]
            manifest = cls(check_context_id(str(data["context_id"])), [int(t) for t in data["token_ids"]],
                           levels, chunks, groups, [int(w) for w in data["work"]],
                           str(data["model_fingerprint"]), str(data["dtype"]), str(data["recipe"]),
                           str(data["spec"]), int(data["codec_tokens"]), str(data.get("model", "")),
                           dict(data.get("extra", {})))
        except StreamError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise StreamError(f"malformed manifest: {type(exc).__name__}: {exc}") from None
        expected = 0
        for first, last in groups:
            if first != expected or last < first:
                raise StreamError(f"manifest layer groups do not cover the layers in order: {groups}")
            expected = last + 1
        if not groups or not manifest.token_ids or len(manifest.work) != len(groups) or \
                any(level not in PIECE_LEVELS for level in levels) or not levels:
            raise StreamError(f"manifest needs tokens, layer groups, their work and known levels "
                              f"(got {levels})")
        return manifest


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
                 extra: dict[str, Any] | None = None) -> PiecesContext:
    """Cut a compressed context's stored layers (`Session.stored_context`) into pieces of `layers_per_piece`
    layers and encode each at every level in `levels` (default: raw and every codec level)."""
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
        parts = [encode_entry(layers[first:last + 1], level_encoding(level), rope, codec_tokens)
                 for first, last in groups]
        chunks[level] = parts
        infos[level] = [ChunkInfo(len(p), hashlib.sha256(p).hexdigest(), zlib.crc32(p)) for p in parts]
    work = [sum(fp16_bytes(layer) for layer in layers[first:last + 1]) for first, last in groups]
    manifest = PieceManifest(context_id, [int(t) for t in token_ids], levels, infos, groups, work,
                             model_fingerprint, dtype, recipe, spec, codec_tokens, model, dict(extra or {}))
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
