"""From per-token scores to kept tokens: budget allocation at three levels, and keep masks applied.

Levels (KVzip's, also used by duo_attention's budgets):
- `uniform`: every KV head keeps the same number of tokens, its own top-scored ones;
- `head`: a layer keeps `budget * kv_heads` tokens, the top scores across its heads (Ada-KV's
  allocation), so heads whose scores are spread get more tokens than focused ones;
- `pair`: the full-attention layers together keep the sum of their budgets, the top scores over
  every layer and head at once (KVzip's default), so budgets differ per layer too.
A layer whose heads keep unequal counts becomes a `HeadwiseLayer` (padded with invisible slots,
exact attention, bytes counted over real tokens); equal counts keep the plain rectangular layer.
"""

from __future__ import annotations

from typing import Any

import torch

from kvlife.cache import KVLayer
from kvlife.methods.compress.adakv import PAD_POSITION, HeadwiseLayer

LEVELS = ("uniform", "head", "pair")


def real_slots(layer: KVLayer) -> torch.Tensor:
    """Bool [kv_heads, slots]: which slots of the layer hold a real token (not padding)."""
    return layer.positions != PAD_POSITION


def top_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask, same shape as `scores`, of its `count` largest finite entries (over all of them)."""
    flat = scores.flatten()
    count = min(count, int(flat.isfinite().sum()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    mask[flat.topk(count).indices] = True
    return mask.view_as(scores)


def allocate(scores: dict[int, torch.Tensor], targets: dict[int, int], level: str) -> dict[int, torch.Tensor]:
    """Keep masks per layer from scores [kv_heads, slots] (-inf on padding) and per-head targets.

    `targets[i]` is the tokens each KV head of layer i keeps on average; every level keeps exactly
    `targets[i] * kv_heads` tokens in layer i (`uniform`, `head`) or their sum over the layers
    (`pair`), fewer only where the heads hold fewer real tokens.
    """
    if level == "uniform":
        return {i: torch.stack([top_mask(row, targets[i]) for row in s]) for i, s in scores.items()}
    if level == "head":
        return {i: top_mask(s, targets[i] * s.shape[0]) for i, s in scores.items()}
    order = list(scores)
    flat = torch.cat([scores[i].flatten() for i in order])
    mask = top_mask(flat, sum(targets[i] * scores[i].shape[0] for i in order))
    masks, start = {}, 0
    for i in order:
        size = scores[i].numel()
        masks[i] = mask[start:start + size].view_as(scores[i])
        start += size
    return masks


def apply_keep(cache: Any, index: int, mask: torch.Tensor) -> None:
    """Keep the slots where `mask` ([kv_heads, slots]) is true in layer `index`, in their order."""
    layer = cache.layers[index]
    counts = mask.sum(dim=-1)
    if isinstance(layer, HeadwiseLayer) or bool((counts != counts[0]).any()):
        if not isinstance(layer, HeadwiseLayer):
            layer = HeadwiseLayer.from_layer(layer)
            cache.replace_layer(index, layer)
        layer.keep_ragged(mask)
        return
    # A stable sort on "not kept" lists each head's kept slots first, in their original order.
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, : int(counts[0])]
    layer.keep(order)
