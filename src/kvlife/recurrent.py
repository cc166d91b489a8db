"""Recurrent state in kvlife's cache: the conv and SSM state of Mamba-style and linear-attention layers.

State-space and hybrid models (Mamba2, Jamba, Zamba2, Bamba, LFM2, Qwen3-Next, ...) mix attention
layers, which grow a K/V cache with every token, with recurrent layers, which hold a fixed-size
state: a short convolution window (`conv_states`) and, for SSM and gated-delta layers, the
recurrent state (`recurrent_states`). transformers (>= 5.2x) reads and writes that state through
`Cache.get_conv_state` / `update_conv_state` / `get_recurrent_state` / `update_recurrent_state` on
layers that subclass its `LinearAttentionLayer`, so kvlife's `KVCache` holds one `StateLayer` (or,
for Zamba-style layers that carry both, one `kvlife.kv_layer.HybridLayer`) at each recurrent layer
and transformers' own model code runs unchanged.

The state is updated in place (transformers copies into its tensors, and the single-token conv
step writes the window in place), so unlike K/V a checkpoint must copy it: `checkpoint()` clones
the state, `rollback()` puts clones back (a checkpoint can be rolled back to any number of times).
The state is small and fixed-size (it does not grow with the context), so the copy is cheap.

Layer types (transformers' `layer_types` names): full_attention and sliding_attention become
`KVLayer`s, linear_attention and conv become `StateLayer`s, hybrid and hybrid_sliding become
`HybridLayer`s (`layer_plan` says which; `kvlife.cache` builds them, this module imports no cache).
Any other type (chunked or indexed attention, cache-less MoE/MLP layers) fails with one line naming
it (`ModelError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import LinearAttentionLayer

from kvlife.errors import ModelError, SpecError

ATTENTION_TYPES = ("full_attention", "sliding_attention")
STATE_TYPES = ("linear_attention", "conv")
HYBRID_TYPES = ("hybrid", "hybrid_sliding")
SUPPORTED_TYPES = ATTENTION_TYPES + STATE_TYPES + HYBRID_TYPES

# transformers' Mamba-1 selective scan (mamba, falcon_mamba, jamba) ignores the stored state when more
# than one token is fed on a non-empty cache (its own TODO says so in modeling_jamba.py); the per-token
# recurrent step does use it. kvlife feeds such extends through that step (see
# `StateLayer.sequential_extend`).
SCAN_IGNORES_STATE = ("mamba", "falcon_mamba", "jamba")
SEQUENTIAL = 1 << 40  # "keep this many intermediate states": more than any extend, so every token steps


@dataclass
class StateCheckpoint:
    """Clones of a recurrent layer's state (see module docstring: the state changes in place)."""

    conv: dict[int, torch.Tensor | None]
    recurrent: dict[int, torch.Tensor | None]
    has_previous: dict[int, bool]
    kernel: dict[int, int | None]
    tokens_seen: int


