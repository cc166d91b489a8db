"""Compressed caches to and from the store's whole-context entries (`kvlife.store.entries`).

Every layer kind a compress method leaves behind is stored with every kept token at its position:
- `dense` (`KVLayer`, sliding-window layers included): keys, values and per-head positions as one piece;
- `headwise` (`HeadwiseLayer`: AdaKV, kvzip/duo_attention at head or pair level): one piece per KV
  head with its real tokens only (no padding is stored); the padded layout is rebuilt on load, the
  padding slots zero with `PAD_POSITION` (no query sees them, so attention is exactly as before);
- `kivi` (`KiviLayer`): the packed codes, scales, minimums and the exact residual, as they are.

`recipe_identity` names what shapes a compressed cache beyond the tokens: the recipe's spec, every
method's parameters with their defaults (a changed default is another cache, not the same spec), the
kvlife version (a method's code), the prompt format's turn end (kvzip feeds it) and what a method
reads from files (`store_identity`, e.g. duo_attention's head split).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from kvlife import __version__
from kvlife.cache import KVCache, KVLayer
from kvlife.methods.compress.adakv import PAD_POSITION, HeadwiseLayer
from kvlife.methods.compress.kivi import KiviLayer
from kvlife.store.entries import StoredLayer

KIVI_STATE = ("key_codes", "key_scale", "key_min", "value_codes", "value_scale", "value_min",
              "residual_keys", "residual_values")


def recipe_identity(recipe: Any, model: Any, turn_end: list[int]) -> str:
    """The recipe part of a compressed context's store namespace."""
    parts = [recipe.spec, f"kvlife={__version__}",
             "turn_end=" + hashlib.sha256(json.dumps(list(turn_end)).encode()).hexdigest()[:16]]
    for method in recipe.methods:
        parts.append(f"{method.name}:{json.dumps(method.params(), sort_keys=True, default=str)}")
        identity = getattr(method, "store_identity", None)
        if identity is not None:
            parts.append(f"{method.name}={identity(model)}")
    return "|".join(parts)


def unstorable(cache: KVCache) -> str | None:
    """Why this cache's layers cannot be stored, or None."""
    for index, layer in enumerate(cache.layers):
        if type(layer) not in (KVLayer, HeadwiseLayer, KiviLayer):
            return f"layer {index} is a {type(layer).__name__}, which the store does not know"
        if not layer.is_initialized or layer.positions is None:
            return f"layer {index} holds nothing"
    return None


def stored_layers(cache: KVCache) -> list[StoredLayer]:
    """The cache's layers as the store holds them (see the module docstring); ValueError for a cache with
    a layer the store does not know."""
    reason = unstorable(cache)
    if reason is not None:
        raise ValueError(reason)
    out = []
    for layer in cache.layers:
        meta: dict[str, Any] = {"window": layer.sliding_window, "next_position": layer.next_position}
        if isinstance(layer, KiviLayer):
            meta.update(bits=layer.bits, group_size=layer.group_size, residual=layer.residual,
                        value_group=layer.value_group)
            exact = {name: getattr(layer, name) for name in KIVI_STATE}
            out.append(StoredLayer("kivi", meta, [], {**exact, "positions": layer.positions}))
        elif isinstance(layer, HeadwiseLayer):
            real = layer.real_mask()
            counts = real.sum(dim=-1)
            leading = torch.arange(real.shape[-1], device=real.device)[None] < counts[:, None]
            packed = bool((real == leading).all())
            meta.update(width=int(real.shape[-1]), layout="packed" if packed else "slots")
            pieces = [(layer.keys[:, h:h + 1, real[h]], layer.values[:, h:h + 1, real[h]],
                       layer.positions[h:h + 1, real[h]])
                      for h in range(real.shape[0])]
            exact = {} if packed else {"slots": real.nonzero()[:, 1]}
            out.append(StoredLayer("headwise", meta, pieces, exact))
        else:
            out.append(StoredLayer("dense", meta, [(layer.keys, layer.values, layer.positions)]))
    return out


def restore_layers(cache: KVCache, stored: list[StoredLayer], device: torch.device | str = "cpu") -> None:
    """Replace the layers of `cache` (a model's empty cache) by `stored`; ValueError if they do not fit it."""
    if len(stored) != len(cache.layers):
        raise ValueError(f"the entry holds {len(stored)} layers, the model has {len(cache.layers)}")
    built = []
    for index, (layer, item) in enumerate(zip(cache.layers, stored)):
        if item.meta.get("window") != layer.sliding_window:
            raise ValueError(f"layer {index}: stored window {item.meta.get('window')}, "
                             f"the model's {layer.sliding_window}")
        built.append(_layer(item, layer.sliding_window, torch.device(device)))
    cache.layers[:] = built


def _layer(item: StoredLayer, window: int | None, device: torch.device) -> KVLayer:
    next_position = int(item.meta["next_position"])
    if item.kind == "kivi":
        layer = KiviLayer(int(item.meta["bits"]), int(item.meta["group_size"]), int(item.meta["residual"]))
        for name in KIVI_STATE:
            setattr(layer, name, item.exact[name].to(device))
        layer.value_group = int(item.meta["value_group"])
        layer.dtype, layer.device = layer.residual_keys.dtype, device
        layer.positions, layer.next_position = item.exact["positions"].to(device, torch.long), next_position
        layer.is_initialized = True
        return layer
    if item.kind == "dense":
        (keys, values, positions), = item.pieces
        layer = KVLayer(sliding_window=window)
    elif item.kind == "headwise":
        keys, values, positions = _padded(item)
        layer = HeadwiseLayer(sliding_window=window)
    else:
        raise ValueError(f"unknown stored layer kind {item.kind!r}")
    keys, values = keys.to(device), values.to(device)
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values, layer.positions = keys, values, positions.to(device, torch.long)
    layer.next_position = next_position
    return layer


def _padded(item: StoredLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A headwise layer's rectangular keys, values and positions from its per-head pieces."""
    width, heads = int(item.meta["width"]), len(item.pieces)
    first = item.pieces[0][0]
    keys = first.new_zeros(first.shape[0], heads, width, first.shape[-1])
    values = item.pieces[0][1].new_zeros(first.shape[0], heads, width, item.pieces[0][1].shape[-1])
    positions = torch.full((heads, width), PAD_POSITION, dtype=torch.long)
    slots = item.exact.get("slots")
    start = 0
    for h, (head_keys, head_values, head_positions) in enumerate(item.pieces):
        count = head_keys.shape[-2]
        if slots is None:
            where = torch.arange(count)
        else:
            where = slots[start:start + count].long()
            start += count
        if count > width or (count and int(where.max()) >= width):
            raise ValueError(f"head {h} holds {count} tokens past the layer's width {width}")
        keys[:, h, where] = head_keys[:, 0]
        values[:, h, where] = head_values[:, 0]
        positions[h, where] = head_positions[0].long()
    return keys, values, positions
