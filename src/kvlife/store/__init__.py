"""kvlife.store: a KV cache store with prefix reuse, tiered memory -> disk -> Redis -> remote server, and the
one server, `kvlife serve`, for chunks and streamed contexts.

    from kvlife.store import open_store
    store = open_store("memory,disk:/tmp/kvstore,redis://127.0.0.1:6379/0")
    session = Session(model, tokenizer, store=store)   # a context seen once is prefilled once

Layers: README.md. See docs/store.md.
"""

from kvlife.store.base import Backend, ChunkCorrupt, StoreError, StoreUnavailable
from kvlife.store.keys import Namespace, chunk_keys
from kvlife.store.tiers import KVStore, open_store, open_tier

__all__ = [
    "Backend", "ChunkCorrupt", "KVStore", "Namespace", "StoreError", "StoreUnavailable", "chunk_keys",
    "open_store", "open_tier",
]
