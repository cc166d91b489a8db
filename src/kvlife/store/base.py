"""The backend interface every tier implements, and the store's own errors.

A backend holds opaque chunk blobs under hex keys: it never decodes them. Integrity is checked
above it (`envelope.open_chunk`), so a backend that returns garbage costs a recompute, never a
wrong cache. Backends raise `StoreUnavailable` when they cannot answer (server down, disk full);
the tiered store turns that into a miss and one warning.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from kvlife.errors import KvlifeError

KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class StoreError(KvlifeError):
    """A store URL or option is wrong, or a store request is malformed."""


class StoreUnavailable(StoreError):
    """A backend cannot answer now (unreachable, refused, full); callers recompute instead."""


class ChunkCorrupt(StoreError):
    """A stored chunk fails its checksum or does not belong to the key it was read under."""


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise StoreError(f"invalid chunk key {key!r}: expected 64 lowercase hex digits")
    return key


class Backend:
    """One tier: opaque blobs under chunk keys."""

    name = "backend"

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        raise NotImplementedError

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        raise NotImplementedError

    def put(self, key: str, blob: bytes) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Drop a key (used when a read fails its checksum); missing keys are fine."""

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def __repr__(self) -> str:
        return self.name
