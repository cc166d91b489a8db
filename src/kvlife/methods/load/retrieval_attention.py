"""RetrievalAttention: the middle of the context in a CPU vector index, searched per decode step."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlife.attention import AttnCall, dense_attention
from kvlife.errors import SpecError
from kvlife.methods.base import LoadMethod
from kvlife.methods.load.ivf import AttentionIVF
from kvlife.methods.load.parts import (
    Lineage,
    merge_parts,
    part_attention,
    range_attention,
    recall_figures,
    record,
    token_bytes,
)

GATHER_ELEMENTS = 1 << 23  # gathered value elements per chunk of query rows (32 MiB float32)


@dataclass
class LayerIndex:
    """One layer's retrieval state: the context it indexes and the per-KV-head indexes."""

    lineage: Lineage  # the cache states that still hold this context unchanged
    context_tokens: int  # cache slots of the context when it was indexed
    queries: torch.Tensor | None  # [kv_heads, m, d] sample of the prefill's queries (index training)
    heads: list[AttentionIVF] | None = None  # built at the first decode step that needs them


@dataclasses.dataclass
class RetrievalAttention(LoadMethod):
    """Sinks and a recent window stay exact; the middle of the context is retrieved by vector search.

    Liu et al., 2024 ("RetrievalAttention: Accelerating Long-Context LLM Inference via Vector
    Retrieval"). After the context is prefilled its middle leaves the attention working set for a
    vector index per layer and KV head on the CPU; each decode step retrieves the top-k keys of
    its query from the index, attends exactly over them and over the resident sinks and window,
    and merges the two parts with their log-sum-exp (exact for the union of the two key sets).

    Decode queries are distributed unlike keys, so the index is attention-aware: an IVF whose
    lists are cut by k-means under the metric the prefill's queries induce on keys (see `ivf.py`;
    the paper builds a graph from the same query-key relation), probed by each list's mean score.
    The index is built once per context, at the first decode step, and reused while the cache
    still descends from that context (multi-turn turns and
    multi-request rollbacks keep it; a new context or a compressed cache rebuilds it). Tokens after
    the context (queries, answers, generated tokens) stay in the exact part. Sliding-window layers
    stay dense, as does a layer whose context has no middle.

    Parameters:
        n_sink (128): first cache slots of the context that stay exact (attention sinks).
        window (512): last context slots that stay exact (with every token after the context).
        top_k (2048): keys retrieved from the middle per query head and query row.
        ratio (None): top_k as a fraction of the context tokens instead (overrides top_k).
        nlist (0): lists per index; 0 picks one list per ~64 middle keys (at least 16).
        scan (0.25): fraction of the lists each query searches (the index's nprobe).
        train_queries (4096): prefill queries sampled per KV head to shape the lists.
        partition ("queries"): cut the lists under the metric of the prefill's queries, or
            "keys" (plain k-means on the keys, for comparison).
        measure_recall (False): record per layer the recall of the true top-k middle keys and the
            share of the true attention mass attended (costs a dense pass; for benchmarks).
    """

    name: ClassVar[str] = "retrieval_attention"
    paper: ClassVar[str] = (
        "Liu et al., 2024, RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval"
    )
    n_sink: int = 128
    window: int = 512
    top_k: int = 2048
    ratio: float | None = None
    nlist: int = 0
    scan: float = 0.25
    train_queries: int = 4096
    partition: str = "queries"
    measure_recall: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layers: dict[int, LayerIndex] = {}

    def validate(self) -> None:
        for field in ("n_sink", "window", "nlist"):
            if getattr(self, field) < 0:
                raise SpecError(f"retrieval_attention: {field} must be >= 0, got {getattr(self, field)}")
        if self.top_k < 1:
            raise SpecError(f"retrieval_attention: top_k must be >= 1, got {self.top_k}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise SpecError(f"retrieval_attention: ratio must be in (0, 1], got {self.ratio}")
        if not 0 < self.scan <= 1:
            raise SpecError(f"retrieval_attention: scan must be in (0, 1], got {self.scan}")
        if self.train_queries < 1:
            raise SpecError(f"retrieval_attention: train_queries must be >= 1, got {self.train_queries}")
        if self.partition not in ("queries", "keys"):
            raise SpecError(f"retrieval_attention: partition must be queries or keys, got {self.partition!r}")

    # ---- which slots are where --------------------------------------------------------------

    def middle(self, context_tokens: int) -> tuple[int, int]:
        """The slot range [lo, hi) of a context that lives in the index (may be empty)."""
        lo = min(self.n_sink, context_tokens)
        return lo, max(lo, context_tokens - self.window)

    def k_for(self, context_tokens: int) -> int:
        return max(1, round(self.ratio * context_tokens)) if self.ratio is not None else self.top_k

    # ---- observing the prefill ----------------------------------------------------------------

    def observe(self, call: AttnCall) -> None:
        """Prefill: remember the context and a sample of its queries. Extend: follow the lineage."""
        layer = call.step.cache.layers[call.layer_idx]
        if layer.is_sliding:
            return
        if call.step.phase == "prefill":
            self._layers[call.layer_idx] = LayerIndex(Lineage(call.key), call.key.shape[2],
                                                      self._sample(call))
            return
        state = self._layers.get(call.layer_idx)
        if state is not None:
            state.lineage.follow(layer, call.key)

    def _sample(self, call: AttnCall) -> torch.Tensor:
        """Up to `train_queries` of the group's query vectors per KV head, evenly spread."""
        kv_heads, groups = call.key.shape[1], call.groups
        rows = call.query[0].reshape(kv_heads, groups * call.query.shape[2], -1)
        if rows.shape[1] > self.train_queries:
            pick = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(call.layer_idx))
            rows = rows[:, pick[: self.train_queries].to(rows.device)]
        return rows.detach().float().cpu().clone()

    def _state(self, call: AttnCall, layer: Any) -> LayerIndex:
        state = self._layers.get(call.layer_idx)
        if state is not None and state.lineage.follow(layer, call.key):
            return state
        # Never indexed, or the cache no longer descends from the indexed context: index what is
        # cached before this call's tokens (with the old query sample where there is one).
        queries = state.queries if state is not None else None
        state = LayerIndex(Lineage(call.key), call.key.shape[2] - call.query.shape[2], queries)
        self._layers[call.layer_idx] = state
        return state

    def _build(self, call: AttnCall, state: LayerIndex) -> list[AttentionIVF]:
        lo, hi = self.middle(state.context_tokens)
        nlist = self.nlist or max(16, (hi - lo) // 64)
        heads = []
        for head in range(call.key.shape[1]):
            keys = call.key[0, head, lo:hi]
            queries = None
            if self.partition == "queries" and state.queries is not None:
                queries = state.queries[head]
            heads.append(AttentionIVF(keys, queries, nlist, self.scan, seed=call.layer_idx * 131 + head))
        return heads

    # ---- attention --------------------------------------------------------------------------

    def attend(self, call: AttnCall) -> torch.Tensor:
        layer = call.step.cache.layers[call.layer_idx] if call.step is not None else None
        tokens = call.key.shape[2]
        if layer is None or layer.is_sliding:
            return dense_attention(call)
        state = self._state(call, layer)
        lo, hi = self.middle(state.context_tokens)
        if hi <= lo:
            record(call, attended_tokens=tokens * call.key.shape[1], working_bytes=tokens * token_bytes(call))
            return dense_attention(call)
        device = call.key.device
        exact = torch.cat([torch.arange(0, lo, device=device), torch.arange(hi, tokens, device=device)])
        parts = [range_attention(call, hi, tokens)] + ([range_attention(call, 0, lo)] if lo > 0 else [])
        k = self.k_for(state.context_tokens)
        if k >= hi - lo:  # the whole middle is wanted: no index, exact scores
            parts.append(range_attention(call, lo, hi))
            ids = torch.arange(hi - lo, device=device).expand(call.query.shape[1], call.query.shape[2], -1)
            k = hi - lo
        else:
            if state.heads is None:
                started = time.perf_counter()
                state.heads = self._build(call, state)
                record(call, index_build_s=time.perf_counter() - started)
            middle, ids = self._retrieved(call, state.heads, lo, hi, k)
            parts.append(middle)
        output = merge_parts(parts).to(call.value.dtype)[None]
        per_token, offloaded = token_bytes(call), (hi - lo if state.heads is not None else 0)
        record(call, attended_tokens=(exact.numel() + k) * call.key.shape[1], sparse_layers=1,
               working_bytes=(tokens - offloaded) * per_token, offloaded_bytes=offloaded * per_token,
               retrieved_bytes=k * per_token if offloaded else 0)
        if self.measure_recall:
            hit, mass = self._recall(call, exact, ids, lo, hi, k)
            record(call, recall=[hit], mass=[mass])
        return output

    def _retrieved(self, call: AttnCall, heads: list[AttentionIVF], lo: int, hi: int, k: int):
        """Search each KV head's index with its group's queries; (output, lse) of the retrieved keys
        and the retrieved middle ids [q_heads, q_len, k] (-1 where the lists held fewer)."""
        groups, q_len, dim = call.groups, call.query.shape[2], call.query.shape[3]
        outputs, lses, all_ids = [], [], []
        rows_per_chunk = max(1, GATHER_ELEMENTS // (groups * k * dim))
        for head, index in enumerate(heads):
            query = call.query[0, head * groups:(head + 1) * groups]  # [g, q, d]
            scores, ids = index.search(query.reshape(groups * q_len, dim), k)
            scores, ids = scores.reshape(groups, q_len, k).to(call.key.device), ids.reshape(groups, q_len, k)
            scores = scores * call.scaling
            if call.softcap is not None:
                scores = torch.tanh(scores / call.softcap) * call.softcap
            found = (ids >= 0).to(call.key.device)
            values = call.value[0, head, lo:hi]
            head_out, head_lse = [], []
            for start in range(0, q_len, rows_per_chunk):
                rows = slice(start, start + rows_per_chunk)
                chunk = ids[:, rows].clamp(min=0).to(values.device)
                gathered = values.index_select(0, chunk.flatten()).view(*chunk.shape, dim)  # [g, rows, k, d]
                out, lse = part_attention(scores[:, rows], gathered, found[:, rows])
                head_out.append(out)
                head_lse.append(lse)
            outputs.append(torch.cat(head_out, dim=1))
            lses.append(torch.cat(head_lse, dim=1))
            all_ids.append(ids)
        return (torch.cat(outputs), torch.cat(lses)), torch.cat(all_ids)

    def _recall(self, call: AttnCall, exact: torch.Tensor, ids: torch.Tensor, lo: int, hi: int, k: int):
        tokens, device = call.key.shape[2], call.key.device
        attended = torch.zeros(call.query.shape[1], call.query.shape[2], tokens, dtype=torch.bool,
                               device=device)
        # ids -1 (lists held fewer than k) point at the newest slot, which is exact anyway
        slots = torch.where(ids >= 0, ids + lo, tokens - 1).to(device)
        attended.scatter_(-1, slots, True)
        attended[:, :, exact] = True
        eligible = torch.zeros(call.key.shape[1], call.query.shape[2], tokens, dtype=torch.bool,
                               device=device)
        eligible[..., lo:hi] = True
        return recall_figures(call, attended, k, eligible)

    def byte_split(self, cache: Any) -> dict[str, int]:
        """Bytes resident in the attention working set vs the middle K/V offloaded to the index
        (`index_bytes`: what the CPU indexes hold, float32 key copies and ids)."""
        split = {"working_bytes": 0, "offloaded_bytes": 0, "index_bytes": 0}
        for index, layer in cache.kv_layers():
            keys, _ = layer.dense_kv()
            tokens, per_token = keys.shape[2], token_bytes(keys)
            state = self._layers.get(index)
            offloaded = 0
            if state is not None and not layer.is_sliding:
                lo, hi = self.middle(state.context_tokens)
                if self.k_for(state.context_tokens) < hi - lo:
                    offloaded = min(hi, tokens) - lo
                if state.heads:
                    split["index_bytes"] += sum(head.nbytes() for head in state.heads)
            split["working_bytes"] += (tokens - offloaded) * per_token
            split["offloaded_bytes"] += offloaded * per_token
        return split
