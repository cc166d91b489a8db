"""DuoAttention: retrieval heads keep the whole cache, streaming heads keep sinks and recent tokens."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar

import torch

from kvlife.errors import SpecError
from kvlife.methods.base import CacheCompressMethod, CacheStage
from kvlife.methods.compress import head_split
from kvlife.methods.compress.keep import apply_keep, real_slots


def water_fill(caps: list[int], amount: int) -> list[int]:
    """Split `amount` tokens as evenly as the caps allow; leftover single tokens go to the first heads."""
    counts = [0] * len(caps)
    open_heads = [i for i, cap in enumerate(caps) if cap > 0]
    while open_heads and amount > 0:
        share = amount // len(open_heads)
        if share == 0:
            for i in open_heads[:amount]:
                counts[i] += 1
            break
        still_open = []
        for i in open_heads:
            give = min(share, caps[i] - counts[i])
            counts[i] += give
            amount -= give
            if counts[i] < caps[i]:
                still_open.append(i)
        open_heads = still_open
    return counts


def budget_counts(held: list[int], total: int, window: int) -> tuple[list[int], int]:
    """Tokens per head (heads in rank order, most retrieval-like first) for a total budget, and how
    many heads stay retrieval heads: the best heads keep all they hold while every later head can
    still keep its `window` (sinks + recent); the other heads share what is left evenly."""
    rest = sum(min(window, n) for n in held)
    used, retrieval = 0, 0
    for n in held:
        rest -= min(window, n)
        if used + n + rest > total:
            break
        used, retrieval = used + n, retrieval + 1
    return held[:retrieval] + water_fill(held[retrieval:], total - used), retrieval


def streaming_mask(positions: torch.Tensor, real: torch.Tensor, count: int, n_sink: int) -> torch.Tensor:
    """Bool [slots]: a head's first `min(n_sink, count)` tokens by position and its newest ones,
    `count` in all."""
    order = positions.masked_fill(~real, torch.iinfo(positions.dtype).max).argsort()
    n_real, sinks = int(real.sum()), min(n_sink, count)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return real & ((rank < sinks) | ((rank >= n_real - (count - sinks)) & (rank < n_real)))


@dataclasses.dataclass
class DuoAttention(CacheCompressMethod):
    """Retrieval heads keep every token; streaming heads keep only the attention sinks and recent tokens.

    Xiao et al., 2024 ("DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
    Streaming Heads") found that only a fraction of heads need the whole context to retrieve from
    it; the others attend to the first tokens and a recent window, so their cache can be cut to
    that. Which heads are which is decided offline, once per model.

    kvlife's split comes from `kvlife search-heads` (shipped for qwen2.5-coder-0.5b and
    smollm2-135m in kvlife/configs/duo_heads/). DuoAttention learns a gate per KV head mixing its
    full and its streaming attention by gradient descent on synthetic passkey retrieval; the search
    takes the first step of that: on multi-passkey haystacks, the gradient of the answer's NLL with
    respect to each head's gate at the all-dense start (the first-order change of the answer when
    that head alone streams), averaged in absolute value over the questions. The cache is cut after
    the prefill (the whole-cache stage), so the context's own prefill is dense, as in kvlife's other
    methods.

    Parameters:
        config (None): the head split: a shipped split's name (the model's, e.g.
            `qwen2.5-coder-0.5b`) or a JSON file from `kvlife search-heads`; without one, the shipped
            split made for the running model (matched by its weights' signature), else an error.
        ratio / budget (None): tokens kept per KV head on average over the full-attention layers,
            as a fraction of the tokens seen or in tokens. The heads with the highest scores stay
            retrieval heads while every other head can still keep `n_sink + n_local` tokens; the
            streaming heads share the rest (sinks first, then the newest tokens).
        sparsity (0.5): without a budget, the share of heads (lowest scores) made streaming, each
            keeping `n_sink + n_local` tokens (DuoAttention's 50% for GQA models).
        n_sink (None), n_local (None): a streaming head's sink and recent window; None: the split's
            own (64 and 256, DuoAttention's sizes, in the shipped splits).
    """

    name: ClassVar[str] = "duo_attention"
    paper: ClassVar[str] = (
        "Xiao et al., 2024, DuoAttention: Efficient Long-Context LLM Inference with Retrieval and "
        "Streaming Heads"
    )
    config: str | None = None
    sparsity: float = 0.5
    n_sink: int | None = None
    n_local: int | None = None

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.sparsity <= 1:
            raise SpecError(f"duo_attention: sparsity must be in [0, 1], got {self.sparsity}")
        if (self.n_sink is not None and self.n_sink < 0) or (self.n_local is not None and self.n_local < 1):
            raise SpecError(f"duo_attention: n_sink must be >= 0 and n_local >= 1, "
                            f"got {self.n_sink}, {self.n_local}")
        if self.config is not None:
            head_split.load(str(self.config))  # an unknown or broken split fails at parse time

    def split(self, model: Any) -> head_split.HeadSplit:
        return head_split.load(str(self.config)) if self.config is not None else head_split.for_model(model)

    def store_identity(self, model: Any) -> str:
        """What the stored cache depends on beyond the spec: the head split's content (a file may change)."""
        split = self.split(model)
        body = json.dumps([split.signature, split.n_sink, split.n_local, split.scores])
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def compress_cache(self, stage: CacheStage) -> None:
        split = self.split(stage.model)
        cache = stage.cache
        kv_heads = cache.kv_layers()[0][1].positions.shape[0]
        split.check(len(cache.layers), kv_heads)
        n_sink = split.n_sink if self.n_sink is None else self.n_sink
        window = n_sink + (split.n_local if self.n_local is None else self.n_local)
        full = [i for i, layer in cache.kv_layers() if not layer.is_sliding and split.scores[i] is not None]
        heads = sorted(((i, h) for i in full for h in range(kv_heads)),
                       key=lambda ih: -split.scores[ih[0]][ih[1]])
        held = [int(real_slots(cache.layers[i])[h].sum()) for i, h in heads]
        if self.ratio is None and self.budget is None:
            retrieval = len(heads) - round(self.sparsity * len(heads))
            counts = held[:retrieval] + [min(window, n) for n in held[retrieval:]]
        else:
            targets = [self.target_tokens(cache.layers[i], None) for i in full]
            if all(target is None for target in targets):
                return
            total = sum((target if target is not None else cache.layers[i].get_seq_length()) * kv_heads
                        for i, target in zip(full, targets))
            counts, retrieval = budget_counts(held, total, window)
        count_of = dict(zip(heads, counts))
        for i in full:
            layer = cache.layers[i]
            real = real_slots(layer)
            mask = torch.stack([streaming_mask(layer.positions[h], real[h], count_of[i, h], n_sink)
                                for h in range(kv_heads)])
            apply_keep(cache, i, mask)
        stage.stats["compress"] = {"method": self.spec(), "retrieval_heads": retrieval, "heads": len(heads)}
