"""EPIC: recompute the first k tokens of each document (LegoLink), at every layer."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvlife.errors import SpecError
from kvlife.methods.assemble.base import AssembleMethod, Span, document_rows


@dataclasses.dataclass
class Epic(AssembleMethod):
    """Position-independent caching with LegoLink (Hu et al., 2024, EPIC).

    A document cached alone starts with the tokens every later token attends to most (the attention
    sink); placed mid-context they draw attention that belongs elsewhere. LegoLink recomputes only
    the first `k` tokens of each document, at every layer and attending to everything before them,
    which removes the false sinks at O(k x documents) cost; the rest of each document keeps its
    stored K/V. The paper uses k <= 32 (LegoLink-16 in most results).

    Parameters:
        k (16): tokens recomputed at the start of each document (after the instruction).
    """

    name: ClassVar[str] = "epic"
    paper: ClassVar[str] = ("Hu et al., 2024, "
                            "EPIC: Efficient Position-Independent Context Caching for Serving LLMs")
    k: int = 16

    def validate(self) -> None:
        super().validate()
        if self.k < 0:
            raise SpecError(f"epic: k must be a number of tokens >= 0, got {self.k}")

    def rows(self, spans: list[Span]) -> torch.Tensor:
        return document_rows(spans, first=self.k)
