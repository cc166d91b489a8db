"""kvlife.store: a KV cache store with prefix reuse, tiered memory -> disk -> Redis -> remote server.

    from kvlife.store import open_store
    store = open_store("memory,disk:/tmp/kvstore,redis://127.0.0.1:6379/0")
    session = Session(model, tokenizer, store=store)   # a context seen once is prefilled once

Layers (lower never import upper): prefix (Session glue) -> tiers (KVStore, open_store) ->
memory | disk | redis_backend | remote (tiers) -> envelope (checksummed bytes) -> keys, base.
chunks (tensor <-> payload) sits beside tiers and uses kvlife.codec. server (`kvlife serve`)
uses only disk, envelope and base, and imports no torch. See docs/store.md.
"""

from kvlife.store.base import Backend, ChunkCorrupt, StoreError, StoreUnavailable
from kvlife.store.keys import Namespace, chunk_keys, model_fingerprint
from kvlife.store.tiers import KVStore, open_store, open_tier

__all__ = [
    "Backend", "ChunkCorrupt", "KVStore", "Namespace", "StoreError", "StoreUnavailable", "chunk_keys",
    "model_fingerprint", "open_store", "open_tier",
]
