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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class Manifest:
    context_id: str
    token_ids: list[int]
    chunk_tokens: int
    levels: list[str]  # best quality first
    chunks: dict[str, list[ChunkInfo]]  # level -> per chunk
    header_sha256: str
    header_bytes: int
    model_fingerprint: str
    model: str = ""
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)
    _keys: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_chunks(self) -> int:
        return -(-len(self.token_ids) // self.chunk_tokens)

    def chunk_ids(self, index: int) -> list[int]:
        return self.token_ids[index * self.chunk_tokens:(index + 1) * self.chunk_tokens]

    def size(self, level: str, index: int) -> int:
        return self.chunks[level][index].bytes

    def namespace(self, level: str) -> Namespace:
        """The store namespace of the context's chunks at `level`."""
        return Namespace(self.model_fingerprint, self.dtype, DENSE_PREFILL, f"kvlife:{level}",
                         self.chunk_tokens, salt=f"stream-header:{self.header_sha256}")

    def chunk_key(self, level: str, index: int) -> str:
        if level not in self._keys:
            self._keys[level] = chunk_keys(self.token_ids, self.namespace(level), tail=True)
        return self._keys[level][index]

    @property
    def header_key(self) -> str:
        """The header is stored under its own SHA-256."""
        return self.header_sha256

    def keys(self) -> list[str]:
        """Every store key the context names: the header's, then each level's chunks in order."""
        chunks = [self.chunk_key(level, i) for level in self.levels for i in range(self.n_chunks)]
        return [self.header_key, *chunks]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CONTEXT_FORMAT, "context_id": self.context_id, "model": self.model,
            "model_fingerprint": self.model_fingerprint, "dtype": self.dtype,
            "chunk_tokens": self.chunk_tokens, "levels": self.levels, "header_sha256": self.header_sha256,
            "header_bytes": self.header_bytes,
            "chunks": {level: [[c.bytes, c.sha256, c.crc32] for c in infos]
                       for level, infos in self.chunks.items()},
            "token_ids": self.token_ids, "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Validate a manifest read from the network; raises StreamError naming what is wrong."""
        if not isinstance(data, dict) or data.get("format") != CONTEXT_FORMAT:
            raise StreamError(f"not a {CONTEXT_FORMAT} manifest")
        try:
            ids = [int(t) for t in data["token_ids"]]
            chunk_tokens = int(data["chunk_tokens"])
            levels = [str(level) for level in data["levels"]]
            n_chunks = -(-len(ids) // max(chunk_tokens, 1))
            chunks = {}
            for level in levels:
                rows = data["chunks"][level]
                if len(rows) != n_chunks:
                    raise StreamError(f"manifest level {level}: {len(rows)} chunks, the tokens need "
                                      f"{n_chunks}")
                chunks[level] = [ChunkInfo(int(b), str(s), int(c)) for b, s, c in rows]
            manifest = cls(check_context_id(str(data["context_id"])), ids, chunk_tokens, levels, chunks,
                           str(data["header_sha256"]), int(data["header_bytes"]),
                           str(data["model_fingerprint"]), str(data.get("model", "")),
                           str(data.get("dtype", "float32")), dict(data.get("extra", {})))
        except StreamError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise StreamError(f"malformed manifest: {type(exc).__name__}: {exc}") from None
        if chunk_tokens < 1 or not ids or not levels or any(level not in LEVELS for level in levels):
            raise StreamError(f"manifest needs tokens, chunk_tokens >= 1 and known levels (got {levels})")
        return manifest


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
    manifest = Manifest(context_id, [int(t) for t in token_ids], chunk_tokens, levels, infos,
                        hashlib.sha256(header_blob).hexdigest(), len(header_blob), model_fingerprint, model,
                        dtype)
    return StreamContext(manifest, header_blob, chunks)

