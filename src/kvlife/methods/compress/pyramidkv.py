"""PyramidKV: SnapKV scoring with budgets that shrink with depth."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from kvlife.attention import AttnCall
from kvlife.cache import KVLayer
from kvlife.errors import SpecError
from kvlife.methods.compress.snapkv import SnapKV, window_size_for


def pyramid_budgets(average: int, window: int, n_layers: int, beta: float) -> list[int] | None:
    """Per-layer token budgets, decreasing linearly with depth, summing to `n_layers * average`.

    The part of the budget above the window, `spread = average - window`, runs from
    `2 * spread - spread / beta` in the first layer down to `spread / beta` in the last (an
    arithmetic sequence whose mean is `spread`); each layer also keeps its window. Returns None
    where no pyramid fits (one layer, or a budget no larger than the window).
    """
    spread = average - window
    if n_layers <= 1 or spread <= 0:
        return None
    low = spread / beta
    high = 2 * spread - low
    raw = [high - index * (high - low) / (n_layers - 1) for index in range(n_layers)]
    # Floor every layer, then give the leftover tokens to the shallowest layers: the total is
    # exact and the budgets still never increase with depth.
    budgets = [math.floor(value) for value in raw]
    for index in range(n_layers * spread - sum(budgets)):
        budgets[index] += 1
    return [window + budget for budget in budgets]


@dataclasses.dataclass
class PyramidKV(SnapKV):
    """SnapKV with a pyramid of budgets: many tokens in shallow layers, few in deep ones.

    Cai et al., 2024 ("PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling") saw attention spread widely in lower layers and concentrate on a few tokens in
    upper ones. Tokens are scored as in SnapKV, but the per-layer budget decreases linearly with
    depth while the average over the layers stays the SnapKV budget.

    Parameters:
        ratio / budget (None): the average tokens kept per KV head over the full-attention layers
            (sliding-window layers are not compressed and not counted).
        beta (20): steepness; the deepest layer keeps `window + spread / beta` tokens where
            `spread` is the average budget minus the window, the shallowest `window + 2 * spread -
            spread / beta`. When the shallowest layer would need more tokens than the context
            holds, every layer falls back to the SnapKV budget (as kvpress does).
        window_size (32), kernel_size (5), pooling ("avg"), group_reduce ("mean"): as in SnapKV.
    """

    name: ClassVar[str] = "pyramidkv"
    paper: ClassVar[str] = (
        "Cai et al., 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
    )
    beta: float = 20

    def validate(self) -> None:
        super().validate()
        if self.beta < 1:
            raise SpecError(f"pyramidkv: beta must be >= 1, got {self.beta}")

    def layer_target(self, call: AttnCall, layer: KVLayer) -> int | None:
        average = self.target_tokens(layer, call)
        if average is None or call.step is None:
            return average
        full_layers = [index for index, each in call.step.cache.kv_layers() if not each.is_sliding]
        budgets = pyramid_budgets(average, window_size_for(call, self.window_size), len(full_layers),
                                  self.beta)
        if budgets is None or budgets[0] >= layer.get_seq_length():
            return average
        return budgets[full_layers.index(call.layer_idx)]
