"""MInference: per-head dynamic sparse prefill (vertical-slash, block-sparse), patterns from a config."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvlife.attention import AttnCall
from kvlife.errors import SpecError
from kvlife.methods.prefill import patterns
from kvlife.methods.prefill.estimate import (
    a_shape_layout,
    last_query_probs,
    pooled_block_scores,
    select_vertical_slash,
    top_blocks,
)
from kvlife.methods.prefill.kernels import BLOCK, Layout
from kvlife.methods.prefill.patterns import HeadPattern
from kvlife.methods.prefill.sparse import SparsePrefill

NO_CONFIG_PATTERNS = ("vertical_slash", "block_sparse")


@dataclasses.dataclass
class MInference(SparsePrefill):
    """Each head attends with its own dynamic sparse pattern, estimated online from its queries.

    Jiang et al., 2024 ("MInference 1.0") observed that prefill attention heads keep one of a few
    shapes (A-shape, vertical-slash, block-sparse) whose exact positions change with the input; an
    offline search assigns each head a shape and sizes, and at run time a cheap estimate (the last 64
    queries against all keys, or mean-pooled blocks) picks the columns, diagonals or blocks.
    Vertical-slash keeps the top `vertical_size` key columns and the top `slash_size` diagonals from
    the last queries' attention (the first 30 columns and 100 most local diagonals always; each
    diagonal widened to the 64-row query block, as MInference's kernel computes it); block-sparse
    keeps each 64-query block's `top_k` key blocks by mean-pooled Q·K (plus the first and own block).

    Parameters:
        config (None): per-head patterns and sizes: a shipped config's name (the model's, e.g.
            `qwen2.5-coder-0.5b`, see kvlife/configs/) or a JSON file from `kvlife search-patterns`.
            Without one, every head uses `pattern` with the sizes below.
        pattern ("vertical_slash"): the pattern of every head without a config: vertical_slash or
        block_sparse.
        vertical_size (1000): key columns kept per head (vertical_slash without a config).
        slash_size (6096): diagonals kept per head (vertical_slash without a config).
        top_k (100): key blocks kept per query block (block_sparse without a config).
        last_q (64): query rows the vertical-slash estimate reads (the last ones).
        kernel ("auto"): the attention kernel: kvlife, flex (flex_attention, compiled) or auto (flex on CUDA).
        Sizes are MInference's defaults, meant for 100K+ contexts; on shorter sequences they are
        clamped (a size >= the sequence is dense attention), and a layer whose estimated patterns
        keep more than 35% of the causal query-key pairs attends densely (faster on CPU, and exact).
    """

    name: ClassVar[str] = "minference"
    paper: ClassVar[str] = ("Jiang et al., 2024, MInference 1.0: Accelerating Pre-filling for Long-Context "
                            "LLMs via Dynamic Sparse Attention")
    config: str | None = None
    pattern: str = "vertical_slash"
    vertical_size: int = 1000
    slash_size: int = 6096
    top_k: int = 100
    last_q: int = 64

    def validate(self) -> None:
        if self.pattern not in NO_CONFIG_PATTERNS:
            raise SpecError(
                f"{self.name}: unknown pattern {self.pattern!r}; valid: {', '.join(NO_CONFIG_PATTERNS)}"
            )
        for field in ("vertical_size", "slash_size", "top_k", "last_q"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{self.name}: {field} must be a positive integer, got {value!r}")
        if self.config is not None:
            patterns.load(str(self.config))  # fail at parse time on a missing or bad file

    def head_patterns(self, call: AttnCall) -> tuple[HeadPattern, ...]:
        q_heads = call.query.shape[1]
        if self.config is None:
            if self.pattern == "block_sparse":
                return (HeadPattern("block_sparse", {"top_k": self.top_k}),) * q_heads
            sizes = {"vertical_size": self.vertical_size, "slash_size": self.slash_size}
            return (HeadPattern("vertical_slash", sizes),) * q_heads
        return patterns.load(str(self.config)).heads(call.layer_idx, call.n_layers, q_heads)

    def layouts(self, call: AttnCall) -> list[Layout] | None:
        return pattern_layouts(call, self.head_patterns(call), self.last_q)


def pattern_layouts(call: AttnCall, heads: tuple[HeadPattern, ...], last_q: int = 64,
                    estimates: dict | None = None) -> list[Layout] | None:
    """Per query head, the layout its pattern estimates on this call; None when all are dense.

    `estimates` (optional, a dict) keeps the per-call estimates across calls on the same `call`
    (the pattern search scores many candidates on one layer)."""
    n, device = call.query.shape[2], call.query.device
    estimates = {} if estimates is None else estimates
    layouts: list[Layout | None] = [None] * len(heads)
    vs_heads = []
    for h, head in enumerate(heads):
        if head.pattern == "a_shape":
            layouts[h] = a_shape_layout(n, head.size("n_init"), head.size("n_local"), device)
        elif head.pattern == "block_sparse" and head.size("top_k") < -(-n // BLOCK):
            if ("pooled", h) not in estimates:
                estimates[("pooled", h)] = pooled_block_scores(call, h)
            layouts[h] = top_blocks(estimates[("pooled", h)], head.size("top_k"))
        elif (
            head.pattern == "vertical_slash" and max(head.size("vertical_size"), head.size("slash_size")) < n
        ):
            vs_heads.append(h)  # a size >= n keeps every key: dense
    missing = [h for h in vs_heads if ("probs", h) not in estimates]
    if missing:
        probs = last_query_probs(call, missing, last_q)
        for i, h in enumerate(missing):
            estimates[("probs", h)] = probs[i]
    for h in vs_heads:
        columns, offsets = select_vertical_slash(estimates[("probs", h)], n, heads[h].size("vertical_size"),
                                                 heads[h].size("slash_size"))
        layouts[h] = Layout(columns=columns, offsets=offsets)
    if all(layout is None for layout in layouts):
        return None
    return [layout if layout is not None else full_layout(n, device) for layout in layouts]


def full_layout(n: int, device: torch.device | str = "cpu") -> Layout:
    """Every causal key (a dense head inside a sparse layer)."""
    return Layout(offsets=torch.arange(-(n - 1), BLOCK, device=device))
