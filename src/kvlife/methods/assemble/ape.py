"""APE: sharpen the attention later tokens pay to separately computed documents (a temperature)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from kvlife.errors import SpecError
from kvlife.methods.assemble.base import AssembleMethod, Layers, Span, document_rows


@dataclasses.dataclass
class Ape(AssembleMethod):
    """Adaptive parallel encoding's attention temperature (Yang et al., ICLR 2025, APE).

    Documents computed alone look alike to a later query: each one's K/V were made as if it were the
    only context, so a query's attention over many of them is flatter than over the same text
    prefilled in sequence. APE lowers the temperature of that attention (logits over the documents'
    tokens divided by `temperature` < 1). Here the documents' stored keys are divided by it once,
    after assembly: q.k/T is then what every later token (the context's tail, each query, each
    generated token) computes, in any attention kernel, and nothing is recomputed unless `k` asks
    for EPIC's recompute of each document's first tokens as well (done before the keys are scaled,
    so the recomputed tokens see the documents as stored). The instruction span before the
    documents keeps its keys (it is APE's shared prefix).

    Not carried over: APE's scaling factor on the documents' total attention (a log-sum-exp
    rescale, which needs a change of the attention kernel) and its computing each document after
    the shared prefix by default (`lead_in=head` computes each document after it).

    Parameters:
        temperature (0.9): the attention temperature over document tokens, in (0, 1]; 1 is concat
            (with k=0) or epic(k).
        k (16): first tokens of each document recomputed (EPIC's LegoLink) before the scaling. Without
            it each document's own first tokens (its false attention sinks) are sharpened too: on
            Qwen2.5-Coder-0.5B's rag contexts T 0.8 then lost every answer; with k=16 the same T was
            not told apart from concat (docs/blend.md). The defaults are the screen's lowest reference NLL
            at k=16; none of the settings tried was better than concat in accuracy.
        lead_in ("none"): what each document is computed after (see concat); "head" is APE's shared
            prefix.
    """

    name: ClassVar[str] = "ape"
    paper: ClassVar[str] = ("Yang et al., ICLR 2025, APE: Faster and Longer Context-Augmented "
                            "Generation via Adaptive Parallel Encoding")
    temperature: float = 0.9
    k: int = 16

    def validate(self) -> None:
        super().validate()
        if not 0 < self.temperature <= 1:
            raise SpecError(f"ape: temperature must be in (0, 1], got {self.temperature}")
        if self.k < 0:
            raise SpecError(f"ape: k must be a number of tokens >= 0, got {self.k}")

    def rows(self, spans: list[Span]) -> torch.Tensor:
        return document_rows(spans, first=self.k)

    def blend(self, model: Any, layers: Layers, ids: list[int],
              spans: list[Span]) -> tuple[Layers, dict[str, Any]]:
        layers, stats = super().blend(model, layers, ids, spans)
        if self.temperature == 1 or not spans:
            return layers, stats
        keys = layers[0][0]  # every layer holds the same positions
        scale = torch.ones(keys.shape[-2], dtype=keys.dtype, device=keys.device)
        for start, stop in spans:
            scale[start:stop] = 1 / self.temperature
        return [(keys * scale[:, None], values, positions) for keys, values, positions in layers], stats
