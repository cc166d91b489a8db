"""Per-document caches: a document's K/V computed alone at positions 0..n-1, keyed by its own tokens.

Non-prefix reuse (CacheBlend, EPIC): the same document comes back after other documents and other
system prompts, so its prefix chunks never hit; its cache computed alone does, wherever it lands.

    namespace = Namespace(model fingerprint, dtype, "document-kv;tokenizer=<hash>", encoding, chunk size,
                          tenant)
    keys      = chunk_keys(document tokens, namespace, tail=True)     one per chunk, the last may be partial

so equal keys mean the same model, dtype, tokenizer, encoding, tenant and the same document tokens
from the document's first token: a cache from another model, dtype, tokenizer or tenant is never
found, let alone assembled. A document is stored as chunks (the tiers and the server take chunks of
bounded size); a lookup that finds only the first chunks of a document loads them and computes the
rest on top (a document's first chunks are the cache of its prefix). A missing document is computed
(a forward pass of the model over the document alone) and stored, never faked; a stored entry that
does not fit the model (layers, heads, head size, token count) is recomputed and stored again.

`place(layers, start, rope)` moves a document's keys from positions 0..n-1 to start..start+n-1 with
the codec's RoPE code (a rotation by `start`: RoPE rotations compose). Works with every tier
(memory, disk, Redis, a remote `kvlife serve`), since entries are ordinary store chunks.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvlife.codec import rope_from_config
from kvlife.codec.rope import RopeSpec, cos_sin, rotate
from kvlife.models import model_fingerprint
from kvlife.store.base import StoreError
from kvlife.store.chunks import Layers, concat_layers, decode_chunk, encode_chunk, slice_layers
from kvlife.store.keys import Namespace, chunk_keys
from kvlife.store.profiles import codec_setup
from kvlife.store.tiers import KVStore, open_store

# the recipe part of a document entry's namespace: a dense prefill of the document alone
DOCUMENT_KV = "document-kv"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (cached on the tokenizer): the same ids from another
    tokenizer are another text, so document keys name the tokenizer."""
    cached = getattr(tokenizer, "_kvlife_fingerprint", None)
    if cached:
        return cached
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    if vocab:
        body = json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False)
    else:  # a tokenizer without a vocabulary listing (tests' byte tokenizer): its class names it
        body = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    fingerprint = hashlib.sha256(body.encode()).hexdigest()[:16]
    try:
        tokenizer._kvlife_fingerprint = fingerprint
    except AttributeError:
        pass
    return fingerprint


def model_rope(model: Any) -> RopeSpec:
    """The model's plain RoPE, which re-rotation needs; a StoreError for any other position encoding."""
    rope = rope_from_config(model.config)
    if rope is None:
        raise StoreError("per-document caches need a model with plain RoPE (Llama, Qwen2, Mistral); this "
                         "model uses another position encoding, so its document caches cannot be moved")
    return rope


def place(layers: Layers, start: int, rope: RopeSpec) -> Layers:
    """A document's per-layer (keys, values, positions), computed at positions 0..n-1, moved to
    start..start+n-1."""
    if start == 0:
        return layers
    n = layers[0][0].shape[-2]
    angles = cos_sin(np.full((1, n), start, dtype=np.int64), rope)  # one rotation by `start` for every token
    out = []
    for keys, values, positions in layers:
        moved = keys[0].detach().to("cpu", torch.float32).numpy().copy()  # [heads, n, dim]
        rotate(moved, None, rope, inverse=False, angles=angles)
        out.append((torch.from_numpy(moved)[None].to(keys.device, keys.dtype), values, positions + start))
    return out


