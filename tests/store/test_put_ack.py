"""A put counts only what some tier acknowledged: with every tier down, a prefill reports 0 bytes stored."""

import pytest
from tests.store.conftest import free_port

from kvlife.session import Session
from kvlife.store import open_store
from kvlife.store.base import Backend, StoreUnavailable
from kvlife.store.memory import MemoryBackend
from kvlife.store.tiers import KVStore
from tiny import ByteTokenizer, tiny_model

KEY = "ab" * 32


class Refusing(Backend):
    name = "refusing"

    def put(self, key: str, blob: bytes) -> None:
        raise StoreUnavailable("refusing: down")


def test_put_counts_only_acknowledged_bytes():
    assert KVStore([Refusing()]).put(KEY, b"payload") == 0
    store = KVStore([Refusing()])
    store.put(KEY, b"payload")
    assert store.counters["put_bytes"] == 0 and store.counters["put_chunks"] == 0
    both = KVStore([Refusing(), MemoryBackend(1 << 20)])
    size = both.put(KEY, b"payload")
    assert size > len(b"payload") and both.counters["put_bytes"] == size and both.counters["put_chunks"] == 1


@pytest.mark.parametrize("tiers, stored", [("redis://127.0.0.1:{port}/0", False),
                                           ("memory,redis://127.0.0.1:{port}/0", True)])
def test_prefill_with_redis_down_reports_what_was_stored(tiers, stored):
    store = open_store(tiers.format(port=free_port()), chunk_size=16)
    session = Session(tiny_model("qwen2"), ByteTokenizer(), "dense", mode="multi-request",
                      prompt_format="plain", store=store)
    session.prefill("the quick brown fox jumps over the lazy dog and keeps running far away. " * 3)
    assert (session.store.last["store_put_bytes"] > 0) == stored
    assert (store.counters["put_bytes"] > 0) == stored
