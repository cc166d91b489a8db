"""KeyDiff: keep the keys least like the average key (no attention weights needed)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvlife.attention import AttnCall
from kvlife.cache import KVLayer
from kvlife.errors import SpecError
from kvlife.methods.base import ScoreCompressMethod
from kvlife.methods.compress.keep import real_slots
from kvlife.methods.compress.snapkv import PROTECTED


def key_diversity(keys: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Minus the cosine similarity of each key [kv_heads, slots, d] to its head's mean key direction
    (the mean of the unit keys over the real slots); padding scores -inf."""
    unit = F.normalize(keys.float(), dim=-1)
    anchor = (unit * real[..., None]).sum(dim=1, keepdim=True) / real.sum(dim=1).clamp(min=1)[:, None, None]
    scores = -F.cosine_similarity(unit, anchor, dim=-1)
    return scores.masked_fill(~real, float("-inf"))


@dataclasses.dataclass
class KeyDiff(ScoreCompressMethod):
    """Keep the tokens whose keys differ most from the average key of their head.

    Park et al., 2025 ("KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
    Inference in Resource-Constrained Environments") found that keys far from the mean key
    direction tend to draw high attention, so key geometry alone ranks tokens. Each token is scored
    by minus the cosine similarity of its key to the normalised mean of its head's unit keys, and
    the most distinctive keys are kept; no query and no attention weights are needed, so it works
    with any attention kernel and ignores what the prefill's last tokens happen to ask.

    Parameters:
        ratio / budget (None): tokens kept per KV head, as a fraction of the tokens seen or in tokens.
        n_sink (0): first tokens always kept (the paper keeps none: sinks are distinctive anyway).
    """

    name: ClassVar[str] = "keydiff"
    paper: ClassVar[str] = (
        "Park et al., 2025, KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference "
        "in Resource-Constrained Environments"
    )
    n_sink: int = 0

    def validate(self) -> None:
        super().validate()
        if self.n_sink < 0:
            raise SpecError(f"keydiff: n_sink must be >= 0, got {self.n_sink}")

    def score(self, call: AttnCall, layer: KVLayer) -> torch.Tensor:
        keys, _ = layer.dense_kv()
        scores = key_diversity(keys[0], real_slots(layer))
        return scores.masked_fill(layer.positions < self.n_sink, PROTECTED)
