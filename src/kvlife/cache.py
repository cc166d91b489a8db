"""KVCache: a transformers-compatible cache that stores K/V per KV head with each token's position.

Every layer holds `keys` and `values` of shape `[batch, kv_heads, tokens, head_dim]` (GQA is never
expanded into query heads) and `positions` of shape `[kv_heads, tokens]`: the original RoPE
position of each kept token, per head, because head-wise eviction may keep different tokens in
different heads. New tokens always get the true next positions (`next_position`), whatever was
evicted before, so decoding after compression continues where the text really is.

Sliding-window layers (Gemma 3's local layers) keep only the last `sliding_window - 1` tokens,
as transformers' own dynamic cache does; `update` still returns the window plus the new tokens.

State-space and hybrid models: recurrent layers hold a `kvlife.recurrent.StateLayer` (conv and SSM
state, no K/V), Zamba-style layers that hold both a `HybridLayer`; `bytes()` counts state with K/V,
and checkpoints copy the state (it changes in place). See kvlife/recurrent.py and docs/hybrid.md.
"""

from __future__ import annotations

import functools
import inspect
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvlife.errors import CacheFileError, KvlifeError
from kvlife.recurrent import StateLayer, layer_plan


def cache_kwarg(model: Any, cache: Cache) -> dict[str, Cache]:
    """The forward keyword that passes a cache to `model`: `cache` (transformers >= 5.2x, where
    `past_key_values` is deprecated) or `past_key_values` (older releases)."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """Read once per model class: the signature does not change, and decoding calls forward per token."""
    forward = getattr(model_class, "forward", model_class)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


CACHE_FILE_FORMAT = "kvlife-cache/1"


@dataclass
class LayerCheckpoint:
    """What `KVLayer.rollback` needs to return a layer to an earlier state.

    A tensor a layer has handed out never changes its content (appends write only past the end of
    every view handed out, see `KVLayer.update`), so holding references is enough and costs no
    copy; subclasses with more state put it in `extra`.
    """

    keys: Any
    values: Any
    positions: Any
    next_position: int
    extra: Any = None


class KVLayer(CacheLayerMixin):
    """One layer's cache: keys, values and per-head token positions."""

    is_sliding = False
    is_croppable = True

    def __init__(self, sliding_window: int | None = None) -> None:
        super().__init__()
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.positions: torch.Tensor | None = None
        self.next_position = 0
        # Positions of the keys returned by the last `update` (what the attention call sees).
        self.attn_positions: torch.Tensor | None = None
        # The keys tensor the last `update` extended (a weak reference): lets load methods tell
        # whether the cache grew from a state they have seen (incremental metadata) or was cut back.
        self.grown_from: weakref.ref | None = None
        self._room: _Room | None = None  # spare capacity behind keys/values/positions (see update)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.positions = torch.empty(key_states.shape[1], 0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[-2]
        new_positions = torch.arange(
            self.next_position, self.next_position + n_new, device=key_states.device
        ).expand(key_states.shape[1], n_new)
        keys, values = self.dense_kv()
        self.grown_from = weakref.ref(keys)
        room = self._room
        if room is None or not room.extends(self, n_new):
            # A fresh buffer with spare room: decoding then appends in place instead of copying the
            # whole layer at every token (torch.cat was a third of a decode step at 2K tokens).
            room = self._room = _Room.around(keys, values, self.positions, n_new)
        keys, values, positions = room.append(key_states, value_states, new_positions)
        self.next_position += n_new
        self.attn_positions = positions
        self.store(keys, values, positions)
        return keys, values

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Replace the layer's content (trimmed to the window on sliding layers)."""
        if self.sliding_window is not None and keys.shape[-2] > self.sliding_window - 1:
            keep = self.sliding_window - 1
            keys, values, positions = keys[..., -keep:, :], values[..., -keep:, :], positions[:, -keep:]
        self.keys, self.values, self.positions = keys, values, positions

    def dense_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values in the model's dtype (quantized layers dequantize here)."""
        return self.keys, self.values

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the tokens at `indices` ([kv_heads, n] or [n]), in the given order per head."""
        if indices.dim() == 1:
            indices = indices.unsqueeze(0).expand(self.positions.shape[0], -1)
        indices = indices.to(self.keys.device)
        gather = indices[None, :, :, None].expand(self.keys.shape[0], -1, -1, self.keys.shape[-1])
        keys, values = self.dense_kv()
        self.keys = keys.gather(2, gather)
        self.values = values.gather(2, gather)
        self.positions = self.positions.gather(1, indices)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.positions is None:
            return 0
        return self.positions.shape[-1]

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("kvlife caches are cut back with checkpoint()/rollback()")

    def checkpoint(self) -> LayerCheckpoint:
        return LayerCheckpoint(self.keys, self.values, self.positions, self.next_position)

    def rollback(self, state: LayerCheckpoint) -> None:
        self.keys, self.values, self.positions = state.keys, state.values, state.positions
        self.next_position = state.next_position
        self.is_initialized = state.positions is not None

    def nbytes(self) -> int:
        """Bytes of K/V data this layer holds (positions are bookkeeping and not counted)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class _Room:
    """Buffers with spare capacity whose first `filled` tokens hold a layer's keys, values and
    positions. A layer's tensors are views `[..., :n]` of them. Appending writes at `filled` only
    when the layer still holds the newest view (nothing was cut back or replaced since), so no view
    handed out earlier ever sees its content change; otherwise the layer gets a fresh buffer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, filled: int) -> None:
        self.keys, self.values, self.positions, self.filled = keys, values, positions, filled
        self.newest: torch.Tensor | None = None  # the keys view last handed out

    @classmethod
    def around(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n_new: int) -> _Room:
        n = keys.shape[-2]
        capacity = n + n_new + max(256, (n + n_new) // 4)  # geometric growth: appends stay O(1) amortized

        def grown(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(tensor.shape)
            shape[dim] = capacity
            buffer = tensor.new_empty(shape)
            buffer.narrow(dim, 0, n).copy_(tensor)
            return buffer
        return cls(grown(keys, -2), grown(values, -2), grown(positions, -1), n)

    def extends(self, layer: KVLayer, n_new: int) -> bool:
        return (layer.keys is self.newest and layer.keys.shape[-2] == self.filled
                and self.filled + n_new <= self.keys.shape[-2] and type(layer).dense_kv is KVLayer.dense_kv)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        start, n_new = self.filled, keys.shape[-2]
        self.keys[..., start:start + n_new, :] = keys
        self.values[..., start:start + n_new, :] = values
        self.positions[:, start:start + n_new] = positions
        self.filled = start + n_new
        self.newest = self.keys[..., :self.filled, :]
        return self.newest, self.values[..., :self.filled, :], self.positions[:, :self.filled]


class HybridLayer(StateLayer, KVLayer):
    """A layer that holds both recurrent state and K/V (Zamba2's and Falcon-H1's "hybrid" layers)."""

    def __init__(self, sliding_window: int | None = None, number_of_states: int = 1,
                 sequential_extend: bool = False) -> None:
        KVLayer.__init__(self, sliding_window=sliding_window)
        StateLayer.__init__(self, number_of_states=number_of_states, sequential_extend=sequential_extend)

    def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
        # K/V arrive as two positional tensors (from `update`), state as keywords (transformers' convention).
        if len(args) == 2 and not kwargs:
            KVLayer.lazy_initialization(self, *args)
        else:
            StateLayer.lazy_initialization(self, *args, **kwargs)

    def get_seq_length(self) -> int:
        return KVLayer.get_seq_length(self)

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return KVLayer.nbytes(self) + self.state_nbytes()

    def checkpoint(self) -> LayerCheckpoint:
        checkpoint = KVLayer.checkpoint(self)
        checkpoint.extra = self.state_checkpoint()
        return checkpoint

    def rollback(self, state: LayerCheckpoint) -> None:
        KVLayer.rollback(self, state)
        self.state_rollback(state.extra)

    def crop(self, tokens_to_remove: int) -> None:
        KVLayer.crop(self, tokens_to_remove)


def layer_windows(config: Any) -> list[int | None]:
    """Per layer, the sliding window of that layer or None (full attention), from a model config."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = text_config.num_hidden_layers
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * n_layers
    window = getattr(text_config, "sliding_window", None)
    return [window if kind == "sliding_attention" and window else None for kind in layer_types[:n_layers]]


