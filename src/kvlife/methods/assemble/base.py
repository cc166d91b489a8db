"""Context assembly: a context's cache built from per-document caches, then partly recomputed.

An `AssembleMethod` receives the assembled K/V of a context (kvlife.store.documents: each document's
cache computed alone, its keys re-rotated to the document's place) and decides which tokens to
recompute so that documents see the documents before them. The recompute itself is written once
here (`selective_recompute`): the chosen tokens run through the model's own decoder layers at
their true positions, attending to the whole assembled cache; at every layer their fresh K/V
replace the stored ones, the other tokens' K/V stay as stored. A method names the tokens:

- `rows(spans)`: the tokens recomputed from the first layer on (EPIC: the first k of each document;
  CacheBlend: all document tokens, until its check layer);
- `check_layer` and `choose(deviation, rows)`: at that layer, the fresh keys of `rows` are computed
  (norm, key projection and RoPE only) and compared with the stored ones; only the rows `choose`
  picks run that layer's attention and MLP and the layers after it (CacheBlend). As in LMCache's
  blender, the rows not picked never run the check layer's attention or MLP, so its cost is that of
  the picked rows plus one key projection of all rows.

The first span (the prompt format's head and the instruction, at positions 0..p-1) is exact as
stored and never recomputed. Models must be decoder stacks with `embed_tokens`, `layers` and
`rotary_emb` (Llama, Qwen2, Mistral and their kin) and plain RoPE.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Any, ClassVar

import torch

from kvlife.attention import StepContext
from kvlife.cache import KVCache, KVLayer
from kvlife.errors import KvlifeError, SpecError
from kvlife.methods.base import Method

Layers = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Span = tuple[int, int]


@dataclasses.dataclass
class AssembleMethod(Method):
    """Base of the context-assembly methods (stage "assemble"): which assembled tokens to recompute."""

    stage: ClassVar[str] = "assemble"
    check_layer: ClassVar[int | None] = None  # the layer where `choose` narrows the recomputed rows
    # what each document is computed after (then cut off): "none" (alone), "head" (the context's first
    # piece: prompt head and instruction, APE's shared prefix) or a text file (the first piece, then the
    # file's text: an anchor document of the corpus)
    lead_in: str = "none"

    def validate(self) -> None:
        if self.lead_in not in ("none", "head") and not Path(self.lead_in).is_file():
            raise SpecError(f"{self.name}: lead_in must be none, head or a text file; "
                            f"{self.lead_in!r} not found")

    def lead_in_ids(self, head: list[int], encode) -> list[int]:
        """The tokens each document of a context whose first piece is `head` is computed after."""
        if self.lead_in == "none":
            return []
        if self.lead_in == "head":
            return list(head)
        try:
            text = Path(self.lead_in).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"{self.name}: lead_in {self.lead_in!r} cannot be read ({exc})") from None
        return list(head) + encode(text)

    def rows(self, spans: list[Span]) -> torch.Tensor:
        """Token indices recomputed from the first layer on (sorted); `spans` are the documents'
        (start, stop)."""
        raise NotImplementedError

    def choose(self, deviation: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """At `check_layer`: indices into `rows` (sorted) to keep recomputing, given each row's K
        deviation."""
        return torch.arange(rows.numel())

    def check(self, model: Any) -> None:
        """One clear error when the check layer is past the model's layers (the Session calls it before
        any document is computed; `blend` again for direct callers)."""
        if self.check_layer is None:
            return
        depth = len(decoder(model).layers)
        if self.check_layer >= depth:
            raise SpecError(f"{self.name}: check layer {self.check_layer} is past the model's {depth} layers")

    def blend(self, model: Any, layers: Layers, ids: list[int],
              spans: list[Span]) -> tuple[Layers, dict[str, Any]]:
        """The assembled `layers` (positions 0..len(ids)-1) with this method's tokens recomputed in place."""
        self.check(model)
        rows = self.rows(spans)
        recomputed = selective_recompute(model, layers, ids, rows, self.check_layer, self.choose)
        return layers, {"recomputed_rows_first_layer": int(rows.numel()),
                        "recomputed_rows_last_layer": recomputed}


