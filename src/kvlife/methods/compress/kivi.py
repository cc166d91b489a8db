"""KIVI: 2-bit / 4-bit asymmetric quantization, keys per channel and values per token."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from kvlife.attention import AttnCall
from kvlife.cache import KVLayer, LayerCheckpoint
from kvlife.errors import SpecError
from kvlife.methods.base import Method

BITS = (2, 4, 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits, [..., n] -> uint8 [..., n * bits // 8], 8 // bits codes a byte."""
    per_byte = 8 // bits
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 [..., m] -> uint8 codes [..., m * 8 // bits]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)


def quantize(x: torch.Tensor, bits: int, dim: int, dtype: torch.dtype):
    """Asymmetric min/max quantization of `x` with one (scale, min) per slice along `dim`.

    Returns (codes uint8 shaped like x, scale, minimum); scale and minimum keep `dim` with size 1
    and are stored in `dtype`. Codes are computed against the stored (rounded) scale and minimum,
    so the dequantization error stays within half a step.
    """
    x = x.float()
    low = x.amin(dim=dim, keepdim=True).to(dtype)
    high = x.amax(dim=dim, keepdim=True)
    scale = ((high - low.float()) / ((1 << bits) - 1)).to(dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant slices: any scale works
    codes = ((x - low.float()) / scale.float()).round_().clamp_(0, (1 << bits) - 1).to(torch.uint8)
    return codes, scale, low


class KiviLayer(KVLayer):
    """A full-attention layer holding quantized K/V plus a full-precision residual of recent tokens.

    Keys are quantized per channel over groups of `group_size` tokens, values per token over
    groups of `group_size` channels (the whole head where head_dim is not a multiple of it).
    Codes are packed `8 // bits` to a byte, with scale and minimum in the model's dtype. New tokens
    join the residual; once it holds `residual + group_size` tokens, its oldest `group_size`
    tokens are quantized (so between `residual` and `residual + group_size - 1` stay exact).
    Positions are kept exactly. No tensor is modified in place, so checkpoints are references.

    Bytes: with 16-bit scales and groups of 32, each quantized element costs `bits + 1` bits
    (codes plus its share of the key's and the value's scale and minimum), so the quantized part
    shrinks 16 / 3 = 5.3x at 2 bits and 16 / 5 = 3.2x at 4 bits, before the residual.
    """

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 32) -> None:
        super().__init__(sliding_window=None)
        self.bits, self.group_size, self.residual = bits, group_size, residual

    @classmethod
    def from_layer(cls, layer: KVLayer, bits: int = 2, group_size: int = 32, residual: int = 32) -> KiviLayer:
        if layer.is_sliding:
            raise ValueError("KiviLayer holds full-attention layers only")
        keys, values = layer.dense_kv()
        batch, kv_heads, _, head_dim = keys.shape
        if head_dim * bits % 8:
            raise SpecError(f"kivi: head_dim {head_dim} cannot be packed at {bits} bits")
        new = cls(bits, group_size, residual)
        new.dtype, new.device = layer.dtype, layer.device
        new.value_group = group_size if head_dim % group_size == 0 else head_dim
        new.positions, new.next_position = layer.positions, layer.next_position
        new.attn_positions = layer.attn_positions
        new.is_initialized = True
        packed_dim = head_dim * bits // 8
        codes = keys.new_zeros(batch, kv_heads, 0, packed_dim, dtype=torch.uint8)
        new.key_codes, new.value_codes = codes, codes
        new.key_scale = keys.new_zeros(batch, kv_heads, 0, head_dim)
        new.key_min = new.key_scale
        new.value_scale = keys.new_zeros(batch, kv_heads, 0, head_dim // new.value_group)
        new.value_min = new.value_scale
        new.residual_keys, new.residual_values = keys, values
        new.flush()
        return new

    # ---- quantized storage -------------------------------------------------------------------

    def flush(self) -> None:
        """Quantize the residual's oldest whole groups, leaving at least `residual` tokens exact."""
        overflow = self.residual_keys.shape[-2] - self.residual
        n_flush = max(0, overflow // self.group_size * self.group_size)
        if n_flush == 0:
            return
        keys, values = self.residual_keys[..., :n_flush, :], self.residual_values[..., :n_flush, :]
        batch, kv_heads, _, head_dim = keys.shape
        # Keys: one (scale, min) per channel and group of tokens.
        grouped = keys.reshape(batch, kv_heads, n_flush // self.group_size, self.group_size, head_dim)
        codes, scale, low = quantize(grouped, self.bits, dim=3, dtype=self.dtype)
        self.key_codes = torch.cat([self.key_codes, pack(codes.reshape(keys.shape), self.bits)], dim=-2)
        self.key_scale = torch.cat([self.key_scale, scale.squeeze(3)], dim=-2)
        self.key_min = torch.cat([self.key_min, low.squeeze(3)], dim=-2)
        # Values: one (scale, min) per token and group of channels.
        grouped = values.reshape(batch, kv_heads, n_flush, head_dim // self.value_group, self.value_group)
        codes, scale, low = quantize(grouped, self.bits, dim=4, dtype=self.dtype)
        self.value_codes = torch.cat([self.value_codes, pack(codes.reshape(values.shape), self.bits)], dim=-2)
        self.value_scale = torch.cat([self.value_scale, scale.squeeze(4)], dim=-2)
        self.value_min = torch.cat([self.value_min, low.squeeze(4)], dim=-2)
        self.residual_keys = self.residual_keys[..., n_flush:, :]
        self.residual_values = self.residual_values[..., n_flush:, :]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized part's keys and values, [batch, kv_heads, quantized tokens, head_dim]."""
        batch, kv_heads, n_quant, _ = self.key_codes.shape
        head_dim = self.residual_keys.shape[-1]
        codes = unpack(self.key_codes, self.bits).float()
        grouped = codes.reshape(batch, kv_heads, n_quant // self.group_size, self.group_size, head_dim)
        keys = grouped * self.key_scale.float()[:, :, :, None] + self.key_min.float()[:, :, :, None]
        codes = unpack(self.value_codes, self.bits).float()
        grouped = codes.reshape(batch, kv_heads, n_quant, head_dim // self.value_group, self.value_group)
        values = grouped * self.value_scale.float()[..., None] + self.value_min.float()[..., None]
        shape = (batch, kv_heads, n_quant, head_dim)
        return keys.reshape(shape).to(self.dtype), values.reshape(shape).to(self.dtype)

    # ---- KVLayer interface -------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n_new = key_states.shape[-2]
        new_positions = torch.arange(
            self.next_position, self.next_position + n_new, device=key_states.device
        ).expand(key_states.shape[1], n_new)
        self.positions = torch.cat([self.positions, new_positions], dim=-1)
        self.next_position += n_new
        self.residual_keys = torch.cat([self.residual_keys, key_states], dim=-2)
        self.residual_values = torch.cat([self.residual_values, value_states], dim=-2)
        # Attention sees the exact new tokens: quantize only after building what it attends over.
        keys, values = self.dense_kv()
        self.flush()
        self.attn_positions = self.positions
        return keys, values

    def dense_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.dequantized()
        return (torch.cat([keys, self.residual_keys], dim=-2),
                torch.cat([values, self.residual_values], dim=-2))

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        raise NotImplementedError("a KiviLayer is written by update(); build a new one with from_layer()")

    def keep(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("kivi quantizes and does not evict; one compress method per recipe")

    def _state(self) -> tuple[Any, ...]:
        return (self.key_codes, self.key_scale, self.key_min, self.value_codes, self.value_scale,
                self.value_min, self.residual_keys, self.residual_values)

    def checkpoint(self) -> LayerCheckpoint:
        return LayerCheckpoint(None, None, self.positions, self.next_position, extra=self._state())

    def rollback(self, state: LayerCheckpoint) -> None:
        (self.key_codes, self.key_scale, self.key_min, self.value_codes, self.value_scale,
         self.value_min, self.residual_keys, self.residual_values) = state.extra
        self.positions, self.next_position = state.positions, state.next_position
        self.attn_positions = self.positions
        self.is_initialized = True

    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self._state())


@dataclasses.dataclass
class Kivi(Method):
    """Quantize the cache to 2 or 4 bits: keys per channel, values per token, recent tokens exact.

    Liu et al., 2024 ("KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache") found that
    keys have outlier channels while values do not, so keys are quantized per channel and values
    per token, each in groups with its own scale and minimum; the most recent tokens stay in full
    precision until a whole group can be quantized.

    The prefill's own attention is exact; the layer's cache is quantized after it, and every later
    step attends over the dequantized cache plus the exact residual. Sliding-window layers stay in
    full precision (their window is small). Kivi evicts nothing, so it takes no ratio or budget.

    Parameters:
        bits (2): bits per code, 2, 4 or 8.
        group_size (32): tokens per key group and channels per value group.
        residual (32): the newest tokens always held in full precision (up to `residual +
            group_size - 1` between two quantizations).
    """

    name: ClassVar[str] = "kivi"
    stage: ClassVar[str] = "compress"
    paper: ClassVar[str] = "Liu et al., 2024, KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"
    bits: int = 2
    group_size: int = 32
    residual: int = 32

    def validate(self) -> None:
        if self.bits not in BITS:
            raise SpecError(f"kivi: bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size < 1 or self.residual < 0:
            raise SpecError(f"kivi: group_size must be >= 1 and residual >= 0 "
                            f"(got {self.group_size}, {self.residual})")

    def compress_layer(self, call: AttnCall, layer: KVLayer) -> None:
        if layer.is_sliding or isinstance(layer, KiviLayer) or call.step is None:
            return
        quantized = KiviLayer.from_layer(layer, self.bits, self.group_size, self.residual)
        call.step.cache.replace_layer(call.layer_idx, quantized)
