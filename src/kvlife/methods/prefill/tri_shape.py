"""Tri-shape: A-shape for the context, dense attention for the last query rows."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvlife.errors import SpecError
from kvlife.methods.prefill.a_shape import AShape


@dataclasses.dataclass
class TriShape(AShape):
    """A-shape prefill whose last `n_last` query rows attend densely, so the question sees everything.

    Li et al., 2024 (SCBench) showed that A-shape prefill loses the information a query needs when
    the query sits at the end of the prompt; keeping the last rows dense (a triangle under the
    A-shape) recovers most of it at almost no cost. In multi-request mode the context is prefilled
    without its query, so the dense rows are the context's own last tokens.

    Parameters:
        n_init (128): initial tokens (attention sinks) every query sees.
        n_local (3968): sliding window of latest tokens each query sees, itself included; the default
            benchmark's ~2K-token contexts need smaller values, e.g. tri_shape(n_init=64,n_local=512).
        n_last (100): last query rows that attend to every earlier token.
        kernel ("auto"): the attention kernel: kvlife, flex (flex_attention, compiled) or auto (flex on CUDA).
    """

    name: ClassVar[str] = "tri_shape"
    paper: ClassVar[str] = "Li et al., 2024, SCBench: A KV Cache-Centric Analysis of Long-Context Methods"
    n_last: int = 100

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.n_last, int) or self.n_last < 0:
            raise SpecError(f"{self.name}: n_last must be a number of query rows >= 0, got {self.n_last!r}")

    def dense_rows(self, n: int) -> int:
        return self.n_last
