"""Shared machinery of the load methods: attention over parts of the cache, and cache lineage.

- `part_attention` computes softmax attention over one part of the keys and returns the output
  together with its log-sum-exp; `merge_parts` combines parts exactly (the softmax over the union
  of disjoint parts is the LSE-weighted mix of the parts' softmaxes).
- `Lineage` tells whether a layer's keys tensor grew from one a method has seen, through
  `KVLayer.grown_from` (layers never modify tensors in place, so identity is exact): metadata
  built for a cache state stays valid for its descendants, and a rollback shows up as a break.
- `token_bytes`: bytes of one token's K/V in a layer, for the working-set vs offloaded accounting.
- `record` / `recall_figures`: what a decode call reports in `call.step.stats["load"]` (figures
  summed over the layers of one forward call; recall and attention mass as per-layer lists).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from kvlife.attention import AttnCall, visibility_mask

INVISIBLE = 1 << 40  # the position given to padding slots: no query can see them


def part_attention(
    scores: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention from precomputed scaled scores.

    `scores` [heads, q_len, n] float32 (already scaled and soft-capped), `values` broadcastable to
    [heads, (q_len,) n, d], `visible` an optional bool mask like `scores`. Returns (output
    [heads, q_len, d] float32, lse [heads, q_len]); a row that sees nothing gets output 0 and
    lse -inf, so it drops out of `merge_parts`.
    """
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(0.0, neginf=0.0)[..., None]).nan_to_num(0.0)
    values = values.float()
    if values.dim() == 4:  # per-row values [heads, q_len, n, d]
        output = torch.einsum("hqn,hqnd->hqd", probs, values)
    else:
        output = torch.matmul(probs, values)
    return output, lse


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax over the union of disjoint key sets, from each set's (output, lse)."""
    lses = torch.stack([lse for _, lse in parts])  # [parts, heads, q_len]
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total.nan_to_num(0.0, neginf=0.0)[None]).nan_to_num(0.0)
    return sum(w[..., None] * out for w, (out, _) in zip(weights, parts))


def scaled_scores(call: AttnCall, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q·k · scaling (soft-capped when the model caps), float32. query [b, m, d], keys [b, n, d]."""
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * call.scaling
    if call.softcap is not None:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    return scores


def grouped_attention(
    call: AttnCall, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of every query head over per-KV-head keys, without expanding the group.

    keys / values [kv_heads, n, d], visible bool [kv_heads, q_len, n] or None. Returns (output
    [q_heads, q_len, d] float32, lse [q_heads, q_len]).
    """
    kv_heads, groups, q_len = keys.shape[0], call.groups, call.query.shape[2]
    query = call.query[0].reshape(kv_heads, groups * q_len, -1)  # query heads are KV-head-major
    scores = scaled_scores(call, query, keys)  # [kv, g * q, n]
    if visible is not None:
        visible = visible[:, None].expand(kv_heads, groups, q_len, -1).reshape(kv_heads, groups * q_len, -1)
    output, lse = part_attention(scores, values, visible)
    return output.reshape(kv_heads * groups, q_len, -1), lse.reshape(kv_heads * groups, q_len)


def range_attention(call: AttnCall, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention (output, lse) over the contiguous cache slots [lo, hi) (views, no copy)."""
    visible = visibility_mask(call.q_pos, call.k_pos[:, lo:hi], call.sliding_window)
    return grouped_attention(call, call.key[0, :, lo:hi], call.value[0, :, lo:hi], visible)


def slot_attention(call: AttnCall, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention (output, lse) over the cache slots `slots` [n] shared by every KV head."""
    visible = visibility_mask(call.q_pos, call.k_pos[:, slots], call.sliding_window)
    return grouped_attention(call, call.key[0][:, slots], call.value[0][:, slots], visible)


class Lineage:
    """The keys tensors of one layer that descend from a root state, by identity.

    `follow(layer, keys)` is called with every keys tensor the method sees for the layer, in
    order; it returns True when `keys` grew (through any number of updates the method saw) from
    the root. The most recent tensor is held strongly so the next update's `grown_from` can be
    resolved; the rest are weak references (kept alive by cache checkpoints, if at all).
    """

    def __init__(self, root: torch.Tensor) -> None:
        self._members: dict[int, weakref.ref] = {}
        self.last: torch.Tensor | None = None
        self._add(root)

    def _add(self, tensor: torch.Tensor) -> None:
        if len(self._members) > 256:
            self._members = {k: r for k, r in self._members.items() if r() is not None}
        self._members[id(tensor)] = weakref.ref(tensor)
        self.last = tensor

    def __contains__(self, tensor: Any) -> bool:
        ref = self._members.get(id(tensor))
        return ref is not None and ref() is tensor

    def follow(self, layer: Any, keys: torch.Tensor) -> bool:
        if keys in self:
            self.last = keys
            return True
        ref = getattr(layer, "grown_from", None)
        parent = ref() if ref is not None else None
        if parent is not None and parent in self:
            self._add(keys)
            return True
        return False


def token_bytes(call_or_keys: Any) -> int:
    """Bytes of one token's key and value across all KV heads of a layer."""
    keys = call_or_keys.key if isinstance(call_or_keys, AttnCall) else call_or_keys
    return keys.shape[1] * keys.shape[-1] * keys.element_size() * 2


def record(call: AttnCall, **figures: Any) -> None:
    """Add per-layer figures to the call's stats: numbers are summed, lists extended."""
    if call.step is None:
        return
    load = call.step.stats.setdefault("load", {})
    for key, value in figures.items():
        if isinstance(value, list):
            load.setdefault(key, []).extend(value)
        else:
            load[key] = load.get(key, 0) + value


def recall_figures(call: AttnCall, attended: torch.Tensor, k: int, eligible: torch.Tensor | None = None):
    """How well a chosen key set covers the true attention, per query head and row.

    `attended` / `eligible`: bool [kv_heads or q_heads, q_len, k_len] (eligible: the keys the
    method chooses among; default every visible key). Returns (top-k recall: the share of the
    true top-`k` eligible keys by q·k that were attended, mass: the share of the true attention
    probability over all visible keys that falls on attended keys), each averaged over heads and rows.
    """
    groups = call.groups
    keys = call.key[0].repeat_interleave(groups, dim=0)
    scores = scaled_scores(call, call.query[0], keys)  # [h, q, n]
    visible = visibility_mask(call.q_pos, call.k_pos, call.sliding_window).repeat_interleave(groups, dim=0)

    def per_head(mask: torch.Tensor) -> torch.Tensor:
        return mask.repeat_interleave(groups, dim=0) if mask.shape[0] != scores.shape[0] else mask

    attended = per_head(attended) & visible
    eligible = visible if eligible is None else per_head(eligible) & visible
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    mass = float((probs * attended).sum(-1).mean())
    k = max(1, min(k, int(eligible.sum(-1).min())))
    top = scores.masked_fill(~eligible, float("-inf")).topk(k, dim=-1).indices
    hit = attended.gather(-1, top).float().mean()
    return float(hit), mass
