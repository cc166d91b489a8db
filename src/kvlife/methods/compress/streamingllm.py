"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvlife.attention import AttnCall
from kvlife.cache import KVLayer
from kvlife.errors import SpecError
from kvlife.methods.base import CompressMethod


@dataclasses.dataclass
class StreamingLLM(CompressMethod):
    """Keep the first `n_sink` tokens and the most recent ones; evict the middle.

    Xiao et al., 2023 ("Efficient Streaming Language Models with Attention Sinks") found that the
    first tokens draw attention whatever they say, so keeping them plus a recent window keeps
    the model stable with a fixed-size cache.

    Parameters:
        n_sink (4): initial tokens always kept.
        n_local (1024): recent tokens kept; replaced by `budget - n_sink` or `ratio * seen - n_sink`
            when a budget is given.
        ratio / budget (None): overall budget, as a fraction of the tokens seen or in tokens.
    """

    name: ClassVar[str] = "streamingllm"
    paper: ClassVar[str] = "Xiao et al., 2023, Efficient Streaming Language Models with Attention Sinks"
    n_sink: int = 4
    n_local: int = 1024

    def validate(self) -> None:
        super().validate()
        if self.n_sink < 0 or self.n_local < 1:
            raise SpecError(f"streamingllm: n_sink must be >= 0 and n_local >= 1 "
                            f"(got {self.n_sink}, {self.n_local})")

    def default_target(self, seen: int) -> int | None:
        return self.n_sink + self.n_local

    def compress_layer(self, call: AttnCall, layer: KVLayer) -> None:
        if layer.is_sliding:
            return
        target = self.target_tokens(layer, call)
        if target is None:
            return
        held = layer.get_seq_length()
        n_sink = min(self.n_sink, target)
        n_local = target - n_sink
        # Rank by position so that a previously compressed (head-wise) cache is handled too.
        order = layer.positions.argsort(dim=-1)
        keep = order[:, :n_sink]
        if n_local:
            keep = torch.cat([keep, order[:, held - n_local:]], dim=-1)
        layer.keep(keep.sort(dim=-1).values)