class SpliceLayer(KVLayer):
    """A layer holding a whole assembled cache into which `update` writes the fresh K/V of `rows`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.positions = keys, values, positions
        self.attn_positions = positions
        self.next_position = int(positions.shape[-1])
        self.rows: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys[:, :, self.rows] = key_states.to(self.keys.dtype)
        self.values[:, :, self.rows] = value_states.to(self.values.dtype)
        return self.keys, self.values


def fresh_keys(layer: Any, hidden: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The keys [1, kv_heads, n, head_dim] a Llama-like decoder `layer` computes for `hidden` (input norm, key
    projection, key norm where the model has one, RoPE), without running its attention or MLP."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(attn, "k_proj") or not hasattr(layer, "input_layernorm"):
        raise KvlifeError("cacheblend's check layer needs a decoder layer with input_layernorm and "
                          f"self_attn.k_proj; {type(layer).__name__} has another layout")
    keys = attn.k_proj(layer.input_layernorm(hidden)).view(*hidden.shape[:-1], -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:  # Qwen3-style per-head key norm, before RoPE
        keys = attn.k_norm(keys)
    keys = keys.transpose(1, 2)
    cos, sin = (part.unsqueeze(1) for part in position_embeddings)
    half = keys.shape[-1] // 2
    return keys * cos + torch.cat((-keys[..., half:], keys[..., :half]), dim=-1) * sin


def decoder(model: Any) -> Any:
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "rotary_emb")):
        raise KvlifeError(f"context assembly needs a decoder stack with embed_tokens, layers and rotary_emb; "
                          f"{type(model).__name__} has another layout")
    return inner


@functools.cache
def _cache_keyword(layer_class: type) -> str:
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


@torch.no_grad()
def selective_recompute(model: Any, layers: Layers, ids: list[int], rows: torch.Tensor,
                        check_layer: int | None = None, chooser=None) -> int:
    """Run the tokens `rows` of `ids` through every decoder layer over the assembled cache `layers`
    (changed in place: the fresh K/V of the rows replace the stored ones); at `check_layer`, `chooser`
    narrows the rows. Returns how many rows the last layer recomputed."""
    if rows.numel() == 0:
        return 0
    inner = decoder(model)
    device = next(model.parameters()).device
    splices = [SpliceLayer(keys, values, positions) for keys, values, positions in layers]
    cache = KVCache([None] * len(splices))
    cache.layers = splices
    rows = rows.to(device)
    ids_tensor = torch.tensor(ids, device=device)
    hidden = inner.embed_tokens(ids_tensor[rows][None])
    keyword = _cache_keyword(type(inner.layers[0]))
    for index, layer in enumerate(inner.layers):
        splice = splices[index]
        position_ids = rows[None]
        embeddings = inner.rotary_emb(hidden, position_ids)
        if index == check_layer and chooser is not None:
            # squared L2 of fresh against stored keys over heads and dims (LMCache's `topk` blend mode)
            stored = splice.keys[:, :, rows].to(torch.float32)
            fresh = fresh_keys(layer, hidden, embeddings).to(torch.float32)
            deviation = (fresh - stored).pow(2).sum(dim=(0, 1, 3))
            kept = chooser(deviation, rows).to(rows.device)
            hidden, rows = hidden[:, kept], rows[kept]
            if rows.numel() == 0:
                break
            position_ids, embeddings = rows[None], tuple(part[:, kept] for part in embeddings)
        splice.rows = rows
        step = StepContext(cache, rows, phase="extend")
        hidden = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=embeddings,
                       use_cache=True, kvlife=step, **{keyword: cache})
        if isinstance(hidden, tuple):  # older transformers return (hidden, ...) from a decoder layer
            hidden = hidden[0]
    return int(rows.numel())


def document_rows(spans: list[Span], first: int | None = None) -> torch.Tensor:
    """Every token of the documents, or the first `first` tokens of each."""
    parts = [torch.arange(start, stop if first is None else min(stop, start + first))
             for start, stop in spans]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
