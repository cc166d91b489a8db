"""A streamable context: one KV cache encoded at several codec levels, chunk by chunk, with its token ids.

A streamed context is store chunks plus a manifest. Chunk I at LEVEL is the codec's part for tokens
I*C .. (I+1)*C-1 of every layer, stored under its key in the store namespace of that level
(`Manifest.namespace`: encoding "kvlife:LEVEL", the codec header's SHA-256 as the salt, since a part
decodes only with its header); the header, shared by every level but for the chunk table, is stored
under its own SHA-256. The manifest is what the client plans with: token ids, chunk tokens, per level
and chunk the byte size, SHA-256 and CRC-32, the model fingerprint, the header's SHA-256.

Any mix of levels decodes (CacheGen's per-chunk choice), and any chunk can instead be recomputed from
its token ids on top of the chunks before it. The client checks every chunk's envelope and SHA-256
(and the codec its CRC-32) before using it.

`ManifestBase` holds what this manifest and a compressed context's (`kvlife.stream.pieces.PieceManifest`)
share: the common fields, their JSON and its validation, and the store-key cache.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from kvlife.codec import LEVELS, encode_levels
from kvlife.codec.format import chunk_bytes, parse_header
from kvlife.errors import KvlifeError
from kvlife.store.contexts import CONTEXT_ID
from kvlife.store.keys import DENSE_PREFILL, Namespace, chunk_keys

CONTEXT_FORMAT = "kvlife-stream/1"
RECOMPUTE = "recompute"


class StreamError(KvlifeError):
    """A streamed context is missing, malformed, does not fit the model, or cannot be fetched."""


def check_context_id(context_id: str) -> str:
    if not isinstance(context_id, str) or not CONTEXT_ID.match(context_id):
        raise StreamError(f"invalid context id {context_id!r}: 1-128 letters, digits, '.', '_', '-' "
                          "(not starting with '.')")
    return context_id


@dataclass
class ChunkInfo:
    bytes: int
    sha256: str
    crc32: int


M = TypeVar("M", bound="ManifestBase")


@dataclass(kw_only=True)
class ManifestBase(ABC):
    """What a dense `Manifest` and a compressed context's `PieceManifest` share: the context, the model
    it fits, its levels and per level a table of its chunks; their JSON and the store-key cache.

    A subclass names its FORMAT and adds its own fields: how they go to JSON (`_own_json`) and back
    (`_own_from_json`), how many rows a level's table has (`n_chunks`, `_table_length`), what else a
    valid manifest needs (`_check`) and a level's store keys (`_level_keys`)."""

    FORMAT: ClassVar[str]
    TABLE: ClassVar[tuple[str, str]]  # for messages: what a table's rows are, what their number comes from
    DEFAULT_DTYPE: ClassVar[str | None] = None  # what a manifest without "dtype" means (None: it needs one)

    context_id: str
    token_ids: list[int]
    levels: list[str]  # best quality first
    chunks: dict[str, list[ChunkInfo]]  # level -> per chunk (the name `Fetch` and `StreamClient.chunk` read)
    model_fingerprint: str
    dtype: str
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    _keys: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    @abstractmethod
    def n_chunks(self) -> int:
        """Rows in each level's chunk table."""

    @abstractmethod
    def _level_keys(self, level: str) -> list[str]:
        """The store key of every chunk at `level`, in order."""

    @abstractmethod
    def _own_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The subclass's fields as JSON: those its format puts before `levels`, and those after it."""

    @classmethod
    @abstractmethod
    def _own_from_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The subclass's fields read from JSON, as constructor keywords (KeyError etc. if malformed)."""

    @classmethod
    @abstractmethod
    def _table_length(cls, own: dict[str, Any], token_ids: list[int]) -> int:
        """How many rows each level's chunk table needs, given the fields `_own_from_json` read."""

    @abstractmethod
    def _check(self) -> None:
        """Raise StreamError if the parsed manifest cannot be used (no tokens, unknown levels, ...)."""

    def size(self, level: str, index: int) -> int:
        return self.chunks[level][index].bytes

    def chunk_key(self, level: str, index: int) -> str:
        if level not in self._keys:
            self._keys[level] = self._level_keys(level)
        return self._keys[level][index]

    def keys(self) -> list[str]:
        """Every chunk's store key: each level's chunks in order."""
        return [self.chunk_key(level, i) for level in self.levels for i in range(self.n_chunks)]

    def to_json(self) -> dict[str, Any]:
        before, after = self._own_json()
        return {
            "format": self.FORMAT, "context_id": self.context_id, "model": self.model,
            "model_fingerprint": self.model_fingerprint, "dtype": self.dtype,
            **before, "levels": self.levels, **after,
            "chunks": {level: [[c.bytes, c.sha256, c.crc32] for c in infos]
                       for level, infos in self.chunks.items()},
            "token_ids": self.token_ids, "extra": self.extra,
        }

    @classmethod
    def from_json(cls: type[M], data: Any) -> M:
        """Validate a manifest read from the network; raises StreamError naming what is wrong."""
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise StreamError(f"not a {cls.FORMAT} manifest")
        try:
            token_ids = [int(t) for t in data["token_ids"]]
            own = cls._own_from_json(data)
            levels = [str(level) for level in data["levels"]]
            length = cls._table_length(own, token_ids)
            chunks = {}
            for level in levels:
                rows = data["chunks"][level]
                if len(rows) != length:
                    row_name, counted_from = cls.TABLE
                    raise StreamError(f"manifest level {level}: {len(rows)} {row_name}, the {counted_from} "
                                      f"need {length}")
                chunks[level] = [ChunkInfo(int(b), str(s), int(c)) for b, s, c in rows]
            dtype = data["dtype"] if cls.DEFAULT_DTYPE is None else data.get("dtype", cls.DEFAULT_DTYPE)
            manifest = cls(context_id=check_context_id(str(data["context_id"])), token_ids=token_ids,
                           levels=levels, chunks=chunks, model_fingerprint=str(data["model_fingerprint"]),
                           dtype=str(dtype), model=str(data.get("model", "")),
                           extra=dict(data.get("extra", {})), **own)
        except StreamError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise StreamError(f"malformed manifest: {type(exc).__name__}: {exc}") from None
        manifest._check()
        return manifest


