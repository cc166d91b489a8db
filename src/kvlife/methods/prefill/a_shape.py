"""A-shape: attention sinks plus a sliding window, during the first prefill."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvlife.attention import AttnCall
from kvlife.errors import SpecError
from kvlife.methods.prefill.estimate import a_shape_layout
from kvlife.methods.prefill.kernels import Layout
from kvlife.methods.prefill.sparse import SparsePrefill


@dataclasses.dataclass
class AShape(SparsePrefill):
    """Each query attends to the first `n_init` tokens and the `n_local` latest ones (static Λ shape).

    Xiao et al., 2024 ("Efficient Streaming Language Models with Attention Sinks") found that the
    first tokens soak up attention mass and that a model keeps working on sinks plus a window;
    MInference and SCBench (Li et al., 2024) use that static A-shape as the simplest sparse prefill.
    Only the prefill is sparse: the cache keeps every token, so later turns and decoding see all.

    Parameters:
        n_init (128): initial tokens (attention sinks) every query sees.
        n_local (3968): sliding window of latest tokens each query sees, itself included.
            The defaults are SCBench's, sized for 100K-token contexts; the default benchmark's ~2K-token
            contexts are shorter than 128 + 3968 (so the prefill stays dense) and need smaller
            values, e.g. a_shape(n_init=64,n_local=512).
        kernel ("auto"): the attention kernel: kvlife, flex (flex_attention, compiled) or auto (flex on CUDA).
    A layer where the shape keeps more than 60% of the causal query-key pairs attends densely
    (faster on CPU, and exact).
    """

    name: ClassVar[str] = "a_shape"
    paper: ClassVar[str] = (
        "Xiao et al., 2024, Efficient Streaming Language Models with Attention Sinks (SCBench A-shape)"
    )
    n_init: int = 128
    n_local: int = 3968
    DENSE_ABOVE: ClassVar[float] = 0.6  # one layout for all heads: the kernel's cheapest case

    def validate(self) -> None:
        if not isinstance(self.n_init, int) or self.n_init < 0:
            raise SpecError(f"{self.name}: n_init must be a number of tokens >= 0, got {self.n_init!r}")
        if not isinstance(self.n_local, int) or self.n_local < 1:
            raise SpecError(f"{self.name}: n_local must be a number of tokens >= 1, got {self.n_local!r}")

    def layouts(self, call: AttnCall) -> list[Layout] | None:
        layout = a_shape_layout(call.query.shape[2], self.n_init, self.n_local, call.query.device)
        return None if layout is None else [layout]
