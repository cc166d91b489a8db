"""Prefix reuse for a Session: look up the longest stored prefix, prefill only the rest, store new chunks.

Semantics (what is reusable): prefix chunks hold only caches made by a dense prefill without
compression. A compressed context in multi-request mode (compressed before any query) is stored whole
instead (`prefill_compressed`, `kvlife.store.entries`): one entry under a namespace that holds the
recipe, found only by the same recipe, model, dtype, encoding, tenant salt and every context token.
In multi-turn mode a compress method sees the first query with the context, so that cache serves one
conversation only and is not stored (the log says so). A sparse prefill method (its keys depend on
what the prefill attended to), a compress method (the prefix cache depends on the whole prefill and,
in multi-turn, on the query), a load method that indexes the prefill (`observe`, e.g.
retrieval_attention) and sliding-window layers (they keep only the last window, so a prefix is not
a slice of the cache) all prefill as usual; the session logs once that the store is not used and
why. Load methods that only act at decode (quest) reuse the dense prefix, so `dense` and `quest` runs
share their stored prefills. The key's recipe part is therefore "dense-prefill" for every stored chunk.

Positions: a hit of k chunks holds tokens 0..k*C-1 at positions 0..k*C-1; the rest of the prompt is
prefilled at k*C onwards, exactly as in one full prefill. At least one token is always prefilled
(the lookup covers all but the last token) because the caller needs its logits.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from kvlife.models import model_fingerprint
from kvlife.store.base import ChunkCorrupt
from kvlife.store.chunks import concat_layers, decode_chunk, encode_chunk, slice_layers
from kvlife.store.entries import compressed_namespace, decode_entry, encode_entry, entry_key
from kvlife.store.keys import DENSE_PREFILL, Namespace, chunk_keys
from kvlife.store.profiles import CodecSetup, codec_setup
from kvlife.store.tiers import KVStore, open_store

log = logging.getLogger("kvlife.store")


def reuse_blocker(recipe: Any, compress: bool, cache: Any) -> str | None:
    """Why this prefill's cache cannot come from (or go to) the store, or None if it can."""
    prefill = getattr(recipe, "prefill", None)
    if prefill is not None and prefill.name != "dense":
        return f"prefill method {prefill.spec()} shapes the prefix cache"
    if compress:
        return (f"compress method {recipe.compress.spec()} changes the prefix cache (multi-turn: it "
                "compresses the context together with the first query, so the cache serves that conversation "
                "only; multi-request mode stores compressed contexts)")
    load = getattr(recipe, "load", None)
    if load is not None and hasattr(load, "observe"):
        return f"load method {load.spec()} indexes the prefill as it runs"
    if any(getattr(layer, "sliding_window", None) for layer in cache.layers):
        return "the model has sliding-window layers"
    if getattr(cache, "has_state", False):  # see docs/hybrid.md
        return ("the model has recurrent (SSM/conv) layers: a prefix's K/V is of no use without the "
                "recurrent state at the chunk boundary, which the store does not hold")
    return None