def _clone(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


class StateLayer(LinearAttentionLayer):
    """One recurrent layer's cache: conv and recurrent state, a token count, exact checkpoints."""

    is_sliding = False
    sliding_window = None

    def __init__(self, number_of_states: int = 1, sequential_extend: bool = False) -> None:
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)
        # Feed multi-token extends one token at a time through the recurrent step (SCAN_IGNORES_STATE).
        self.sequential_extend = sequential_extend

    @property
    def tokens_seen(self) -> int:
        """Tokens this layer's state has absorbed (transformers counts them as it updates the state)."""
        return int(self.cumulative_length_linear)

    def states_to_keep(self) -> int:
        """What `Cache.get_recurrent_states_to_keep` answers for this layer: SEQUENTIAL for an extend on a
        model whose chunked scan ignores the stored state, else 0 (transformers' default)."""
        return SEQUENTIAL if self.sequential_extend and self.has_previous_state[0] else 0

    def state_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of every state tensor held, e.g. ("conv.0", ...), ("recurrent.0", ...)."""
        out = []
        for index in range(self.number_of_states):
            if self.is_conv_states_initialized[index] and self.conv_states[index] is not None:
                out.append((f"conv.{index}", self.conv_states[index]))
            if self.is_recurrent_states_initialized[index] and self.recurrent_states[index] is not None:
                out.append((f"recurrent.{index}", self.recurrent_states[index]))
        return out

    def state_nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for _, tensor in self.state_tensors())

    def nbytes(self) -> int:
        return self.state_nbytes()

    def state_checkpoint(self) -> StateCheckpoint:
        inited_conv, inited_rec = self.is_conv_states_initialized, self.is_recurrent_states_initialized
        return StateCheckpoint(
            conv={i: _clone(self.conv_states[i]) if inited_conv[i] else None
                  for i in range(self.number_of_states)},
            recurrent={i: _clone(self.recurrent_states[i]) if inited_rec[i] else None
                       for i in range(self.number_of_states)},
            has_previous=dict(self.has_previous_state),
            kernel=dict(self.conv_kernel_size),
            tokens_seen=self.tokens_seen,
        )

    def state_rollback(self, state: StateCheckpoint) -> None:
        for index in range(self.number_of_states):
            self.conv_states[index] = _clone(state.conv[index])
            self.recurrent_states[index] = _clone(state.recurrent[index])
            self.is_conv_states_initialized[index] = state.conv[index] is not None
            self.is_recurrent_states_initialized[index] = state.recurrent[index] is not None
        self.has_previous_state = dict(state.has_previous)
        self.conv_kernel_size = dict(state.kernel)
        self.cumulative_length_linear = torch.tensor(state.tokens_seen, dtype=torch.long,
                                                     device=self.cumulative_length_linear.device)

    def checkpoint(self) -> StateCheckpoint:
        return self.state_checkpoint()

    def rollback(self, state: StateCheckpoint) -> None:
        self.state_rollback(state)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("kvlife caches are cut back with checkpoint()/rollback()")


def text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_types(config: Any) -> list[str]:
    """transformers' cache layer type of every decoder layer ("full_attention", "linear_attention", ...)."""
    config = text_config(config)
    n_layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)  # no list: every layer is full attention (as before)
    return list(types or ["full_attention"] * n_layers)[:n_layers]


@dataclass
class LayerPlan:
    """What cache layer one decoder layer needs."""

    kind: str  # "attention" | "state" | "hybrid"
    sliding_window: int | None = None
    number_of_states: int = 1
    sequential_extend: bool = False


def layer_plan(config: Any) -> list[LayerPlan]:
    """The cache layer every decoder layer of `config` needs (kvlife.cache.KVCache.for_model builds them).

    Raises ModelError naming the first layer type kvlife does not support."""
    config = text_config(config)
    types = layer_types(config)
    unsupported = [kind for kind in types if kind not in SUPPORTED_TYPES]
    if unsupported:
        raise ModelError(f"{getattr(config, 'model_type', 'this model')} has layer type {unsupported[0]!r} "
                         f"(layer {types.index(unsupported[0])}), which kvlife's cache does not support; "
                         f"supported: {', '.join(SUPPORTED_TYPES)}")
    window = getattr(config, "sliding_window", None)
    states = getattr(config, "number_of_conv_states", 1) or 1
    sequential = getattr(config, "model_type", "") in SCAN_IGNORES_STATE
    plan = []
    for kind in types:
        sliding = window if kind in ("sliding_attention", "hybrid_sliding") and window else None
        if kind in ATTENTION_TYPES:
            plan.append(LayerPlan("attention", sliding))
        else:
            plan.append(LayerPlan("state" if kind in STATE_TYPES else "hybrid", sliding, states, sequential))
    return plan


def has_state(layer: Any) -> bool:
    return isinstance(layer, StateLayer)


def kind_of(config: Any) -> str:
    """"transformer" (attention only), "hybrid" (attention and recurrent layers) or "ssm" (no attention)."""
    types = set(layer_types(config))
    attention = bool(types & set(ATTENTION_TYPES + HYBRID_TYPES))
    recurrent = bool(types & set(STATE_TYPES + HYBRID_TYPES))
    return "hybrid" if attention and recurrent else ("ssm" if recurrent else "transformer")


