"""Every tier: put/get round trips, exists, longest-prefix lookup, budgets, and URL parsing."""

import hashlib

import pytest

from kvlife.store import KVStore, StoreError, open_store, open_tier
from kvlife.store.disk import DiskBackend
from kvlife.store.envelope import seal_chunk
from kvlife.store.memory import MemoryBackend


def key(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def test_put_get_round_trip(tier):
    blobs = {key(i): seal_chunk(key(i), bytes([i]) * (1000 + i)) for i in range(5)}
    for k, blob in blobs.items():
        tier.put(k, blob)
    assert tier.get_many(list(blobs)) == list(blobs.values())
    assert tier.get_many([key(99)]) == [None]
    assert tier.exists_many([key(0), key(99), key(4)]) == [True, False, True]
    big = seal_chunk(key(50), bytes(range(256)) * 20000)  # 5 MB: streamed by the server
    tier.put(key(50), big)
    assert tier.get(key(50)) == big
    tier.delete(key(50))
    assert tier.get(key(50)) is None


def test_longest_prefix_across_tiers(tier):
    fast = MemoryBackend(1 << 30)
    store = KVStore([fast, tier], chunk_size=4)
    keys = [key(100 + i) for i in range(4)]
    for i in (0, 1, 3):  # a gap at chunk 2: only 0 and 1 are a prefix
        tier.put(keys[i], seal_chunk(keys[i], b"chunk%d" % i))
    assert store.longest_prefix(keys) == 2
    assert store.fetch_prefix(keys) == [b"chunk0", b"chunk1"]
    assert fast.exists_many(keys) == [True, True, False, False]  # hits are copied up into the faster tier
    store.put(keys[2], b"chunk2")
    assert store.fetch_prefix(keys) == [b"chunk0", b"chunk1", b"chunk2", b"chunk3"]


def test_memory_lru_budget():
    memory = MemoryBackend(max_bytes=3000)
    for i in range(3):
        memory.put(key(i), b"x" * 1000)
    memory.get(key(0))  # now key 1 is the least recently used
    memory.put(key(3), b"y" * 1000)
    assert memory.exists_many([key(0), key(1), key(2), key(3)]) == [True, False, True, True]
    assert memory.stats()["bytes"] <= 3000


def test_disk_budget_evicts_oldest(tmp_path):
    import os
    import time

    disk = DiskBackend(tmp_path, max_bytes=5000)
    for i in range(4):
        disk.put(key(i), b"x" * 1000)
        os.utime(disk.path(key(i)), (time.time() - 100 + i, time.time() - 100 + i))
    disk.put(key(9), b"z" * 2500)
    assert disk.stats()["bytes"] <= 5000
    assert disk.exists_many([key(0), key(9)]) == [False, True]


def test_store_urls(tmp_path):
    store = open_store(f"memory://?max_bytes=1m,disk:{tmp_path}?max_bytes=2g", encoding="int8", chunk_size=64)
    assert [type(t) for t in store.tiers] == [MemoryBackend, DiskBackend]
    assert store.tiers[0].max_bytes == 1_000_000 and store.tiers[1].max_bytes == 2_000_000_000
    assert isinstance(open_tier(str(tmp_path / "plain")), DiskBackend)
    assert open_tier("redis://127.0.0.1:1/0?ttl=7").ttl_s == 7
    for bad in ("ftp://x", "memory://?max_bytes=lots"):
        with pytest.raises(StoreError):
            open_store(bad)
    with pytest.raises(StoreError, match="encoding"):
        open_store("memory", encoding="zip")