class KVCache(Cache):
    """A whole model's cache, one `KVLayer` per decoder layer."""

    def __init__(self, windows: list[int | None]) -> None:
        super().__init__(layers=[KVLayer(sliding_window=w) for w in windows])

    @classmethod
    def for_model(cls, model_or_config: Any) -> KVCache:
        """The cache `model_or_config` needs: K/V layers, and recurrent state layers on state-space and
        hybrid models (ModelError, one line, on a layer type kvlife does not support)."""
        config = getattr(model_or_config, "config", model_or_config)
        plan = layer_plan(config)
        cache = cls([each.sliding_window for each in plan])
        for index, each in enumerate(plan):
            if each.kind == "state":
                cache.layers[index] = StateLayer(each.number_of_states, each.sequential_extend)
            elif each.kind == "hybrid":
                cache.layers[index] = HybridLayer(each.sliding_window, each.number_of_states, each.sequential_extend)
        return cache

    @property
    def next_position(self) -> int:
        for layer in self.layers:
            if isinstance(layer, KVLayer):
                return layer.next_position
        return self.layers[0].tokens_seen if self.layers else 0  # a pure state-space model

    def bytes(self) -> int:
        """Bytes of K/V data held in all layers, and of recurrent state (state-space and hybrid models)."""
        return sum(layer.nbytes() for layer in self.layers)

    def state_bytes(self) -> int:
        """Bytes of recurrent (conv and SSM) state alone."""
        return sum(layer.state_nbytes() for layer in self.layers if isinstance(layer, StateLayer))

    @property
    def has_state(self) -> bool:
        return any(isinstance(layer, StateLayer) for layer in self.layers)

    def kv_layers(self) -> list[tuple[int, KVLayer]]:
        """(index, layer) of every layer that holds K/V: all of them but a hybrid model's recurrent layers."""
        return [(index, layer) for index, layer in enumerate(self.layers) if isinstance(layer, KVLayer)]

    def tokens_held(self) -> list[int]:
        """Tokens held per layer with K/V (recurrent layers hold a fixed-size state, no tokens)."""
        return [layer.get_seq_length() for layer in self.layers if isinstance(layer, KVLayer)]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # The attention call that follows reads which layer this was (Zamba2's shared attention block
        # serves several cache layers, so its module's own layer_idx does not say).
        self.updated_layer = layer_idx
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        layer = self.layers[layer_idx] if layer_idx is not None else None
        if isinstance(layer, StateLayer):
            return layer.states_to_keep()
        return super().get_recurrent_states_to_keep(layer_idx)

    def replace_layer(self, index: int, layer: KVLayer) -> None:
        """Put `layer` (e.g. a quantized or head-wise copy of the K/V) at `index`; refused where the old
        layer also holds recurrent state the new one would drop."""
        old = self.layers[index]
        if isinstance(old, StateLayer) and not isinstance(layer, StateLayer):
            raise KvlifeError(f"layer {index} holds recurrent state beside its K/V (a hybrid layer); a method that "
                              f"replaces the layer's cache ({type(layer).__name__}) would drop it: use an eviction "
                              "method that keeps the layer")
        self.layers[index] = layer

    def checkpoint(self) -> list[tuple[KVLayer, LayerCheckpoint]]:
        """A cheap snapshot; `rollback` returns the cache to it exactly (even if a method has
        replaced a layer object since, e.g. with a quantized layer)."""
        return [(layer, layer.checkpoint()) for layer in self.layers]

    def rollback(self, states: list[tuple[KVLayer, LayerCheckpoint]]) -> None:
        for index, (layer, state) in enumerate(states):
            layer.rollback(state)
            self.layers[index] = layer

    # ---- tensors in, tensors out -------------------------------------------------------------

    def to_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values, positions), dequantized to the model dtype. Refused for caches with
        recurrent state: K/V alone would not restore them."""
        if self.has_state:
            raise KvlifeError("this cache holds recurrent (conv/SSM) state that per-layer K/V tensors cannot "
                              "carry; it cannot be saved, encoded or stored as K/V")
        out = []
        for layer in self.layers:
            keys, values = layer.dense_kv()
            out.append((keys, values, layer.positions))
        return out

    @classmethod
    def from_tensors(
        cls,
        layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
        windows: list[int | None] | None = None,
        next_position: int | None = None,
    ) -> KVCache:
        """Build a cache from per-layer (keys, values, positions-or-None) tensors."""
        cache = cls(windows or [None] * len(layers))
        for layer, (keys, values, positions) in zip(cache.layers, layers):
            if positions is None:
                positions = torch.arange(keys.shape[-2], device=keys.device).expand(keys.shape[1], -1)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values, layer.positions = keys, values, positions.to(torch.long)
            held_next = int(positions.max()) + 1 if positions.numel() else 0
            layer.next_position = held_next if next_position is None else next_position
        return cache

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write the cache to a safetensors file (atomically: temporary file, then rename)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for index, (keys, values, positions) in enumerate(self.to_tensors()):
            tensors[f"layer.{index}.keys"] = keys.contiguous().cpu()
            tensors[f"layer.{index}.values"] = values.contiguous().cpu()
            tensors[f"layer.{index}.positions"] = positions.contiguous().cpu()
        header = {
            "format": CACHE_FILE_FORMAT,
            "windows": json.dumps([layer.sliding_window for layer in self.layers]),
            "next_position": str(self.next_position),
            "metadata": json.dumps(metadata or {}),
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=header)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> tuple[KVCache, dict[str, Any]]:
        """Read a cache written by `save`; returns (cache, metadata)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CacheFileError(f"no cache file at {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                header = handle.metadata() or {}
                if header.get("format") != CACHE_FILE_FORMAT:
                    raise CacheFileError(f"{path} is not a kvlife cache file (format {header.get('format')!r})")
                windows = json.loads(header["windows"])
                layers = [
                    (
                        handle.get_tensor(f"layer.{i}.keys"),
                        handle.get_tensor(f"layer.{i}.values"),
                        handle.get_tensor(f"layer.{i}.positions"),
                    )
                    for i in range(len(windows))
                ]
                next_position = int(header["next_position"])
                metadata = json.loads(header.get("metadata", "{}"))
        except CacheFileError:
            raise
        except Exception as exc:  # safetensors raises several types on corrupt files
            raise CacheFileError(f"{path} is corrupt or truncated: {exc}") from None
        return cls.from_tensors(layers, windows, next_position), metadata
