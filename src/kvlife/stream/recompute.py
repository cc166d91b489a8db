"""Building a context's cache chunk by chunk: decoded chunks appended, other chunks recomputed.

`recompute_chunk(model, cache, ids)` runs the model on one chunk's token ids at the true next
positions, on top of whatever the cache holds (decoded chunks, possibly lossy, or recomputed ones):
the chunk's K/V are then exactly what a dense prefill of those tokens computes given that prefix
(tested against one dense prefill of prefix + chunk). `CacheBuilder` keeps decoded chunks in lists
and concatenates them into the KVCache only when a recompute needs the prefix, or at the end, so
a context of n chunks costs one concatenation, not n.
"""

from __future__ import annotations

from typing import Any

import torch

from kvlife.attention import StepContext
from kvlife.cache import KVCache, cache_kwarg
from kvlife.codec import CodecError, decode_chunk_part
from kvlife.stream.context import StreamError


@torch.no_grad()
def recompute_chunk(model: Any, cache: KVCache, ids: list[int]) -> torch.Tensor:
    """Append the K/V of `ids` to `cache` (a dense forward at positions next_position..); returns the
    logits of the last token."""
    device = next(model.parameters()).device
    start = cache.next_position
    positions = torch.arange(start, start + len(ids), device=device)
    step = StepContext(cache, positions, phase="prefill" if start == 0 else "extend")
    out = model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=positions[None],
        **cache_kwarg(model, cache),
        use_cache=True,
        logits_to_keep=1,
        kvlife=step,
    )
    return out.logits[0, -1].float()


class CacheBuilder:
    def __init__(self, header: Any, model: Any = None) -> None:
        self.header = header
        self.model = model
        windows = [s.window for s in header.layers]
        if model is not None:
            expected = KVCache.for_model(model)
            if len(expected.layers) != len(header.layers):
                raise StreamError(
                    f"the context has {len(header.layers)} layers, the model {len(expected.layers)}"
                )
            param = next(model.parameters())
            self.device, self.dtype = param.device, param.dtype
        else:
            self.device, self.dtype = torch.device("cpu"), None
        self.cache = KVCache(windows)
        self.pending: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [
            [] for _ in header.layers
        ]
        self.tokens = 0  # context tokens in the cache or pending

    def _decode(
        self, index: int, part: bytes, crc: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        try:
            layers = decode_chunk_part(self.header, index, part, crc)
        except CodecError as exc:
            raise StreamError(f"chunk {index}: {exc}") from None
        out = []
        for layer in layers:
            if layer is not None:
                keys, values, positions = layer
                if self.dtype is not None:
                    keys, values = keys.to(self.device, self.dtype), values.to(self.device, self.dtype)
                layer = (keys, values, positions.to(self.device))
            out.append(layer)
        return out

    def add_encoded(self, index: int, part: bytes, crc: int) -> None:
        """Decode chunk `index` (at any level of the context) and append it; StreamError if it is corrupt."""
        if index * self.header.chunk_tokens != self.tokens:
            raise StreamError(f"chunk {index} arrives out of order ({self.tokens} tokens held)")
        added = 0
        for li, layer in enumerate(self._decode(index, part, crc)):
            if layer is not None:
                self.pending[li].append(layer)
                added = max(added, layer[0].shape[-2])
        self.tokens += added

    def replace_encoded(self, index: int, part: bytes, crc: int) -> None:
        """Decode chunk `index` again (another level of the same context) and write its K/V over the ones the
        cache holds for it (chunks recomputed on top of the old version keep theirs); StreamError if it is
        corrupt or the chunk is not in the cache yet, and then nothing changes. Pending chunks are joined into
        the cache first: the client refines only once every chunk is in, so this is the concatenation
        `finish` would do, done once."""
        start = index * self.header.chunk_tokens
        if start >= self.tokens:
            raise StreamError(
                f"chunk {index} cannot be replaced: it is not in the cache ({self.tokens} tokens held)"
            )
        layers = self._decode(index, part, crc)
        self._materialize()
        for cache_layer, layer in zip(self.cache.layers, layers):
            if layer is not None:
                held = cache_layer.positions[:, start:start + layer[0].shape[-2]]
                if held.shape != layer[2].shape or not torch.equal(held, layer[2]):
                    raise StreamError(f"chunk {index}: the new version holds other tokens than the old")
        for cache_layer, layer in zip(self.cache.layers, layers):
            if layer is not None:
                keys, values, _ = layer
                cache_layer.keys[..., start:start + keys.shape[-2], :] = keys
                cache_layer.values[..., start:start + keys.shape[-2], :] = values

    def _materialize(self) -> None:
        for layer, parts in zip(self.cache.layers, self.pending):
            if not parts:
                continue
            keys = torch.cat([p[0] for p in parts], dim=-2)
            values = torch.cat([p[1] for p in parts], dim=-2)
            positions = torch.cat([p[2] for p in parts], dim=-1).to(torch.long)
            if layer.is_initialized:
                keys = torch.cat([layer.keys, keys], dim=-2)
                values = torch.cat([layer.values, values], dim=-2)
                positions = torch.cat([layer.positions, positions], dim=-1)
            else:
                layer.lazy_initialization(keys, values)
            layer.store(keys, values, positions)
            parts.clear()
        for layer in self.cache.layers:
            layer.next_position = self.tokens

    def recompute(self, ids: list[int]) -> None:
        """Recompute the next chunk from its token ids on top of everything before it."""
        if self.model is None:
            raise StreamError("recomputing a chunk needs the model")
        self._materialize()
        recompute_chunk(self.model, self.cache, ids)
        self.tokens += len(ids)

    def finish(self) -> KVCache:
        self._materialize()
        return self.cache
