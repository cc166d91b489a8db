"""The bytes every tier stores for one chunk: a fixed header with the key and a SHA-256, then the payload.

    magic "KVLSTOR1" | key (32 bytes) | payload length (u64 LE) | sha256(payload) (32 bytes) | payload

`open_chunk` verifies all of it, so a truncated, bit-flipped or misfiled chunk (a blob stored under
another key) is refused on read. Torch-free: the server uses it to check uploads.
"""

from __future__ import annotations

import hashlib
import struct

from kvlife.store.base import ChunkCorrupt, check_key

MAGIC = b"KVLSTOR1"
HEADER = struct.Struct("<8s32sQ32s")


def seal_chunk(key: str, payload: bytes) -> bytes:
    """The envelope of `payload` stored under `key`."""
    return envelope_header(key, payload) + payload


def envelope_header(key: str, payload: bytes) -> bytes:
    """The envelope's header alone (an upload sends it, then the payload, without joining them)."""
    check_key(key)
    return HEADER.pack(MAGIC, bytes.fromhex(key), len(payload), hashlib.sha256(payload).digest())


def check_header(key: str, blob: bytes | memoryview) -> tuple[int, bytes]:
    """(payload length, digest) from the header; raises ChunkCorrupt if it is not this key's chunk."""
    if len(blob) < HEADER.size:
        raise ChunkCorrupt(f"chunk {key[:12]}: truncated header ({len(blob)} bytes)")
    magic, raw_key, length, digest = HEADER.unpack(bytes(blob[: HEADER.size]))
    if magic != MAGIC:
        raise ChunkCorrupt(f"chunk {key[:12]}: not a kvlife store chunk")
    if raw_key.hex() != key:
        raise ChunkCorrupt(f"chunk {key[:12]}: stored under the wrong key ({raw_key.hex()[:12]})")
    return length, digest


def open_chunk(key: str, blob: bytes) -> bytes:
    """The verified payload of an envelope read under `key`."""
    length, digest = check_header(key, blob)
    payload = memoryview(blob)[HEADER.size:]
    if len(payload) != length:
        raise ChunkCorrupt(f"chunk {key[:12]}: {len(payload)} payload bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise ChunkCorrupt(f"chunk {key[:12]}: checksum mismatch")
    return bytes(payload)
