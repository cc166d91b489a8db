"""kvlife's attention function, registered with transformers' `AttentionInterface` as "kvlife".

A model switched to it (`use_kvlife_attention(model)`, which a Session does; or loaded with
`attn_implementation="kvlife"`) calls `kvlife_attention` in every layer. The
active step (recipe, cache, phase, query positions) arrives through the forward call's kwargs as
`kvlife=StepContext(...)` (transformers passes extra kwargs down to the attention interface), so
there is no hidden global state. transformers builds no mask for this implementation: causality
and sliding windows are derived here from the true token positions the cache stores, which is
what lets evicted caches keep their original positions.

Phases: "prefill" is the first prefill of a context (the recipe's prefill method runs and, when
asked, its compress method afterwards); "extend" is a later prefill on top of the cache (dense);
"decode" covers generated tokens and teacher-forced scoring (the recipe's load method runs).
A load method may also define `observe(call)`: it is then shown every prefill and extend call
(after its attention, before compression), e.g. to index the context with the prefill's queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kvlife.errors import ModelError

KVLIFE_ATTENTION = "kvlife"
QUERY_CHUNK = 1024  # query rows per masked attention call: bounds the mask and score memory

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass
class StepContext:
    """What one forward call of the model needs to know about the recipe and the cache."""

    cache: Any  # kvlife.cache.KVCache
    query_positions: torch.Tensor  # [q_len] true positions of the query tokens
    phase: str = "prefill"  # "prefill" | "extend" | "decode"
    recipe: Any = None  # kvlife.recipe.Recipe or None (dense)
    compress: bool = False  # run the recipe's compress method after each layer's attention
    stats: dict[str, Any] = field(default_factory=dict)  # methods may record per-call figures here


@dataclass
class AttnCall:
    """The inputs of one layer's attention, as methods see them."""

    layer_idx: int
    query: torch.Tensor  # [1, q_heads, q_len, head_dim]
    key: torch.Tensor  # [1, kv_heads, k_len, head_dim]
    value: torch.Tensor  # [1, kv_heads, k_len, head_dim]
    q_pos: torch.Tensor  # [q_len]
    k_pos: torch.Tensor  # [kv_heads, k_len]
    scaling: float
    sliding_window: int | None = None
    softcap: float | None = None
    n_layers: int = 1
    step: StepContext | None = None
    config: Any = None  # the model's config (for methods that need model facts, e.g. its RoPE)

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None


def expand_kv(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv_heads, n, d] -> [b, kv_heads * groups, n, d] (query-head order)."""
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def visibility_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Bool [kv_heads, q_len, k_len]: key visible to query (causal by position, and inside the window)."""
    mask = k_pos[:, None, :] <= q_pos[None, :, None]
    if sliding_window is not None:
        mask &= k_pos[:, None, :] > (q_pos[None, :, None] - sliding_window)
    return mask