def check_recipe(recipe: Any, config: Any) -> None:
    """Refuse, in one line, a recipe whose attention methods would change nothing on a model without
    attention layers (a pure SSM): its prefill, compress and load methods act on attention only."""
    if config is None or kind_of(config) != "ssm":
        return
    model_type = getattr(text_config(config), "model_type", "this model")
    for stage in ("prefill", "compress", "load"):
        method = getattr(recipe, stage, None)
        if method is None or (stage == "prefill" and method.name == "dense"):
            continue
        raise SpecError(f"{stage} method {method.spec()} acts on attention layers, and {model_type} has "
                        "none (a pure state-space model: its cache is a fixed-size recurrent state); "
                        "use a recipe without it")


# ---- memory model: bytes of K/V and state from a config's published numbers -----------------------------

def _get(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ModelError(f"{getattr(config, 'model_type', 'config')}: none of {', '.join(names)} is set")


def state_elements(config: Any) -> int:
    """Elements of one recurrent layer's state (conv window + SSM / delta-rule state), batch 1.

    Per family (what transformers allocates, checked against `StateLayer.state_nbytes` in
    tests/test_hybrid.py):
    Mamba-2 (mamba2, zamba2, bamba, falcon_h1, granitemoehybrid): conv (d_inner + 2*groups*d_state) x kernel,
    SSM heads x head_dim x d_state; Mamba-1 (mamba, falcon_mamba, jamba): conv d_inner x kernel, SSM
    d_inner x d_state; LFM2: conv hidden x L_cache; Qwen3-Next (gated delta net): conv (2*k_heads*k_dim +
    v_heads*v_dim) x kernel, state v_heads x k_dim x v_dim."""
    config = text_config(config)
    kind = getattr(config, "model_type", "")
    hidden = config.hidden_size
    if kind == "lfm2":
        return hidden * _get(config, "conv_L_cache")
    if kind == "qwen3_next":
        k_heads, k_dim = config.linear_num_key_heads, config.linear_key_head_dim
        v_heads, v_dim = config.linear_num_value_heads, config.linear_value_head_dim
        conv = (2 * k_heads * k_dim + v_heads * v_dim) * config.linear_conv_kernel_dim
        return conv + v_heads * k_dim * v_dim
    if kind in ("mamba", "falcon_mamba", "jamba"):
        d_inner = _get(config, "mamba_expand", "expand") * hidden
        return d_inner * _get(config, "mamba_d_conv", "conv_kernel") + d_inner * _get(config, "mamba_d_state",
                                                                                       "state_size")
    if kind in ("mamba2", "zamba2", "bamba", "falcon_h1", "granitemoehybrid"):
        heads = _get(config, "n_mamba_heads", "mamba_n_heads", "num_heads")
        head_dim = _get(config, "mamba_headdim", "mamba_d_head", "head_dim")
        groups = _get(config, "mamba_ngroups", "mamba_n_groups", "n_groups")
        d_state = _get(config, "mamba_d_state", "state_size")
        kernel = _get(config, "mamba_d_conv", "conv_kernel")
        d_inner = heads * head_dim
        return (d_inner + 2 * groups * d_state) * kernel + heads * head_dim * d_state
    raise ModelError(f"no state-size formula for model type {kind!r}")


def attention_geometry(config: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of the attention layers."""
    config = text_config(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = (getattr(config, "head_dim", None) or getattr(config, "attention_head_dim", None)
                or config.hidden_size // heads)
    return kv_heads, head_dim


def cache_bytes_model(config: Any, tokens: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes of K/V and of recurrent state after `tokens` tokens, batch 1, every tensor `dtype_bytes` wide:
    {"kv": ..., "state": ..., "total": ...}. Sliding-window layers hold window - 1 tokens (as KVLayer)."""
    plan = layer_plan(config)
    kv_total = state_total = 0
    if any(each.kind != "attention" for each in plan):
        state_layers = sum(1 for each in plan if each.kind != "attention")
        state_total = state_layers * state_elements(config) * dtype_bytes
    if any(each.kind != "state" for each in plan):
        kv_heads, head_dim = attention_geometry(config)
        for each in plan:
            if each.kind == "state":
                continue
            held = tokens if each.sliding_window is None else min(tokens, each.sliding_window - 1)
            kv_total += 2 * kv_heads * head_dim * held * dtype_bytes
    return {"kv": kv_total, "state": state_total, "total": kv_total + state_total}