@dataclass
class DocumentFigures:
    """What one `get_or_compute` call did (summed over the documents of an assembly by the caller)."""

    hits: int = 0
    misses: int = 0
    partial_hits: int = 0
    hit_tokens: int = 0
    computed_tokens: int = 0
    fetch_s: float = 0.0
    compute_s: float = 0.0
    put_bytes: int = 0
    refused: list[str] = field(default_factory=list)  # why a stored entry was recomputed

    def add(self, other: DocumentFigures) -> None:
        for name in ("hits", "misses", "partial_hits", "hit_tokens", "computed_tokens", "put_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.fetch_s += other.fetch_s
        self.compute_s += other.compute_s
        self.refused += other.refused

    def as_dict(self) -> dict[str, Any]:
        return {"doc_hits": self.hits, "doc_misses": self.misses, "doc_partial_hits": self.partial_hits,
                "doc_hit_tokens": self.hit_tokens, "doc_computed_tokens": self.computed_tokens,
                "doc_fetch_s": round(self.fetch_s, 5), "doc_compute_s": round(self.compute_s, 5),
                "doc_put_bytes": self.put_bytes, **({"doc_refused": self.refused} if self.refused else {})}


class DocumentStore:
    """Document caches in a KVStore, for one model, dtype, tokenizer and tenant (`salt`)."""

    def __init__(self, store: KVStore | str, model: Any, tokenizer: Any, salt: str = "",
                 lead_in: list[int] | None = None) -> None:
        self.store = open_store(store) if isinstance(store, str) else store
        self.model = model
        self.tokenizer = tokenizer
        self.salt = salt
        self.device = next(model.parameters()).device
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        self.codec = codec_setup(model, self.store.encoding)
        self.lead_in = list(lead_in or [])
        recipe = f"{DOCUMENT_KV};tokenizer={tokenizer_fingerprint(tokenizer)}"
        if self.lead_in:  # documents computed after other tokens are other entries
            digest = hashlib.sha256(np.asarray(self.lead_in, dtype="<i8").tobytes()).hexdigest()[:16]
            recipe += f";lead-in={len(self.lead_in)}:{digest}"
        self.namespace = Namespace(model_fingerprint(model), dtype, recipe, self.codec.namespace_encoding,
                                   self.store.chunk_size, salt)
        self._lead_in_layers: Layers | None = None
        self._alone: DocumentStore | None = None
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if any(kind == "sliding_attention" for kind in (getattr(config, "layer_types", None) or [])):
            raise StoreError("per-document caches need full-attention layers; this model has sliding-window "
                             "layers (they keep only the last window, so a document's cache is not its whole "
                             "K/V)")
        self.shape = (config.num_hidden_layers, config.num_key_value_heads,
                      getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def assemble(self, pieces: list[list[int]], first_alone: bool = False,
                 ) -> tuple[Layers, list[tuple[int, int]], DocumentFigures]:
        """The cache of the pieces placed one after another (each looked up, or computed and stored, then
        moved to its place): per-layer (keys, values, positions 0..n-1), each piece's (start, stop), the
        figures. `first_alone`: the first piece (the context's head, at position 0 in every context) is
        computed alone even with a lead-in, which makes its cache exact."""
        rope = model_rope(self.model)
        figures, placed, spans, start = DocumentFigures(), [], [], 0
        for index, ids in enumerate(pieces):
            source = self.alone() if index == 0 and first_alone else self
            layers, done = source.get_or_compute(ids)
            figures.add(done)
            placed.append(place(layers, start, rope))
            spans.append((start, start + len(ids)))
            start += len(ids)
        return concat_layers(placed), spans, figures

    def alone(self) -> DocumentStore:
        """This store's documents computed alone (itself when it has no lead-in)."""
        if not self.lead_in:
            return self
        if self._alone is None:
            self._alone = DocumentStore(self.store, self.model, self.tokenizer, self.salt)
        return self._alone

    def keys(self, ids: list[int]) -> list[str]:
        return chunk_keys(ids, self.namespace, tail=True)

    def get_or_compute(self, ids: list[int]) -> tuple[Layers, DocumentFigures]:
        """The document's per-layer (keys [1, H, n, D], values, positions [H, n]) at positions 0..n-1: from
        the store when it holds them, else computed (the missing part only) and stored."""
        figures = DocumentFigures()
        if not ids:
            raise StoreError("a document needs at least one token")
        keys = self.keys(ids)
        started = time.perf_counter()
        payloads = self.store.fetch_prefix(keys)
        loaded: Layers | None = None
        if payloads:
            try:
                loaded = self._check(concat_layers([decode_chunk(p) for p in payloads]),
                                     min(len(ids), len(payloads) * self.store.chunk_size))
            except Exception as exc:  # a stored entry that does not fit: recompute, never assemble it
                figures.refused.append(str(exc))
                loaded = None
        figures.fetch_s = time.perf_counter() - started
        have = loaded[0][0].shape[-2] if loaded is not None else 0
        if have == len(ids):
            figures.hits, figures.hit_tokens = 1, have
            return [(k.to(self.device), v.to(self.device), p.to(self.device)) for k, v, p in loaded], figures
        started = time.perf_counter()
        layers = self._compute(ids, loaded)
        figures.compute_s = time.perf_counter() - started
        figures.misses, figures.partial_hits = 1, int(have > 0)
        figures.hit_tokens, figures.computed_tokens = have, len(ids) - have
        size = self.store.chunk_size
        for index in range(have // size, len(keys)):
            part = slice_layers(layers, index * size, min(len(ids), (index + 1) * size))
            payload = encode_chunk(part, self.store.encoding, self.codec.rope, self.codec.weights)
            figures.put_bytes += self.store.put(keys[index], payload)
        return layers, figures

    def _check(self, layers: Layers, tokens: int) -> Layers:
        n_layers, heads, dim = self.shape
        if len(layers) != n_layers:
            raise StoreError(f"stored document has {len(layers)} layers, the model {n_layers}")
        expected = torch.arange(tokens)
        for keys, values, positions in layers:
            if tuple(keys.shape) != (1, heads, tokens, dim) or keys.shape != values.shape:
                raise StoreError(f"stored document K/V of shape {tuple(keys.shape)}, expected "
                                 f"{(1, heads, tokens, dim)}")
            if positions.shape != (heads, tokens) or not bool((positions == expected).all()):
                raise StoreError("stored document is not at positions 0..n-1")
        return layers

    def _compute(self, ids: list[int], loaded: Layers | None) -> Layers:
        """A dense prefill of the document alone, or after the lead-in (on top of its loaded first chunks,
        if any); with a lead-in, the document's part is cut out and moved back to positions 0..n-1."""
        from kvlife.cache import KVCache

        lead = len(self.lead_in)
        rope = model_rope(self.model) if lead else None
        parts = [self._lead_in_cache()] if lead else []
        if loaded is not None:
            moved = [(k.to(self.device), v.to(self.device), p.to(self.device)) for k, v, p in loaded]
            parts.append(place(moved, lead, rope))
        # concat_layers copies, so the prefill never writes into the kept lead-in
        cache = KVCache.from_tensors(concat_layers(parts)) if parts else KVCache.for_model(self.model)
        layers = self._prefill(cache, ids[cache.next_position - lead:])
        if not lead:
            return layers
        document = [(k[:, :, lead:].contiguous(), v[:, :, lead:].contiguous(), p[:, lead:].contiguous())
                    for k, v, p in layers]
        return place(document, -lead, rope)

    def _lead_in_cache(self) -> Layers:
        """The lead-in's K/V at positions 0..len-1 (computed once per store object; callers copy)."""
        from kvlife.cache import KVCache

        if self._lead_in_layers is None:
            self._lead_in_layers = self._prefill(KVCache.for_model(self.model), self.lead_in)
        return self._lead_in_layers

    @torch.no_grad()
    def _prefill(self, cache: Any, ids: list[int]) -> Layers:
        """`ids` run through the model on `cache` at its next positions; the cache's per-layer tensors."""
        from kvlife.cache import cache_kwarg

        start = cache.next_position
        positions = torch.arange(start, start + len(ids), device=self.device)
        self.model(input_ids=torch.tensor([ids], device=self.device), position_ids=positions[None],
                   **cache_kwarg(self.model, cache), use_cache=True, logits_to_keep=1)
        return [(k, v, p) for k, v, p in cache.to_tensors()]
