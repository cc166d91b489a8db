"""H2O: heavy hitters (most attended tokens overall) plus a recent window."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvlife.attention import AttnCall
from kvlife.cache import KVLayer
from kvlife.errors import SpecError
from kvlife.methods.base import ScoreCompressMethod, reduce_groups
from kvlife.methods.compress.snapkv import attention_mass, protect_last


@dataclasses.dataclass
class H2O(ScoreCompressMethod):
    """Keep the heavy hitters (tokens with the largest accumulated attention) and the newest tokens.

    Zhang et al., 2023 ("H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models") found that a few tokens collect most of the attention mass, so the sum of
    the attention each token receives decides which tokens stay, next to a window of recent ones.

    kvlife scores once, after the prefill, with the attention of every query of that prefill
    (computed in chunks of query rows so memory stays bounded), as kvpress does; the paper
    re-scores and evicts at every decode step, which kvlife's one-shot compress stage does not.
    Sums favour early tokens, which more queries can see: that is the method as published.

    Parameters:
        ratio / budget (None): tokens kept per KV head, as a fraction of the tokens seen or in tokens.
        recent_ratio (0.5): share of the budget given to the newest tokens; the rest goes to the
            heavy hitters (the paper splits the budget evenly).
        chunk_rows (512): query rows scored at once (an upper bound; long contexts use fewer).
        group_reduce ("mean"): how the query heads of one GQA group are reduced, "mean" or "max".
    """

    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = (
        "Zhang et al., 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large "
        "Language Models"
    )
    recent_ratio: float = 0.5
    chunk_rows: int = 512
    group_reduce: str = "mean"

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.recent_ratio <= 1:
            raise SpecError(f"h2o: recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if self.chunk_rows < 1:
            raise SpecError(f"h2o: chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.group_reduce not in ("mean", "max"):
            raise SpecError(f"h2o: group_reduce must be mean or max, got {self.group_reduce!r}")

    def score(self, call: AttnCall, layer: KVLayer) -> torch.Tensor:
        mass = attention_mass(call, layer, slice(None), self.chunk_rows)
        scores = reduce_groups(mass, layer.positions.shape[0], self.group_reduce)
        target = self.layer_target(call, layer) or layer.get_seq_length()
        return protect_last(scores, round(self.recent_ratio * target))