class PrefixStore:
    """What a Session holds when given `store=`: the store, its namespace, and the reuse logic."""

    def __init__(self, store: KVStore | str, salt: str = "", encoding: str | None = None,
                 chunk_size: int | None = None) -> None:
        if isinstance(store, str):
            store = open_store(store, encoding=encoding or "raw", chunk_size=chunk_size or 256)
        self.store = store
        self.salt = salt
        self.namespace: Namespace | None = None
        self.codec: CodecSetup | None = None  # the model's RoPE and profile for a kvlife encoding
        self.noted: set[str] = set()
        self.last: dict[str, Any] = {}  # figures of the latest prefill through the store

    def _codec(self, model: Any) -> CodecSetup:
        if self.codec is None:
            self.codec = codec_setup(model, self.store.encoding)
        return self.codec

    def _namespace(self, model: Any) -> Namespace:
        if self.namespace is None:
            dtype = str(next(model.parameters()).dtype).replace("torch.", "")
            encoding = self._codec(model).namespace_encoding
            self.namespace = Namespace(model_fingerprint(model), dtype, DENSE_PREFILL, encoding,
                                       self.store.chunk_size, self.salt)
        return self.namespace

    @torch.no_grad()
    def prefill(self, session: Any, ids: list[int], compress: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """Fill `session.cache` (empty) with the prefill of `ids`, the longest stored prefix loaded and the
        rest run through the model; returns the logits of the last token and the figures for the turn's
        stats (none when the store was not used)."""
        blocker = reuse_blocker(session.recipe, compress, session.cache)
        if blocker is not None:
            if blocker not in self.noted:
                self.noted.add(blocker)
                log.info("kvlife store: not used for recipe %s: %s", session.recipe.spec, blocker)
            self.last = {"store_hit_tokens": 0, "store_skipped": blocker}
            return session.forward(ids, phase="prefill", compress=compress), {}
        size = self.store.chunk_size
        keys = chunk_keys(ids, self._namespace(session.model))
        started = time.perf_counter()
        payloads = self.store.fetch_prefix(keys[: (len(ids) - 1) // size])
        fetched = time.perf_counter()
        hit = self._load(session.cache, payloads, session.device)
        loaded = time.perf_counter()
        logits = session.forward(ids[hit * size:], phase="prefill", compress=False)
        computed = time.perf_counter()
        try:
            put_bytes = self._put_new(session.cache, keys, hit, len(ids))
        except Exception as exc:  # encoding failed (e.g. a codec limit): the answer goes on, unstored
            put_bytes = 0
            if "put" not in self.noted:
                self.noted.add("put")
                log.warning("kvlife store: could not encode chunks for storing (%s); continuing without", exc)
        self.last = {"store_hit_tokens": hit * size, "store_fetch_s": round(fetched - started, 5),
                     "store_load_s": round(loaded - fetched, 5),
                     "store_prefill_s": round(computed - loaded, 5),
                     "store_put_s": round(time.perf_counter() - computed, 5), "store_put_bytes": put_bytes}
        return logits, self.last

    @staticmethod
    def _load(cache: Any, payloads: list[bytes], device: torch.device) -> int:
        """Put the decoded `payloads` into the empty `cache`; returns how many chunks it holds. Chunks that do
        not fit this model leave the cache as it was (through its own rollback) and count as misses."""
        if not payloads:
            return 0
        empty = cache.checkpoint()
        try:
            layers = concat_layers([decode_chunk(p) for p in payloads])
            if len(layers) != len(cache.layers):
                raise ValueError(f"{len(layers)} stored layers, the model has {len(cache.layers)}")
            for layer, (keys, values, positions) in zip(cache.layers, layers):
                keys, values = keys.to(device), values.to(device)
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values, layer.positions = keys, values, positions.to(device, torch.long)
                layer.next_position = int(positions.shape[-1])
        except Exception as exc:  # a chunk that decodes to the wrong shapes: recompute, never serve it
            log.warning("kvlife store: stored prefix does not fit this model (%s); recomputing", exc)
            cache.rollback(empty)
            return 0
        return len(payloads)

    def _put_new(self, cache: Any, keys: list[str], hit: int, n_tokens: int) -> int:
        if hit >= len(keys):
            return 0
        layers = cache.to_tensors()
        if any(p.shape[-1] != n_tokens for _, _, p in layers):
            return 0  # the cache is not the plain prefill of these tokens: store nothing
        size, stored = self.store.chunk_size, 0
        for index in range(hit, len(keys)):
            part = slice_layers(layers, index * size, (index + 1) * size)
            stored += self.store.put(keys[index], encode_chunk(part, self.store.encoding, self.codec.rope,
                                                               self.codec.weights))
        return stored

    # ---- whole-context entries: compressed caches in multi-request mode --------------------------

    @torch.no_grad()
    def prefill_compressed(self, session: Any, ids: list[int], identity: str, to_stored: Any,
                           restore: Any) -> dict[str, Any]:
        """Fill `session.cache` (empty) with the compressed cache of `ids`: the stored entry when there is
        one, else a prefill that compresses (then stored). `identity`: the recipe's (`recipe_identity`);
        `to_stored(cache)` / `restore(cache, layers, device)` convert layers (kvlife.methods.compress.stored).
        A lossy encoding hands the session the decoded entry on a miss too, so that every run answers on
        what the store holds. Returns the figures for the prefill's stats."""
        load = getattr(session.recipe, "load", None)
        blocker = None
        if load is not None and hasattr(load, "observe"):
            blocker = f"load method {load.spec()} indexes the prefill as it runs"
        elif getattr(session.cache, "has_state", False):
            blocker = ("the model has recurrent (SSM/conv) layers, whose state whole-context entries do not "
                       "hold")
        if blocker is not None:
            if blocker not in self.noted:
                self.noted.add(blocker)
                log.info("kvlife store: not used for recipe %s: %s", session.recipe.spec, blocker)
            session.forward(ids, phase="prefill", compress=True)
            self.last = {"store_hit_tokens": 0, "store_skipped": blocker}
            return self.last
        model = session.model
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        codec = self._codec(model)
        namespace = compressed_namespace(model_fingerprint(model), dtype, identity, codec.namespace_encoding,
                                         self.store.chunk_size, self.salt)
        key = entry_key(namespace, ids)
        started = time.perf_counter()
        payloads = self.store.fetch_prefix([key])
        fetched = time.perf_counter()
        if payloads:
            empty = session.cache.checkpoint()
            try:
                restore(session.cache, decode_entry(payloads[0]), session.device)
            except (ChunkCorrupt, ValueError, KeyError) as exc:  # never served: recomputed and stored again
                session.cache.rollback(empty)
                log.warning("kvlife store: stored compressed context %s does not load (%s); recomputing",
                            key[:12], exc)
            else:
                self.last = {"store_hit_tokens": len(ids), "store_entry": key,
                             "store_fetch_s": round(fetched - started, 5),
                             "store_load_s": round(time.perf_counter() - fetched, 5),
                             "store_entry_bytes": len(payloads[0])}
                return self.last
        session.forward(ids, phase="prefill", compress=True)
        computed = time.perf_counter()
        put_bytes, payload = 0, b""
        try:
            payload = encode_entry(to_stored(session.cache), self.store.encoding, codec.rope,
                                   self.store.chunk_size, codec.weights)
            put_bytes = self.store.put(key, payload)
        except Exception as exc:  # a cache the codec refuses (e.g. a limit): the answer goes on, unstored
            if "put" not in self.noted:
                self.noted.add("put")
                log.warning("kvlife store: could not encode the compressed context for storing (%s); "
                            "continuing without", exc)
        if payload and self.store.encoding != "raw":
            restore(session.cache, decode_entry(payload), session.device)
        self.last = {"store_hit_tokens": 0, "store_entry": key,
                     "store_prefill_s": round(computed - fetched, 5),
                     "store_put_s": round(time.perf_counter() - computed, 5), "store_put_bytes": put_bytes,
                     "store_entry_bytes": len(payload)}
        return self.last
