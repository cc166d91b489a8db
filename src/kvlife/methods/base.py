"""The method interface: one small hook per stage, shared machinery once.

Stages (SCBench's taxonomy, plus `assemble`): `prompt` (drop context tokens before prefill),
`assemble` (build the context's cache from per-document caches instead of prefilling it: methods/
assemble/), `prefill` (attention
during the first prefill), `compress` (shrink each layer's cache after its attention in the first
prefill, or, for methods that need the model itself, the whole cache once that prefill has ended:
`CacheCompressMethod`), `load` (choose what each decode step attends to). A method is a dataclass
whose fields are its parameters; `describe()` lists them with defaults for `kvlife methods`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from kvlife.attention import AttnCall, StepContext, dense_attention, use_kvlife_attention
from kvlife.cache import KVLayer, cache_kwarg
from kvlife.errors import SpecError

STAGES = ("prompt", "assemble", "prefill", "compress", "load")


@dataclasses.dataclass
class Method:
    """Base of every method. Subclasses set `name`, `stage` and `paper`."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SpecError on parameter values that make no sense."""

    def spec(self) -> str:
        """The canonical spec string of this method with its non-default parameters."""
        parts = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value != item.default:
                parts.append(f"{item.name}={value}")
        return f"{self.name}({','.join(parts)})" if parts else self.name

    def params(self) -> dict[str, Any]:
        """Every parameter with its value, defaults included (the spec names only non-default ones, so a
        changed default leaves the spec as it was: what identifies a computation uses these)."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        params = {item.name: item.default for item in dataclasses.fields(cls)}
        doc = (cls.__doc__ or "").strip().splitlines()
        return {"name": cls.name, "stage": cls.stage, "paper": cls.paper, "params": params,
                "summary": doc[0] if doc else ""}


class PrefillMethod(Method):
    """Computes attention during the first prefill of a context."""

    stage: ClassVar[str] = "prefill"

    def attend(self, call: AttnCall) -> torch.Tensor:  # [1, q_heads, q_len, head_dim]
        raise NotImplementedError


class LoadMethod(Method):
    """Computes attention for decode steps over a chosen subset of the cache."""

    stage: ClassVar[str] = "load"

    def attend(self, call: AttnCall) -> torch.Tensor:
        raise NotImplementedError


class PromptMethod(Method):
    """Drops context tokens before prefill."""

    stage: ClassVar[str] = "prompt"

    def compress_ids(
        self, context_ids: list[int], query_ids: list[int] | None, model: Any, tokenizer: Any
    ) -> list[int]:
        raise NotImplementedError


@dataclasses.dataclass
class CompressMethod(Method):
    """Shrinks a layer's cache after its attention in the first prefill.

    Budgets: `ratio` of the tokens seen so far (`ratio=0.25`) or `budget` tokens; at most one.
    Sliding-window layers are left alone (their window is already a budget).
    """

    stage: ClassVar[str] = "compress"
    ratio: float | None = None
    budget: int | None = None

    def validate(self) -> None:
        if self.ratio is not None and self.budget is not None:
            raise SpecError(f"{self.name}: give ratio= or budget=, not both")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise SpecError(f"{self.name}: ratio must be in (0, 1], got {self.ratio}")
        if self.budget is not None and self.budget < 1:
            raise SpecError(f"{self.name}: budget must be a positive number of tokens, got {self.budget}")

    def target_tokens(self, layer: KVLayer, call: AttnCall) -> int | None:
        """How many tokens this layer keeps, or None to keep all."""
        seen = layer.next_position
        if self.budget is not None:
            target = self.budget
        elif self.ratio is not None:
            target = max(1, round(self.ratio * seen))
        else:
            target = self.default_target(seen)
        return None if target is None or target >= layer.get_seq_length() else target

    def default_target(self, seen: int) -> int | None:
        return None

    def compress_layer(self, call: AttnCall, layer: KVLayer) -> None:
        raise NotImplementedError

    def compress_cache(self, stage: CacheStage) -> None:
        """Shrink the whole cache once a compressing forward has run through every layer.

        Called by the Session after that forward (after every `compress_layer`). Per-layer methods
        leave it empty; methods that need the model itself (extra forward passes over the cache,
        the model's identity) subclass `CacheCompressMethod` and work here.
        """


@dataclasses.dataclass
class CacheStage:
    """What `CompressMethod.compress_cache` sees: the model, its cache and the tokens just prefilled."""

    model: Any
    cache: Any  # kvlife.cache.KVCache, holding `ids` at the positions they were fed at
    ids: list[int]  # the tokens of that forward: the context (multi-turn: context + query 1)
    encode: Callable[[str], list[int]]  # text -> token ids, no special tokens added
    turn_end: list[int]  # what closes a user turn and opens the answer in the prompt format
    head_tokens: int = 0  # leading `ids` that are the prompt format's head (chat template, system prompt)
    # the forward's figures; record costs here
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def forward(self, ids: list[int], recipe: Any) -> None:
        """Run `ids` through the model on this cache at the next positions, as a "prefill" step of
        `recipe` (an object with `prefill`, `compress`, `load`: e.g. a scorer as its prefill method).
        The tokens stay in the cache: take a checkpoint before and roll back after."""
        model_forward(self.model, self.cache, ids, recipe)


@torch.no_grad()
def model_forward(model: Any, cache: Any, ids: list[int], recipe: Any, phase: str = "prefill",
                  all_logits: bool = False) -> torch.Tensor:
    """One forward of `model` over `ids` on `cache` at the true next positions; logits [n or 1, vocab]."""
    use_kvlife_attention(model)
    device = next(model.parameters()).device
    start = cache.next_position
    positions = torch.arange(start, start + len(ids), device=device)
    step = StepContext(cache, positions, phase=phase, recipe=recipe)
    out = model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=positions[None],
        **cache_kwarg(model, cache),
        use_cache=True,
        logits_to_keep=0 if all_logits else 1,
        kvlife=step,
    )
    return out.logits[0].float()


@dataclasses.dataclass
class CacheCompressMethod(CompressMethod):
    """A compress method that acts once after the whole prefill (`compress_cache`), not per layer."""

    def compress_layer(self, call: AttnCall, layer: KVLayer) -> None:
        return  # the per-layer hook runs during the forward; these methods wait for it to end

    def compress_cache(self, stage: CacheStage) -> None:
        raise NotImplementedError


@dataclasses.dataclass
class ScoreCompressMethod(CompressMethod):
    """A compress method that scores every cached token per KV head and keeps the top ones.

    Subclasses implement `score`; GQA reduction of query-head scores, the budget and the gather of
    kept tokens (with their positions) live here.
    """

    def score(self, call: AttnCall, layer: KVLayer) -> torch.Tensor:  # [kv_heads, tokens]
        raise NotImplementedError

    def layer_target(self, call: AttnCall, layer: KVLayer) -> int | None:
        return self.target_tokens(layer, call)

    def compress_layer(self, call: AttnCall, layer: KVLayer) -> None:
        if layer.is_sliding:
            return
        target = self.layer_target(call, layer)
        if target is None:
            return
        scores = self.score(call, layer)
        keep = scores.topk(target, dim=-1).indices.sort(dim=-1).values
        layer.keep(keep)


def reduce_groups(scores: torch.Tensor, kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Query-head scores [q_heads, ...] -> KV-head scores [kv_heads, ...]."""
    grouped = scores.reshape(kv_heads, scores.shape[0] // kv_heads, *scores.shape[1:])
    return grouped.amax(1) if how == "max" else grouped.mean(1)


@dataclasses.dataclass
class Dense(PrefillMethod):
    """Exact attention over the whole cache (the baseline every method is tested against)."""

    name: ClassVar[str] = "dense"
    paper: ClassVar[str] = "Vaswani et al., 2017, Attention Is All You Need"

    def attend(self, call: AttnCall) -> torch.Tensor:
        return dense_attention(call)
