"""Ada-KV: one budget for the whole layer, spread across KV heads by score."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvlife.attention import AttnCall
from kvlife.cache import KVLayer
from kvlife.errors import SpecError
from kvlife.methods.base import CompressMethod, ScoreCompressMethod
from kvlife.methods.compress.h2o import H2O
from kvlife.methods.compress.pyramidkv import PyramidKV
from kvlife.methods.compress.snapkv import SnapKV, safeguard

# A padding slot's position: larger than any query position, so `visibility_mask` never shows it.
PAD_POSITION = 1 << 62
SCORERS: dict[str, type[ScoreCompressMethod]] = {"snapkv": SnapKV, "pyramidkv": PyramidKV, "h2o": H2O}


class HeadwiseLayer(KVLayer):
    """A layer whose KV heads hold different numbers of tokens.

    The tensors stay rectangular: a head holding fewer tokens than the widest one is padded with
    slots whose position is `PAD_POSITION`, which no query can see (causality by position), so
    attention is exact over the real tokens. `nbytes` counts only the real tokens (what a ragged
    layout, e.g. a paged kernel, would hold); `get_seq_length` is the padded width. Tokens added
    later are appended after the padding, as in any layer.
    """

    @classmethod
    def from_layer(cls, layer: KVLayer) -> HeadwiseLayer:
        new = cls(sliding_window=layer.sliding_window)
        new.__dict__.update(vars(layer))
        return new

    def real_mask(self) -> torch.Tensor:
        """Bool [kv_heads, slots]: which slots hold a real token."""
        return self.positions != PAD_POSITION

    def keep_ragged(self, keep_mask: torch.Tensor) -> None:
        """Keep the slots where `keep_mask` ([kv_heads, slots]) is true, in their order per head."""
        counts = keep_mask.sum(dim=-1)
        width = int(counts.max())
        # A stable sort on "not kept" lists each head's kept slots first, in their original order.
        order = torch.sort((~keep_mask).to(torch.int8), dim=-1, stable=True).indices[:, :width]
        self.keep(order)
        padding = torch.arange(width, device=counts.device)[None, :] >= counts[:, None]
        self.positions = self.positions.masked_fill(padding.to(self.positions.device), PAD_POSITION)

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        real = int(self.real_mask().sum())
        key_bytes = self.keys.shape[-1] * self.keys.element_size()
        per_token = self.keys.shape[0] * (key_bytes + self.values.shape[-1] * self.values.element_size())
        return real * per_token


@dataclasses.dataclass
class AdaKV(CompressMethod):
    """Spread the layer's budget across KV heads by score: focused heads give tokens to diffuse ones.

    Feng et al., 2024 ("Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
    Efficient LLM Inference") showed that a uniform per-head budget wastes tokens on heads whose
    attention is concentrated. The inner scorer scores every head's tokens, and the layer keeps
    the top `budget * kv_heads` scores across all heads together, after guaranteeing each head its
    own top `alpha * budget` tokens.

    Heads then hold different numbers of tokens: the layer becomes a `HeadwiseLayer`, padded with
    invisible slots, whose byte count includes only the real tokens.

    Parameters:
        ratio / budget (None): the average tokens kept per KV head (the layer keeps
            `budget * kv_heads` in all), as a fraction of the tokens seen or in tokens.
        scorer ("snapkv"): the inner scoring method, "snapkv", "pyramidkv" (Ada-Pyramid: the
            per-layer average follows the pyramid) or "h2o".
        alpha (0.2): safeguard; each head keeps at least its top `alpha * budget` tokens.
        window_size (32), kernel_size (5), pooling ("avg"): passed to a SnapKV-style scorer.
    """

    name: ClassVar[str] = "adakv"
    paper: ClassVar[str] = (
        "Feng et al., 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for "
        "Efficient LLM Inference"
    )
    scorer: str = "snapkv"
    alpha: float = 0.2
    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avg"

    def validate(self) -> None:
        super().validate()
        if self.scorer not in SCORERS:
            raise SpecError(f"adakv: unknown scorer {self.scorer!r}; valid: {', '.join(SCORERS)}")
        if not 0 <= self.alpha <= 1:
            raise SpecError(f"adakv: alpha must be in [0, 1], got {self.alpha}")

    def __post_init__(self) -> None:
        super().__post_init__()
        scorer_cls = SCORERS[self.scorer]
        fields = {item.name for item in dataclasses.fields(scorer_cls)}
        shared = {key: getattr(self, key) for key in ("window_size", "kernel_size", "pooling")
                  if key in fields}
        self.inner = scorer_cls(ratio=self.ratio, budget=self.budget, **shared)

    def compress_layer(self, call: AttnCall, layer: KVLayer) -> None:
        if layer.is_sliding or call.step is None:
            return
        per_head = self.inner.layer_target(call, layer)
        if per_head is None:
            return
        real = layer.positions != PAD_POSITION
        total = per_head * real.shape[0]
        if total >= int(real.sum()):
            return
        scores = self.inner.score(call, layer).masked_fill(~real, float("-inf"))
        scores = safeguard(scores, int(self.alpha * per_head))  # a short head's padding stays out
        chosen = scores.flatten().topk(total).indices
        keep_mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        keep_mask[chosen] = True
        if not isinstance(layer, HeadwiseLayer):
            layer = HeadwiseLayer.from_layer(layer)
            call.step.cache.replace_layer(call.layer_idx, layer)
        layer.keep_ragged(keep_mask.view_as(scores))
