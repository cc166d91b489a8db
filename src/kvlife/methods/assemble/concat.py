"""concat: the documents' caches placed side by side, nothing recomputed (the lower bound of assembly)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvlife.methods.assemble.base import AssembleMethod, Span


@dataclasses.dataclass
class Concat(AssembleMethod):
    """Concatenate per-document caches (keys re-rotated to their places) and recompute no token.

    Each document's K/V were computed with the document alone, so no document attends to the ones
    before it; the query and what follows the context still attend to all of it. This is the
    "full reuse" baseline of CacheBlend (Yao et al., EuroSys 2025) and the "naive" position-
    independent caching of EPIC (Hu et al., 2024): what recompute buys is measured against it.

    Parameters: none.
    """

    name: ClassVar[str] = "concat"
    paper: ClassVar[str] = "Yao et al., EuroSys 2025, CacheBlend (its full-reuse baseline)"

    def rows(self, spans: list[Span]) -> torch.Tensor:
        return torch.empty(0, dtype=torch.long)
