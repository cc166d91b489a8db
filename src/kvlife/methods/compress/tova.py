"""TOVA: keep the tokens the newest query attends to most."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvlife.attention import AttnCall
from kvlife.cache import KVLayer
from kvlife.methods.base import ScoreCompressMethod, reduce_groups
from kvlife.methods.compress.snapkv import attention_mass, protect_last


@dataclasses.dataclass
class TOVA(ScoreCompressMethod):
    """Evict the tokens with the lowest attention from the newest query, averaged over heads.

    Oren et al., 2024 ("Transformers are Multi-State RNNs") treat the cache as a bounded RNN state
    and keep, at each step, the tokens the current query attends to most. Scores are averaged
    over all the layer's heads, so every head keeps the same tokens (the paper's layer-wise policy).

    kvlife applies it once, after the prefill, with the prefill's last query (as kvpress does),
    not at every decode step; that newest token is always kept.

    Parameters:
        ratio / budget (None): tokens kept per KV head, as a fraction of the tokens seen or in tokens.
        head_wise (false): score each KV head separately (mean over its GQA group) instead of
            averaging over all heads.
    """

    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "Oren et al., 2024, Transformers are Multi-State RNNs"
    head_wise: bool = False

    def score(self, call: AttnCall, layer: KVLayer) -> torch.Tensor:
        mass = attention_mass(call, layer, slice(-1, None))
        kv_heads = layer.positions.shape[0]
        # Averaging over heads only makes sense where every head holds the same tokens.
        same_tokens = bool((layer.positions == layer.positions[:1]).all())
        if self.head_wise or not same_tokens:
            scores = reduce_groups(mass, kv_heads)
        else:
            scores = mass.mean(0, keepdim=True).expand(kv_heads, -1)
        return protect_last(scores, 1)
