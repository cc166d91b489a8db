"""CacheBlend: recompute the tokens whose K/V deviate most from the full prefill's on an early layer."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvlife.errors import SpecError
from kvlife.methods.assemble.base import AssembleMethod, Span, document_rows


@dataclasses.dataclass
class CacheBlend(AssembleMethod):
    """Selective recompute of the high-KV-deviation tokens (Yao et al., EuroSys 2025, CacheBlend).

    The documents' stored caches ignore cross-document attention. CacheBlend recomputes every
    document token on the first layers; on the check layer it compares each token's fresh keys with
    the stored ones (squared L2 over heads and dims, as LMCache's implementation does) and from
    there on recomputes only the `ratio` share of document tokens that deviate most, whose fresh
    K/V replace the stored ones layer by layer; all other tokens keep their stored K/V.

    Parameters:
        ratio (0.15): share of the document tokens recomputed after the check layer (1.0: all,
            which reproduces a full prefill).
        layer (1): the check layer. Layer 0's K/V depend on the token and its position only, so
            the first layer that can show cross-document deviation is 1 (the paper's and LMCache's
            choice); a deeper one sees more of it but recomputes every document token up to it.
        lead_in ("none"): what each document is computed after (see concat).
    """

    name: ClassVar[str] = "cacheblend"
    paper: ClassVar[str] = ("Yao et al., EuroSys 2025, "
                            "CacheBlend: Fast LLM Serving for RAG with Cached Knowledge Fusion")
    ratio: float = 0.15
    layer: int = 1

    @property
    def check_layer(self) -> int:
        return self.layer

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.ratio <= 1:
            raise SpecError(f"cacheblend: ratio must be in [0, 1], got {self.ratio}")
        if self.layer < 1:
            raise SpecError(f"cacheblend: layer must be >= 1 (layer 0 shows no deviation), got {self.layer}")

    def rows(self, spans: list[Span]) -> torch.Tensor:
        return document_rows(spans)

    def choose(self, deviation: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        keep = min(rows.numel(), round(self.ratio * rows.numel()))
        return deviation.topk(keep).indices.sort().values