def reference_attention(call: AttnCall, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain masked softmax attention (the reference every fast path is tested against).

    `mask` is an optional extra bool mask [kv_heads or q_heads, q_len, k_len] combined with the
    positional visibility. Returns [1, q_heads, q_len, head_dim].
    """
    groups = call.groups
    visible = visibility_mask(call.q_pos, call.k_pos, call.sliding_window)
    if mask is not None:
        if mask.shape[0] == call.key.shape[1] and groups > 1:
            mask = mask.repeat_interleave(groups, dim=0)
        visible = expand_heads(visible, groups) & mask
    else:
        visible = expand_heads(visible, groups)
    key, value = expand_kv(call.key, groups), expand_kv(call.value, groups)
    scores = torch.matmul(call.query, key.transpose(-1, -2)).float() * call.scaling
    if call.softcap is not None:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(value.dtype)
    return torch.matmul(probs, value)


def expand_heads(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """[kv_heads, ...] -> [q_heads, ...]; a single shared head row is left to broadcast."""
    if groups == 1 or mask.shape[0] == 1:
        return mask
    return mask.repeat_interleave(groups, dim=0)


def _sdpa(query, key, value, mask=None, is_causal=False, scaling=1.0, groups=1):
    if _HAS_GQA and groups > 1:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=True
        )
    return F.scaled_dot_product_attention(
        query,
        expand_kv(key, groups),
        expand_kv(value, groups),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scaling,
    )


def _uniform_sorted(k_pos: torch.Tensor) -> bool:
    """True when every head holds the same positions in increasing order (no head-wise eviction)."""
    if k_pos.shape[-1] <= 1:
        return True
    same = k_pos.shape[0] == 1 or bool((k_pos == k_pos[:1]).all())
    return same and bool((k_pos[0, 1:] > k_pos[0, :-1]).all())


def dense_attention(call: AttnCall) -> torch.Tensor:
    """Exact attention over every visible cached key; fast paths for the common layouts."""
    if call.softcap is not None:
        return _chunked(call, reference_attention)
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    k_pos = call.k_pos
    if _uniform_sorted(k_pos):
        row = k_pos[0]
        contiguous = k_len == 0 or int(row[-1] - row[0]) == k_len - 1
        window_ok = call.sliding_window is None or int(call.q_pos.max() - row[0]) < call.sliding_window
        if q_len == 1 and window_ok and bool((row <= call.q_pos[0]).all()):
            return _decode_attention(call)
        if (
            contiguous
            and window_ok
            and q_len == k_len
            and bool((call.q_pos == row).all())
        ):
            return _sdpa(
                call.query, call.key, call.value, is_causal=True, scaling=call.scaling, groups=call.groups
            )
        return _chunked(call, _masked_sdpa_sorted)
    return _chunked(call, _masked_sdpa)


def _decode_attention(call: AttnCall) -> torch.Tensor:
    """One query row over every cached key: two grouped matmuls and a softmax in float32.

    The query heads of one KV head form the rows of one matmul, so GQA is never expanded. On CPU
    this is several times faster than `scaled_dot_product_attention`'s flash kernel for a single
    row (which was a fifth of a decode step at 2K tokens)."""
    batch, q_heads, _, dim = call.query.shape
    kv_heads = call.key.shape[1]
    query = call.query.reshape(batch, kv_heads, q_heads // kv_heads, dim)
    scores = torch.matmul(query, call.key.transpose(-1, -2)).float() * call.scaling
    probs = torch.softmax(scores, dim=-1).to(call.value.dtype)
    return torch.matmul(probs, call.value).reshape(batch, q_heads, 1, dim)


def _masked_sdpa(call: AttnCall) -> torch.Tensor:
    visible = expand_heads(visibility_mask(call.q_pos, call.k_pos, call.sliding_window), call.groups)
    return _sdpa_rows(call, visible, call.key, call.value)


def _masked_sdpa_sorted(call: AttnCall) -> torch.Tensor:
    """Keys sorted and shared by all heads: slice the key range a query chunk can see, then mask."""
    row = call.k_pos[0]
    hi = int(torch.searchsorted(row, call.q_pos.max(), right=True))
    lo = 0
    if call.sliding_window is not None:
        lo = int(torch.searchsorted(row, call.q_pos.min() - call.sliding_window, right=True))
    key, value, k_pos = call.key[:, :, lo:hi], call.value[:, :, lo:hi], call.k_pos[:1, lo:hi]
    visible = visibility_mask(call.q_pos, k_pos, call.sliding_window)
    return _sdpa_rows(call, visible, key, value)


def _sdpa_rows(call: AttnCall, visible: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # Rows that see no key (only possible with masks from sparse methods) give zeros, not NaN.
    empty = ~visible.any(-1, keepdim=True)
    if bool(empty.any()):
        visible = visible | empty
    out = _sdpa(call.query, key, value, mask=visible[None], scaling=call.scaling, groups=call.groups)
    if bool(empty.any()):
        out = out.masked_fill(expand_heads(empty, call.query.shape[1] // empty.shape[0])[None], 0.0)
    return out


def _chunked(call: AttnCall, fn) -> torch.Tensor:
    q_len = call.query.shape[2]
    if q_len <= QUERY_CHUNK:
        return fn(call)
    outs = []
    for start in range(0, q_len, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, q_len)
        part = AttnCall(
            **{**call.__dict__, "query": call.query[:, :, start:stop], "q_pos": call.q_pos[start:stop]}
        )
        outs.append(fn(part))
    return torch.cat(outs, dim=2)


def kvlife_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kvlife: StepContext | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function transformers calls in place of sdpa; returns ([b, q_len, q_heads, d], None)."""
    if scaling is None:
        scaling = module.head_dim**-0.5
    layer_idx = getattr(module, "layer_idx", 0)
    if kvlife is None:
        # Used outside a Session (e.g. plain model(...) calls): causal attention by position.
        q_len, k_len = query.shape[2], key.shape[2]
        q_pos = torch.arange(k_len - q_len, k_len, device=query.device)
        k_pos = torch.arange(k_len, device=query.device)[None]
        call = AttnCall(layer_idx, query, key, value, q_pos, k_pos, scaling, sliding_window, softcap)
        return dense_attention(call).transpose(1, 2).contiguous(), None
    # The cache layer this call's K/V went to: shared attention blocks (Zamba2) serve several layers.
    layer_idx = getattr(kvlife.cache, "updated_layer", None)
    layer_idx = getattr(module, "layer_idx", 0) if layer_idx is None else layer_idx
    layer = kvlife.cache.layers[layer_idx]
    call = AttnCall(
        layer_idx=layer_idx,
        query=query,
        key=key,
        value=value,
        q_pos=kvlife.query_positions.to(query.device),
        k_pos=layer.attn_positions,
        scaling=scaling,
        sliding_window=sliding_window,
        softcap=softcap,
        n_layers=len(kvlife.cache.layers),
        step=kvlife,
        config=getattr(module, "config", None),
    )
    recipe = kvlife.recipe
    method = None
    if recipe is not None:
        if kvlife.phase == "prefill":
            method = recipe.prefill
        elif kvlife.phase == "decode":
            method = recipe.load
    output = method.attend(call) if method is not None else dense_attention(call)
    if recipe is not None and kvlife.phase != "decode" and hasattr(recipe.load, "observe"):
        recipe.load.observe(call)  # load methods that index the prefill (retrieval_attention)
    if kvlife.compress and recipe is not None and recipe.compress is not None:
        recipe.compress.compress_layer(call, layer)
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register kvlife's attention with transformers (idempotent)."""
    # transformers' modeling code takes seconds to import: loaded when a model is, not with this module
    from transformers import AttentionInterface

    AttentionInterface.register(KVLIFE_ATTENTION, kvlife_attention)


def use_kvlife_attention(model: Any) -> Any:
    """Switch `model` (loaded with any of transformers' attentions, as `models.load` gives it) to
    kvlife's, in place; returns it. Idempotent: a Session calls it on the model it is given, and so
    does any code that runs the model with `kvlife=StepContext(...)` outside a Session."""
    if model.config._attn_implementation != KVLIFE_ATTENTION:
        register()
        model.set_attn_implementation(KVLIFE_ATTENTION)
        if model.config._attn_implementation != KVLIFE_ATTENTION:  # transformers only warns
            raise ModelError(f"{type(model).__name__} does not take a custom attention function "
                             "(its attention does not use transformers' AttentionInterface)")
    return model