@dataclass(kw_only=True)
class Manifest(ManifestBase):
    """A dense context's manifest: chunks of `chunk_tokens` tokens, decoded with the codec header stored
    under `header_sha256`."""

    FORMAT = CONTEXT_FORMAT
    TABLE = ("chunks", "tokens")
    DEFAULT_DTYPE = "float32"

    chunk_tokens: int
    header_sha256: str
    header_bytes: int
    dtype: str = DEFAULT_DTYPE

    @property
    def n_chunks(self) -> int:
        return -(-len(self.token_ids) // self.chunk_tokens)

    def chunk_ids(self, index: int) -> list[int]:
        return self.token_ids[index * self.chunk_tokens:(index + 1) * self.chunk_tokens]

    def namespace(self, level: str) -> Namespace:
        """The store namespace of the context's chunks at `level`."""
        return Namespace(self.model_fingerprint, self.dtype, DENSE_PREFILL, f"kvlife:{level}",
                         self.chunk_tokens, salt=f"stream-header:{self.header_sha256}")

    def _level_keys(self, level: str) -> list[str]:
        return chunk_keys(self.token_ids, self.namespace(level), tail=True)

    @property
    def header_key(self) -> str:
        """The header is stored under its own SHA-256."""
        return self.header_sha256

    def keys(self) -> list[str]:
        """Every store key the context names: the header's, then each level's chunks in order."""
        return [self.header_key, *super().keys()]

    def _own_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return ({"chunk_tokens": self.chunk_tokens},
                {"header_sha256": self.header_sha256, "header_bytes": self.header_bytes})

    @classmethod
    def _own_from_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"chunk_tokens": int(data["chunk_tokens"]), "header_sha256": str(data["header_sha256"]),
                "header_bytes": int(data["header_bytes"])}

    @classmethod
    def _table_length(cls, own: dict[str, Any], token_ids: list[int]) -> int:
        return -(-len(token_ids) // max(own["chunk_tokens"], 1))

    def _check(self) -> None:
        levels = self.levels
        if self.chunk_tokens < 1 or not self.token_ids or not levels or set(levels) - set(LEVELS):
            raise StreamError(f"manifest needs tokens, chunk_tokens >= 1 and known levels (got {levels})")


@dataclass
class StreamContext:
    """A context ready to upload: its manifest, header and every level's chunk parts."""

    manifest: Manifest
    header: bytes
    chunks: dict[str, list[bytes]]  # level -> chunk bytes

    def payloads(self) -> dict[str, bytes]:
        """Store key -> payload: the header and every level's chunks (`Manifest.keys` order)."""
        parts = [part for level in self.manifest.levels for part in self.chunks[level]]
        return dict(zip(self.manifest.keys(), [self.header, *parts], strict=True))


def build_context(
    cache: Any,
    token_ids: Sequence[int],
    context_id: str,
    model_fingerprint: str,
    levels: Sequence[str] | None = None,
    chunk_tokens: int = 256,
    rope: Any = None,
    weights: Any = None,
    model: str = "",
) -> StreamContext:
    """Encode a context's cache (a dense prefill of exactly `token_ids`) at every level in `levels`."""
    check_context_id(context_id)
    levels = list(levels or LEVELS)
    unknown = [level for level in levels if level not in LEVELS]
    if unknown:
        raise StreamError(f"unknown level(s) {', '.join(unknown)}; levels: {', '.join(LEVELS)}")
    levels = [level for level in LEVELS if level in levels]  # best quality first
    held = cache.tokens_held()
    if any(n != len(token_ids) for n in held):
        raise StreamError(f"the cache holds {sorted(set(held))} tokens per layer, not the {len(token_ids)} "
                          "context tokens (stream only a dense prefill of the whole context)")
    streams = encode_levels(cache, levels, chunk_tokens=chunk_tokens, rope=rope, weights=weights)
    header_blob, chunks, infos = b"", {}, {}
    for level in levels:
        blob = streams[level]
        header = parse_header(blob)
        header_blob = bytes(blob[:header.header_bytes])  # the same for every level but the chunk table
        parts = [bytes(chunk_bytes(blob, header, i)) for i in range(header.n_chunks)]
        chunks[level] = parts
        infos[level] = [ChunkInfo(len(p), hashlib.sha256(p).hexdigest(), crc)  # the chunk table's checksum
                        for p, crc in zip(parts, header.chunk_crcs)]
    dtype = str(cache.layers[0].keys.dtype).replace("torch.", "")
    manifest = Manifest(context_id=context_id, token_ids=[int(t) for t in token_ids], levels=levels,
                        chunks=infos, model_fingerprint=model_fingerprint, dtype=dtype, model=model,
                        chunk_tokens=chunk_tokens, header_sha256=hashlib.sha256(header_blob).hexdigest(),
                        header_bytes=len(header_blob))
    return StreamContext(manifest, header_blob, chunks)

