"""KVStore: tiers stacked fastest first (memory, disk, Redis, remote), with longest-prefix lookup.

A lookup asks every live tier which of a chain of chunk keys it holds and takes the longest run
from the first chunk that some tier holds; the chunks are read from the fastest tier holding each,
verified (`envelope.open_chunk`) and copied up into the faster tiers. Puts go to every tier.

A tier that fails (Redis down, server unreachable, disk full, wrong token) is skipped for
`retry_s` seconds and reported once per tier with a warning on the `kvlife.store` logger; its
chunks count as misses, so the caller recomputes. A chunk that fails its checksum is a miss too
(and is deleted from that tier).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlparse

from kvlife.store.base import Backend, ChunkCorrupt, StoreError, StoreUnavailable
from kvlife.store.chunks import check_encoding
from kvlife.store.disk import DiskBackend
from kvlife.store.envelope import open_chunk, seal_chunk
from kvlife.store.memory import MemoryBackend
from kvlife.store.redis_backend import RedisBackend
from kvlife.store.remote import RemoteBackend

log = logging.getLogger("kvlife.store")


class KVStore:
    def __init__(self, tiers: Sequence[Backend], encoding: str = "raw", chunk_size: int = 256,
                 retry_s: float = 30.0) -> None:
        if not tiers:
            raise StoreError("a store needs at least one tier")
        if chunk_size < 1:
            raise StoreError(f"chunk_size must be >= 1, not {chunk_size}")
        self.tiers = list(tiers)
        self.encoding = check_encoding(encoding)
        self.chunk_size = chunk_size
        self.retry_s = retry_s
        self.down_until = [0.0] * len(self.tiers)
        self.warned: set[int] = set()
        self.counters = {"lookups": 0, "hit_chunks": 0, "miss_chunks": 0, "corrupt_chunks": 0,
                         "put_chunks": 0, "put_bytes": 0, "tier_failures": 0}

    # ---- failure handling ------------------------------------------------------------------------

    def _live(self) -> list[int]:
        now = time.monotonic()
        return [i for i in range(len(self.tiers)) if self.down_until[i] <= now]

    def _guard(self, index: int, fn, default):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any tier failure is a miss, never a crash
            if not isinstance(exc, (StoreUnavailable, OSError)):
                exc = f"{type(exc).__name__}: {exc}"
            self.down_until[index] = time.monotonic() + self.retry_s
            self.counters["tier_failures"] += 1
            if index not in self.warned:
                self.warned.add(index)
                log.warning("kvlife store: tier %s failed (%s); recomputing without it", self.tiers[index],
                            exc)
            return default

    # ---- reads -----------------------------------------------------------------------------------

    def longest_prefix(self, keys: Sequence[str]) -> int:
        """How many leading keys some live tier holds."""
        held = [False] * len(keys)
        for index in self._live():
            if all(held):
                break
            flags = self._guard(index, lambda t=self.tiers[index]: t.exists_many(keys), [False] * len(keys))
            held = [a or bool(b) for a, b in zip(held, flags)]
        count = 0
        while count < len(keys) and held[count]:
            count += 1
        return count

    def fetch_prefix(self, keys: Sequence[str]) -> list[bytes]:
        """Verified payloads of the longest stored prefix of `keys` (possibly empty)."""
        self.counters["lookups"] += 1
        wanted = self.longest_prefix(keys)
        payloads: list[bytes | None] = [None] * wanted
        sealed: list[bytes | None] = [None] * wanted
        source = [-1] * wanted
        for index in self._live():
            missing = [i for i in range(wanted) if payloads[i] is None]
            if not missing:
                break
            tier = self.tiers[index]
            blobs = self._guard(index, lambda t=tier, m=missing: t.get_many([keys[i] for i in m]),
                                [None] * len(missing))
            for i, blob in zip(missing, blobs):
                if blob is None:
                    continue
                try:
                    payloads[i] = open_chunk(keys[i], blob)
                except ChunkCorrupt as exc:
                    self.counters["corrupt_chunks"] += 1
                    log.warning("kvlife store: %s in %s; dropped, recomputing", exc, tier)
                    self._guard(index, lambda t=tier, k=keys[i]: t.delete(k), None)
                    continue
                sealed[i], source[i] = blob, index
        count = 0
        while count < wanted and payloads[count] is not None:
            count += 1
        for i in range(count):  # copy up into the faster tiers
            for index in self._live():
                if index >= source[i]:
                    break
                self._guard(index, lambda t=self.tiers[index], k=keys[i], b=sealed[i]: t.put(k, b), None)
        self.counters["hit_chunks"] += count
        self.counters["miss_chunks"] += len(keys) - count
        return [p for p in payloads[:count] if p is not None]

    # ---- writes ----------------------------------------------------------------------------------

    def put(self, key: str, payload: bytes) -> int:
        """Seal and store one chunk payload in every live tier; returns the sealed size if some tier took
        it, else 0 (every tier down: nothing was stored, so nothing is counted)."""
        blob = seal_chunk(key, payload)
        stored = False
        for index in self._live():
            stored |= self._guard(index, lambda t=self.tiers[index]: t.put(key, blob) or True, False)
        if not stored:
            return 0
        self.counters["put_chunks"] += 1
        self.counters["put_bytes"] += len(blob)
        return len(blob)

    def stats(self) -> dict[str, Any]:
        tiers = {}
        for index, tier in enumerate(self.tiers):
            tiers[str(tier)] = self._guard(index, tier.stats, {"error": "unavailable"})
        return {"encoding": self.encoding, "chunk_size": self.chunk_size, **self.counters, "tiers": tiers}

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def __repr__(self) -> str:
        tiers = ", ".join(map(str, self.tiers))
        return f"KVStore({tiers}; encoding={self.encoding}, chunk_size={self.chunk_size})"


def _size(text: str) -> int:
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    text = text.strip().lower().rstrip("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        raise StoreError(f"bad size {text!r}: use bytes or a suffix k/m/g/t, e.g. 4g") from None


def open_tier(spec: str) -> Backend:
    """One tier from a URL: memory[://?max_bytes=2g], disk:PATH[?max_bytes=..] or a path,
    redis://HOST:PORT/DB[?ttl=SECONDS], http(s)://HOST:PORT[?token=TOKEN]."""
    spec = spec.strip()
    url = urlparse(spec)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    if spec.startswith("memory"):
        return MemoryBackend(_size(query.get("max_bytes", "2g")))
    if url.scheme == "redis" or url.scheme == "rediss":
        ttl = int(query.pop("ttl", 24 * 3600))
        rest = "&".join(f"{k}={v}" for k, v in query.items())
        base = spec.split("?", 1)[0] + (f"?{rest}" if rest else "")
        return RedisBackend(base, ttl_s=ttl)
    if url.scheme in ("http", "https"):
        return RemoteBackend(f"{url.scheme}://{url.netloc}{url.path}", token=query.get("token"))
    if url.scheme == "disk" or spec.startswith("disk:") or url.scheme in ("", "file"):
        path = spec.split("?", 1)[0]
        for prefix in ("disk://", "disk:", "file://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
        if not path:
            raise StoreError(f"store tier {spec!r} names no directory")
        return DiskBackend(path, _size(query.get("max_bytes", "64g")))
    raise StoreError(f"unknown store tier {spec!r}: use memory, disk:PATH, redis://HOST:PORT or http://HOST:PORT")


def open_store(spec: str | KVStore, encoding: str = "raw", chunk_size: int = 256) -> KVStore:
    """A KVStore from comma-separated tier URLs, fastest first, e.g. "memory,disk:/tmp/kv,redis://127.0.0.1:6379"."""
    if isinstance(spec, KVStore):
        return spec
    tiers = [open_tier(part) for part in spec.split(",") if part.strip()]
    return KVStore(tiers, encoding=encoding, chunk_size=chunk_size)
