"""Memory tier: an in-process LRU dictionary with a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from kvlife.store.base import Backend


class MemoryBackend(Backend):
    """Blobs in an LRU order; puts evict the least recently used until the budget holds."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.name = f"memory(max_bytes={max_bytes})"
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, bytes] = OrderedDict()
        self.bytes_held = 0
        self.evictions = 0
        self.lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out = []
        with self.lock:
            for key in keys:
                blob = self.entries.get(key)
                if blob is not None:
                    self.entries.move_to_end(key)
                out.append(blob)
        return out

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        with self.lock:
            return [key in self.entries for key in keys]

    def put(self, key: str, blob: bytes) -> None:
        if len(blob) > self.max_bytes:
            return  # larger than the whole budget: not cached here
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes_held -= len(old)
            self.entries[key] = blob
            self.bytes_held += len(blob)
            while self.bytes_held > self.max_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.bytes_held -= len(evicted)
                self.evictions += 1

    def delete(self, key: str) -> None:
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes_held -= len(old)

    def stats(self) -> dict[str, Any]:
        return {"chunks": len(self.entries), "bytes": self.bytes_held, "max_bytes": self.max_bytes,
                "evictions": self.evictions}
