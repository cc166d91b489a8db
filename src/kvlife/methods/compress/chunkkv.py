"""ChunkKV: keep whole chunks of contiguous tokens, ranked by the mean score of their tokens."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvlife.attention import AttnCall
from kvlife.cache import KVLayer
from kvlife.errors import SpecError
from kvlife.methods.base import ScoreCompressMethod
from kvlife.methods.compress.expected_attention import ExpectedAttention
from kvlife.methods.compress.keydiff import KeyDiff
from kvlife.methods.compress.snapkv import SnapKV

SCORERS: dict[str, type[ScoreCompressMethod]] = {
    "snapkv": SnapKV, "expected_attention": ExpectedAttention, "keydiff": KeyDiff,
}


def chunk_ranked(scores: torch.Tensor, chunk_length: int) -> torch.Tensor:
    """Token scores [kv_heads, slots] -> scores whose top-k is whole chunks, best chunk first.

    Chunks are `chunk_length` consecutive slots (the last may be shorter), scored by the mean of
    their tokens' finite scores over all heads, so every head keeps the same chunks. A token's new
    score is its chunk's place in that ranking plus a tie-break below 1 by its own score, so a
    budget that ends inside a chunk keeps that chunk's best tokens. Padding stays -inf."""
    heads, slots = scores.shape
    finite = scores.isfinite()
    chunk_of = torch.arange(slots, device=scores.device) // chunk_length
    n_chunks = int(chunk_of[-1]) + 1 if slots else 0
    sums = torch.zeros(n_chunks, device=scores.device).index_add_(0, chunk_of,
                                                                   scores.where(finite, 0.0).sum(0))
    counts = torch.zeros(n_chunks, device=scores.device).index_add_(0, chunk_of, finite.sum(0).float())
    chunk_scores = (sums / counts.clamp(min=1)).masked_fill(counts == 0, float("-inf"))
    place = torch.empty(n_chunks, device=scores.device)
    ranked = chunk_scores.argsort(descending=True, stable=True)
    place[ranked] = torch.arange(n_chunks, 0, -1, device=scores.device, dtype=place.dtype)
    tie_break = scores.argsort(dim=-1).argsort(dim=-1).float() / (slots + 1)
    return (place[chunk_of][None] + tie_break).masked_fill(~finite, float("-inf"))


@dataclasses.dataclass
class ChunkKV(ScoreCompressMethod):
    """Keep whole chunks of contiguous tokens, chosen by the mean score of their tokens.

    Liu et al., 2025 ("ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context
    LLM Inference") observed that token-level eviction keeps scattered tokens and breaks the
    phrases they belong to. ChunkKV groups the cache into chunks of `chunk_length` contiguous
    tokens, scores each chunk by its tokens' scores (SnapKV's observation-window attention in the
    paper) and keeps the best chunks whole, so exact strings such as UUIDs or codes survive or go
    together. All KV heads of a layer keep the same chunks (the paper's layer-wise selection);
    where the budget ends inside a chunk, that chunk keeps its best tokens.

    Parameters:
        ratio / budget (None): tokens kept per KV head, as a fraction of the tokens seen or in tokens.
        chunk_length (10): tokens per chunk (the paper's default).
        scorer ("snapkv"): token scores: "snapkv" (attention of the prefill's last 32 queries, its
            window kept), "expected_attention" or "keydiff" (query-agnostic).
    """

    name: ClassVar[str] = "chunkkv"
    paper: ClassVar[str] = (
        "Liu et al., 2025, ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context "
        "LLM Inference"
    )
    chunk_length: int = 10
    scorer: str = "snapkv"

    def validate(self) -> None:
        super().validate()
        if self.chunk_length < 1:
            raise SpecError(f"chunkkv: chunk_length must be >= 1, got {self.chunk_length}")
        if self.scorer not in SCORERS:
            raise SpecError(f"chunkkv: unknown scorer {self.scorer!r}; valid: {', '.join(SCORERS)}")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.inner = SCORERS[self.scorer](ratio=self.ratio, budget=self.budget)

    def score(self, call: AttnCall, layer: KVLayer) -> torch.Tensor:
        return chunk_ranked(self.inner.score(call, layer), self.chunk_length)
