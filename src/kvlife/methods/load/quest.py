"""Quest: query-aware page selection at each decode step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlife.attention import AttnCall, dense_attention, reference_attention, visibility_mask
from kvlife.errors import SpecError
from kvlife.methods.base import LoadMethod
from kvlife.methods.load.parts import grouped_attention, recall_figures, record, token_bytes


@dataclass
class PageBounds:
    """Per-channel key minimum and maximum of every page of one layer, per KV head."""

    keys: torch.Tensor  # the layer's keys tensor these bounds describe (identity, for lineage)
    tokens: int
    mins: torch.Tensor  # [kv_heads, pages, head_dim]
    maxs: torch.Tensor

    def nbytes(self) -> int:
        return 2 * self.mins.numel() * self.mins.element_size()


def page_bounds(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [kv_heads, n, d] -> (mins, maxs) [kv_heads, ceil(n / page_size), d]; the last page may
    be partial."""
    kv_heads, n, dim = keys.shape
    full = n // page_size
    body = keys[:, : full * page_size].reshape(kv_heads, full, page_size, dim)
    mins, maxs = [body.amin(2)], [body.amax(2)]
    if n > full * page_size:
        tail = keys[:, full * page_size:]
        mins.append(tail.amin(1, keepdim=True))
        maxs.append(tail.amax(1, keepdim=True))
    return torch.cat(mins, dim=1), torch.cat(maxs, dim=1)


