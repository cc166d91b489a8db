"""The shared machinery of the sparse prefill methods: when to go sparse, the kernel, the reference.

A sparse prefill method only says which keys each query head sees (`layouts`); this base class
decides when that applies (full-attention layers on the first prefill's plain causal layout, longer
than one block, and a pattern that keeps at most DENSE_ABOVE of the causal query-key pairs: denser
patterns cost more than dense attention on CPU), runs the fast kernel, optionally computes the last
`dense_rows` query rows densely (Tri-shape), and gives the same attention by dense masked softmax
(`reference`) and the pattern as a bool mask (`mask`, for recall measurements). Anything else (sliding-window
layers, evicted or shifted positions, a pattern that covers every key) takes `dense_attention`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import torch

from kvlife.attention import AttnCall, dense_attention, reference_attention, visibility_mask
from kvlife.errors import SpecError
from kvlife.methods.base import PrefillMethod
from kvlife.methods.prefill.flex import flex_sparse_attention
from kvlife.methods.prefill.kernels import (
    BLOCK,
    Layout,
    layout_device,
    layout_mask,
    plain_causal,
    sparse_attention,
)

DENSITY_ROWS = 32  # query rows sampled to estimate a pattern's density
KERNELS = ("auto", "kvlife", "flex")


def pick_kernel(kernel: str, device: torch.device) -> str:
    """The kernel a sparse layer runs on: `kernel` unless "auto"; then flex_attention, compiled, on
    CUDA (Triton), and kvlife's own kernel elsewhere: on CPU it measured faster than compiled
    flex_attention for every pattern at 8K-32K tokens (benchmarks/results/attention.json)."""
    if kernel != "auto":
        return kernel
    return "flex" if device.type == "cuda" else "kvlife"


@dataclasses.dataclass
class SparsePrefill(PrefillMethod):
    """Base of the sparse prefill methods; subclasses implement `layouts`.

    `kernel` ("auto"), shared by every sparse method: the attention kernel, `kvlife` (kernels.py,
    plain PyTorch), `flex` (torch's flex_attention, compiled; flex.py) or `auto` (see pick_kernel).
    """

    kernel: str = "auto"

    # Above this share of the causal query-key pairs the sparse kernel is slower than dense attention
    # (on CPU it costs 1.2-3x dense's time per score: least for A-shape's shared layout, most for
    # per-head patterns at 8K), so the layer attends densely (and exactly).
    DENSE_ABOVE: ClassVar[float] = 0.35

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise SpecError(f"{self.name}: unknown kernel {self.kernel!r}; valid: {', '.join(KERNELS)}")
        super().__post_init__()

    def layouts(self, call: AttnCall) -> list[Layout] | None:
        """One layout per query head, or one shared by all heads; None when the pattern is dense."""
        raise NotImplementedError

    def dense_rows(self, n: int) -> int:
        """How many of the last query rows attend densely (Tri-shape's question rows)."""
        return 0

    def applies(self, call: AttnCall) -> bool:
        return not call.is_sliding and call.query.shape[2] > BLOCK and plain_causal(call)

    def plan(self, call: AttnCall) -> list[Layout] | None:
        """The layouts this call runs with, or None for dense attention."""
        if not self.applies(call):
            return None
        layouts = self.layouts(call)
        n = call.query.shape[2]
        if layouts is None or density(layouts, n - self.dense_rows(n)) > self.DENSE_ABOVE:
            return None
        return layouts

    def attend(self, call: AttnCall) -> torch.Tensor:
        started = time.perf_counter()
        layouts = self.plan(call)
        planned = time.perf_counter()
        if layouts is None:
            out = dense_attention(call)
        else:
            n = call.query.shape[2]
            sparse_rows = n - min(n, self.dense_rows(n))
            query, key, value = call.query[0], call.key[0], call.value[0]
            kernel = (
                flex_sparse_attention
                if pick_kernel(self.kernel, query.device) == "flex"
                else sparse_attention
            )
            out = kernel(query[:, :sparse_rows], key, value, layouts, call.scaling, call.softcap)
            if sparse_rows < n:
                last = AttnCall(**{**call.__dict__, "query": call.query[:, :, sparse_rows:],
                                   "q_pos": call.q_pos[sparse_rows:]})
                out = torch.cat([out, dense_attention(last)[0]], dim=1)
            out = out[None]
        if call.step is not None:  # the forward's costs: pattern estimation apart from the attention itself
            figures = call.step.stats.setdefault("sparse_prefill", {"estimate_s": 0.0, "attention_s": 0.0,
                                                                    "sparse_layers": 0, "dense_layers": 0})
            figures["estimate_s"] += planned - started
            figures["attention_s"] += time.perf_counter() - planned
            figures["dense_layers" if layouts is None else "sparse_layers"] += 1
        return out

    def mask(self, call: AttnCall, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Bool [q_heads, rows, k_len]: the keys each query row sees, or None where attention is dense."""
        layouts = self.plan(call)
        if layouts is None:
            return None
        n, q_heads = call.query.shape[2], call.query.shape[1]
        rows = torch.arange(n, device=call.query.device) if rows is None else rows
        masks = torch.stack([layout_mask(layout, n, rows) for layout in layouts])
        if len(layouts) == 1:
            masks = masks.expand(q_heads, -1, -1)
        dense = rows >= n - self.dense_rows(n)
        if bool(dense.any()):
            causal = visibility_mask(rows, call.k_pos - call.k_pos[:, :1], None)[:1]
            masks = torch.where(dense[None, :, None], causal, masks)
        return masks

    def reference(self, call: AttnCall) -> torch.Tensor:
        """The same attention by dense masked softmax: what `attend` must equal (tests)."""
        mask = self.mask(call)
        if mask is None:
            return reference_attention(call)
        return reference_attention(call, mask=mask)


def density(layouts: list[Layout], rows: int) -> float:
    """Estimated share of the causal query-key pairs of query rows 0..rows-1 that `layouts` keep."""
    if rows <= 0:
        return 1.0
    sample = torch.linspace(rows / DENSITY_ROWS, rows - 1, DENSITY_ROWS).round().long().unique()
    n = rows  # keys beyond the last sparse row are never visible to it
    kept = sum(float(layout_mask(layout, n, sample.to(layout_device(layout))).sum()) for layout in layouts)
    return kept / (len(layouts) * float((sample + 1).sum()))

