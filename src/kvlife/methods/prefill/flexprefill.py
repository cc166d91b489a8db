"""FlexPrefill: per head and per input, query-aware block selection or vertical-slash, by mass."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvlife.attention import AttnCall
from kvlife.errors import SpecError
from kvlife.methods.prefill.estimate import (
    block_layout,
    last_query_probs,
    pooled_block_scores,
    top_columns,
    top_diagonals,
    vertical_slash_layout,
    vertical_slash_sums,
)
from kvlife.methods.prefill.kernels import BLOCK, Layout
from kvlife.methods.prefill.sparse import SparsePrefill


def mass_count(scores: torch.Tensor, gamma: float) -> int:
    """How many of the largest entries of non-negative `scores` [n] hold a `gamma` share of their sum."""
    values = scores.sort(descending=True).values
    cumulative = values.cumsum(0)
    return int(torch.searchsorted(cumulative, gamma * cumulative[-1])) + 1


@dataclasses.dataclass
class FlexPrefill(SparsePrefill):
    """Each head picks, per input, the pattern and the number of keys that hold `gamma` of its attention.

    Lai et al., 2025 ("FlexPrefill") decide per head whether mean-pooled queries and keys predict the
    last query block's attention (Jensen-Shannon distance below `tau`): if so the head is
    query-aware and every query block keeps its heaviest pooled key blocks, chosen over the whole
    head until they hold `gamma` of the estimated mass; if not, the head is vertical-slash, with as
    many columns and diagonals as hold `gamma` of the last queries' attention. Budgets thus follow
    the input instead of a fixed size.

    Parameters:
        gamma (0.9): share of attention mass the selection must cover (higher: denser, more exact).
        tau (0.1): Jensen-Shannon distance below which a head uses query-aware block selection.
        last_q (64): last query rows read by the estimates.
        kernel ("auto"): the attention kernel: kvlife, flex (flex_attention, compiled) or auto (flex on CUDA).
    A layer whose selection keeps more than 35% of the causal query-key pairs attends densely.
    """

    name: ClassVar[str] = "flexprefill"
    paper: ClassVar[str] = ("Lai et al., 2025, FlexPrefill: A Context-Aware Sparse Attention Mechanism for "
                            "Efficient Long-Sequence Inference")
    gamma: float = 0.9
    tau: float = 0.1
    last_q: int = 64

    def validate(self) -> None:
        if not isinstance(self.gamma, (int, float)) or not 0 < self.gamma <= 1:
            raise SpecError(f"{self.name}: gamma must be in (0, 1], got {self.gamma!r}")
        if not isinstance(self.tau, (int, float)) or self.tau < 0:
            raise SpecError(f"{self.name}: tau must be >= 0, got {self.tau!r}")
        if isinstance(self.last_q, bool) or not isinstance(self.last_q, int) or self.last_q < 1:
            raise SpecError(f"{self.name}: last_q must be a positive integer, got {self.last_q!r}")

    def layouts(self, call: AttnCall) -> list[Layout] | None:
        n, q_heads = call.query.shape[2], call.query.shape[1]
        probs = last_query_probs(call, list(range(q_heads)), self.last_q)  # [h, last_q, n]
        vertical, slash = vertical_slash_sums(probs)
        n_blocks = -(-n // BLOCK)
        layouts = []
        for head in range(q_heads):
            pooled = pooled_block_scores(call, head)
            if self.query_aware(probs[head], pooled[-1], n_blocks):
                layouts.append(self.block_selection(pooled))
            else:
                columns = top_columns(vertical[head], mass_count(vertical[head], self.gamma))
                diagonals = top_diagonals(slash[head], mass_count(slash[head], self.gamma))
                layouts.append(vertical_slash_layout(columns, diagonals, n))
        return layouts

    def query_aware(self, last_probs: torch.Tensor, estimate: torch.Tensor, n_blocks: int) -> bool:
        """Does the pooled estimate (last query block's row) match the true block mass of the last queries?"""
        n = last_probs.shape[-1]
        padded = last_probs.mean(0).new_zeros(n_blocks * BLOCK)
        padded[:n] = last_probs.mean(0)
        true = padded.view(n_blocks, BLOCK).sum(1)
        middle = (true + estimate) / 2
        js = 0.5 * (
            torch.special.xlogy(true, true / middle).nansum()
            + torch.special.xlogy(estimate, estimate / middle).nansum()
        )
        return float(js.clamp_min(0).sqrt()) < self.tau

    def block_selection(self, pooled: torch.Tensor) -> Layout:
        """Key blocks chosen over the whole head, heaviest first, until they hold gamma of the pooled mass."""
        n_blocks = pooled.shape[0]
        flat = pooled.flatten()
        keep = mass_count(flat, self.gamma)
        chosen_flat = torch.topk(flat, keep, sorted=False).indices
        rows, cols = chosen_flat // n_blocks, chosen_flat % n_blocks
        counts = torch.bincount(rows, minlength=n_blocks)
        width = int(counts.max())
        chosen = torch.full((n_blocks, width), -1, dtype=torch.long, device=pooled.device)
        order = torch.argsort(rows, stable=True)
        rows, cols = rows[order], cols[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.numel(), device=pooled.device) - starts[rows]
        chosen[rows, slot] = cols
        return block_layout(chosen)
