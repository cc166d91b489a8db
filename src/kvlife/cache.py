"""KVCache: a transformers-compatible cache that stores K/V per KV head with each token's position.

Every layer (a `kvlife.kv_layer.KVLayer`) holds `keys` and `values` of shape `[batch, kv_heads,
tokens, head_dim]` (GQA is never expanded into query heads) and `positions` of shape `[kv_heads,
tokens]`: the original RoPE position of each kept token, per head. New tokens always get the true
next positions (`next_position`), whatever was evicted before, so decoding after compression
continues where the text really is.

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
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvlife.errors import CacheFileError, KvlifeError
from kvlife.kv_layer import HybridLayer, KVLayer, LayerCheckpoint
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
                cache.layers[index] = HybridLayer(each.sliding_window, each.number_of_states,
                                                  each.sequential_extend)
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
            raise KvlifeError(f"layer {index} holds recurrent state beside its K/V (a hybrid layer); "
                              f"a method that replaces the layer's cache ({type(layer).__name__}) would "
                              "drop it: use an eviction method that keeps the layer")
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
                    raise CacheFileError(f"{path} is not a kvlife cache file "
                                         f"(format {header.get('format')!r})")
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
