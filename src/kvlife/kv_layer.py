"""One layer of a `KVCache`: `KVLayer` holds an attention layer's K/V per KV head with each token's
original position, `HybridLayer` adds recurrent state beside them (Zamba-style layers), and
`LayerCheckpoint` is what a rollback needs. See kvlife/cache.py for the whole cache.

Every layer holds `keys` and `values` of shape `[batch, kv_heads, tokens, head_dim]` (GQA is never
expanded into query heads) and `positions` of shape `[kv_heads, tokens]`: the original RoPE
position of each kept token, per head, because head-wise eviction may keep different tokens in
different heads. Sliding-window layers (Gemma 3's local layers) keep only the last
`sliding_window - 1` tokens, as transformers' own dynamic cache does; `update` still returns the
window plus the new tokens.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from kvlife.recurrent import StateLayer


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

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 filled: int) -> None:
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