@dataclasses.dataclass
class Quest(LoadMethod):
    """Attend, at each decode step, only to the cache pages whose keys can score highest.

    Tang et al., 2024 ("Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference").
    Keys are grouped in pages with per-channel minimum and maximum; for a query q the upper bound
    of q·k over a page is sum_c max(q_c min_c, q_c max_c), and the step attends exactly to the
    pages with the highest bounds, within a token budget.

    Pages are per KV head: the bounds of a group's query heads are reduced (mean by default, the
    kvlife convention; `max` keeps a page any head of the group may need) and the group shares one
    selection, so each KV head loads `budget` tokens. Each query row always keeps its own page
    (the newest tokens) and never selects pages after it. Bounds are kept per layer and extended
    incrementally while the cache only grows; when the cache was cut back (multi-request rollback,
    compression) they are recomputed once from the layer's keys. Sliding-window layers and the
    first `dense_layers` stay dense; so does any layer whose cache fits the budget.

    Parameters:
        budget (1024): tokens attended per KV head and layer (whole pages: budget // page_size pages).
        ratio (None): the budget as a fraction of the layer's cached tokens instead (overrides budget).
        page_size (16): tokens per page.
        dense_layers (2): the first layers attend densely (the paper keeps the first two dense).
        group_reduce ("mean"): how the bounds of a GQA group's query heads are combined, mean or max.
        measure_recall (False): record, per layer, the recall of the true top-budget keys and the
            share of the true attention mass covered (costs a dense pass; for benchmarks).
    """

    name: ClassVar[str] = "quest"
    paper: ClassVar[str] = (
        "Tang et al., 2024, Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"
    )
    budget: int = 1024
    ratio: float | None = None
    page_size: int = 16
    dense_layers: int = 2
    group_reduce: str = "mean"
    measure_recall: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._bounds: dict[int, PageBounds] = {}

    def validate(self) -> None:
        if self.budget < 1:
            raise SpecError(f"quest: budget must be a positive number of tokens, got {self.budget}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise SpecError(f"quest: ratio must be in (0, 1], got {self.ratio}")
        if self.page_size < 1:
            raise SpecError(f"quest: page_size must be >= 1, got {self.page_size}")
        if self.dense_layers < 0:
            raise SpecError(f"quest: dense_layers must be >= 0, got {self.dense_layers}")
        if self.group_reduce not in ("mean", "max"):
            raise SpecError(f"quest: group_reduce must be mean or max, got {self.group_reduce!r}")

    def pages_for(self, tokens: int) -> int:
        budget = max(1, round(self.ratio * tokens)) if self.ratio is not None else self.budget
        return max(1, budget // self.page_size)

    def is_sparse(self, layer_idx: int, layer: Any, tokens: int) -> bool:
        pages = -(-tokens // self.page_size)
        return layer_idx >= self.dense_layers and not layer.is_sliding and self.pages_for(tokens) < pages

    # ---- page bounds, kept incrementally ---------------------------------------------------

    def bounds(self, call: AttnCall, layer: Any) -> PageBounds:
        keys, size = call.key, self.page_size
        tokens = keys.shape[2]
        state = self._bounds.get(call.layer_idx)
        ref = getattr(layer, "grown_from", None)
        parent = ref() if ref is not None else None
        if state is not None and state.keys is keys:
            return state
        if state is not None and parent is not None and parent is state.keys and tokens >= state.tokens:
            keep = state.tokens // size  # complete pages stay; the partial last page is redone
            mins, maxs = page_bounds(keys[0, :, keep * size:], size)
            mins = torch.cat([state.mins[:, :keep], mins.to(state.mins.dtype)], dim=1)
            maxs = torch.cat([state.maxs[:, :keep], maxs.to(state.maxs.dtype)], dim=1)
        else:
            mins, maxs = page_bounds(keys[0], size)
        state = PageBounds(keys, tokens, mins, maxs)
        self._bounds[call.layer_idx] = state
        return state

    # ---- attention --------------------------------------------------------------------------

    def select_pages(self, call: AttnCall, bounds: PageBounds) -> torch.Tensor:
        """Indices [kv_heads, q_len, n_pages] of the pages each KV head attends to, per query row."""
        query = call.query[0].float()  # [h, q, d]
        groups, kv_heads = call.groups, call.key.shape[1]
        mins = bounds.mins.float().repeat_interleave(groups, dim=0)
        maxs = bounds.maxs.float().repeat_interleave(groups, dim=0)
        upper = query.clamp(min=0) @ maxs.transpose(1, 2) + query.clamp(max=0) @ mins.transpose(1, 2)
        upper = upper.reshape(kv_heads, groups, *upper.shape[1:])
        upper = upper.amax(1) if self.group_reduce == "max" else upper.mean(1)  # [kv, q, pages]
        q_len, tokens, n_pages = query.shape[1], bounds.tokens, upper.shape[-1]
        own = (tokens - q_len + torch.arange(q_len, device=upper.device)) // self.page_size
        page = torch.arange(n_pages, device=upper.device)
        upper = upper.masked_fill(page > own[:, None], float("-inf"))
        upper = upper.masked_fill(page == own[:, None], float("inf"))
        return upper.topk(self.pages_for(tokens), dim=-1).indices

    def attend(self, call: AttnCall) -> torch.Tensor:
        layer = call.step.cache.layers[call.layer_idx] if call.step is not None else None
        tokens = call.key.shape[2]
        if layer is None or not self.is_sparse(call.layer_idx, layer, tokens):
            record(call, attended_tokens=tokens * call.key.shape[1], working_bytes=tokens * token_bytes(call))
            return dense_attention(call)
        bounds = self.bounds(call, layer)
        pages = self.select_pages(call, bounds)
        n_pages = pages.shape[-1]
        if call.query.shape[2] == 1:
            output = self._gathered(call, pages[:, 0])
        else:
            output = reference_attention(call, self._slot_mask(pages, bounds))
        attended = min(tokens, n_pages * self.page_size)
        record(call, attended_tokens=attended * call.key.shape[1],
               working_bytes=attended * token_bytes(call) + bounds.nbytes(),
               offloaded_bytes=(tokens - attended) * token_bytes(call), sparse_layers=1)
        if self.measure_recall:
            hit, mass = recall_figures(call, self._slot_mask(pages, bounds), attended)
            record(call, recall=[hit], mass=[mass])
        return output

    def _slot_mask(self, pages: torch.Tensor, bounds: PageBounds) -> torch.Tensor:
        kv_heads, q_len, n_pages = pages.shape
        chosen = torch.zeros(kv_heads, q_len, bounds.mins.shape[1], dtype=torch.bool, device=pages.device)
        chosen.scatter_(-1, pages, True)
        slot_page = torch.arange(bounds.tokens, device=pages.device) // self.page_size
        return chosen[:, :, slot_page]

    def _gathered(self, call: AttnCall, pages: torch.Tensor) -> torch.Tensor:
        """One query row: gather the chosen pages' keys and values and attend over those only."""
        tokens, dim = call.key.shape[2], call.key.shape[3]
        in_page = torch.arange(self.page_size, device=pages.device)
        slots = (pages[:, :, None] * self.page_size + in_page).flatten(1)
        valid = slots < tokens
        slots = slots.clamp(max=tokens - 1)
        index = slots[:, :, None].expand(-1, -1, dim)
        visible = visibility_mask(call.q_pos, call.k_pos.gather(1, slots), call.sliding_window)
        visible = visible & valid[:, None]
        output, _ = grouped_attention(call, call.key[0].gather(1, index), call.value[0].gather(1, index),
                                      visible)
        return output.to(call.value.dtype)[None]

    def byte_split(self, cache: Any) -> dict[str, int]:
        """Bytes a decode step attends to (working set, with the page bounds) vs bytes it leaves at rest."""
        split = {"working_bytes": 0, "offloaded_bytes": 0, "metadata_bytes": 0}
        for index, layer in cache.kv_layers():
            keys, _ = layer.dense_kv()
            tokens, per_token = keys.shape[2], token_bytes(keys)
            if not self.is_sparse(index, layer, tokens):
                split["working_bytes"] += tokens * per_token
                continue
            attended = min(tokens, self.pages_for(tokens) * self.page_size)
            metadata = 2 * keys.shape[1] * -(-tokens // self.page_size) * keys.shape[-1] * keys.element_size()
            split["working_bytes"] += attended * per_token + metadata
            split["metadata_bytes"] += metadata
            split["offloaded_bytes"] += (tokens - attended) * per_token
        return split
