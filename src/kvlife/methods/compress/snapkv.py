"""SnapKV: keep the tokens the last queries of the prompt attend to, plus those queries' window.

Also home of the attention-scoring helpers the other score-based methods share (`attention_mass`,
`pool_scores`, `protect_last`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvlife.attention import AttnCall, visibility_mask
from kvlife.cache import KVLayer
from kvlife.errors import SpecError
from kvlife.methods.base import ScoreCompressMethod, reduce_groups

SCORE_ELEMENTS = 1 << 24  # float32 scores per chunk (64 MiB): bounds the memory of every scorer
PROTECTED = 2.0  # above any attention probability or mean of them: a protected token always ranks first


def attention_mass(call: AttnCall, layer: KVLayer, rows: slice, chunk_rows: int = 512,
                   reduce: str = "sum", allowed: torch.Tensor | None = None,
                   weigh: Callable[[torch.Tensor, slice, slice], torch.Tensor] | None = None) -> torch.Tensor:
    """Sum (or with `reduce="max"` the maximum) over the query rows `rows` of each query head's
    attention to every cached key.

    The softmax runs over the layer's cached keys with the positional mask (causality and the
    sliding window), as the layer's attention saw them, and only over the slots `allowed` marks
    (bool [kv_heads, slots]) where given. `weigh(probs, heads, rows)` may reweigh the probabilities
    [group heads, rows, slots] of query heads `heads` and rows `rows` (of the rows asked) before the
    reduction. Computed per KV head group and in chunks of query rows, so memory stays bounded
    however long the context. Returns float32 [q_heads, cached tokens].
    """
    keys, _ = layer.dense_kv()
    keys, k_pos = keys[0], layer.positions
    query, q_pos = call.query[0, :, rows], call.q_pos[rows]
    kv_heads, groups = keys.shape[0], query.shape[0] // keys.shape[0]
    n_keys, n_rows = keys.shape[1], query.shape[1]
    step = max(1, min(chunk_rows, SCORE_ELEMENTS // max(1, groups * n_keys)))
    mass = torch.zeros(query.shape[0], n_keys, dtype=torch.float32, device=keys.device)
    for head in range(kv_heads):
        head_keys = keys[head].float()
        heads = slice(head * groups, (head + 1) * groups)
        for start in range(0, n_rows, step):
            stop = min(start + step, n_rows)
            scores = torch.matmul(query[heads, start:stop].float(), head_keys.T) * call.scaling
            if call.softcap is not None:
                scores = torch.tanh(scores / call.softcap) * call.softcap
            visible = visibility_mask(q_pos[start:stop], k_pos[head:head + 1], call.sliding_window)
            if allowed is not None:
                visible &= allowed[head][None, None]
            scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            if weigh is not None:
                probs = weigh(probs, heads, slice(start, stop))
            if reduce == "max":
                mass[heads] = torch.maximum(mass[heads], probs.amax(dim=1))
            else:
                mass[heads] += probs.sum(dim=1)
    return mass


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str = "avg") -> torch.Tensor:
    """Smooth [heads, tokens] scores along the tokens (SnapKV's clustering), same length out."""
    if kernel_size <= 1 or scores.shape[-1] == 0:
        return scores
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    return pool(scores[:, None], kernel_size=kernel_size, stride=1, padding=kernel_size // 2)[:, 0]


def safeguard(scores: torch.Tensor, n: int, floor: float = PROTECTED) -> torch.Tensor:
    """Ada-KV's safeguard: raise each head's (row's) own top `n` scores of [heads, tokens] to at least
    `floor`, so that a selection over several heads keeps them; -inf entries (padding) stay out."""
    n = min(n, scores.shape[-1])
    if n <= 0:
        return scores
    top = scores.topk(n, dim=-1).indices
    raised = scores.scatter(-1, top, scores.gather(-1, top).clamp(min=floor))
    return raised.masked_fill(scores == float("-inf"), float("-inf"))


def protect_last(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Rank the last `n` cache entries (the newest tokens) above everything, newest first."""
    n = min(n, scores.shape[-1])
    if n <= 0:
        return scores
    scores = scores.clone()
    scores[:, -n:] = PROTECTED + torch.linspace(0.0, 1.0, n, device=scores.device)
    return scores


def window_size_for(call: AttnCall, window_size: int) -> int:
    """The observation window: the last `window_size` queries of this call (all, if fewer)."""
    return min(window_size, call.query.shape[2])


@dataclasses.dataclass
class SnapKV(ScoreCompressMethod):
    """Keep the tokens that the prompt's last queries attend to most, plus those queries.

    Li et al., 2024 ("SnapKV: LLM Knows What You are Looking for Before Generation") observed that
    the last queries of a prompt (the observation window) already attend to the tokens that
    generation will need. Each cached token is scored by the window's attention to it, averaged
    over the window, reduced over the GQA group and pooled along the tokens, and the top tokens
    per KV head are kept together with the window itself.

    Parameters:
        ratio / budget (None): tokens kept per KV head, as a fraction of the tokens seen or in
            tokens; the window counts in the budget (a budget below the window keeps its newest part).
        window_size (32): queries in the observation window (the newest tokens of the prefill).
        kernel_size (5): width of the pooling along tokens (odd; 1 disables pooling).
        pooling ("avg"): "avg" or "max" pooling.
        group_reduce ("mean"): how the query heads of one GQA group are reduced, "mean" or "max".
    """

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "Li et al., 2024, SnapKV: LLM Knows What You are Looking for Before Generation"
    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avg"
    group_reduce: str = "mean"

    def validate(self) -> None:
        super().validate()
        if self.window_size < 1:
            raise SpecError(f"{self.name}: window_size must be >= 1, got {self.window_size}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise SpecError(f"{self.name}: kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.pooling not in ("avg", "max"):
            raise SpecError(f"{self.name}: pooling must be avg or max, got {self.pooling!r}")
        if self.group_reduce not in ("mean", "max"):
            raise SpecError(f"{self.name}: group_reduce must be mean or max, got {self.group_reduce!r}")

    def score(self, call: AttnCall, layer: KVLayer) -> torch.Tensor:
        window = window_size_for(call, self.window_size)
        mass = attention_mass(call, layer, slice(call.query.shape[2] - window, None)) / window
        scores = reduce_groups(mass, layer.positions.shape[0], self.group_reduce)
        # Pool only the tokens before the window, so the window's own scores do not leak into them.
        head = pool_scores(scores[:, : scores.shape[-1] - window], self.kernel_size, self.pooling)
        return protect_last(torch.cat([head, scores[:, scores.shape[-1] - window:]], dim=-1), window)

