"""The sparse prefill kernel on PyTorch's fused CPU flash-attention kernel (`FlashPlan`): vertical-slash
layouts (columns plus offsets that hold the own block) on CPU, as a few dense attentions over
contiguous key ranges merged by their log-sum-exp. `flash_fits` says which layouts it takes.
"""

from __future__ import annotations

import torch

from kvlife.methods.prefill.layout import Layout
from kvlife.methods.prefill.matmul_kernel import Keys, ranges

try:  # PyTorch's fused CPU flash-attention kernel, which also returns the rows' log-sum-exp
    _FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # pragma: no cover - older PyTorch
    _FLASH = None
COLUMN_GROUP = 16  # query blocks per columns call: they share one prefix of the columns


def flash_fits(layout: Layout, device: torch.device, softcap: float | None) -> bool:
    """Whether `FlashPlan` computes this layout: on CPU, without soft-capping, for columns plus
    offsets that hold the whole own block [0, block) (every vertical-slash layout: its most local
    diagonals are always kept), no window and no blocks."""
    offsets = layout.offsets
    if _FLASH is None or device.type != "cpu" or softcap is not None or layout.window is not None \
            or layout.blocks is not None or offsets is None or offsets.numel() < layout.block:
        return False
    return bool(offsets[-layout.block] == 0) and int(offsets[-1]) == layout.block - 1


class FlashPlan:
    """One head, or heads sharing a layout, computed as a few dense attentions over contiguous key
    ranges with PyTorch's fused CPU flash-attention kernel, merged by their log-sum-exp.

    As MInference's kernel does, the offsets become runs of consecutive offsets: a run [a, e) is, for
    query block b, the contiguous keys b*block + a .. b*block + e - 1, so all query blocks attend to
    it in one call over overlapping strided windows of the keys (no copy, no gather). The own block
    [0, block) is one causal call; a run before it is one unmasked call over the blocks where it lies
    wholly after key 0 and one masked call over the few blocks where it straddles key 0. The columns
    (gathered once per head) are attended in groups of COLUMN_GROUP query blocks, each over the
    prefix of columns before its last block, masked where a block's offsets already hold a column
    (each key is counted once) or the column lies after the block's start (the own block holds it).
    The g heads of a shared layout are the kernel's heads, their keys a stride-0 view: one KV read.
    """

    def __init__(self, query, keys: Keys, layout: Layout, scaling: float) -> None:
        g, m, dim = query.shape
        block = layout.block
        self.g, self.m, self.dim, self.block, self.scaling = g, m, dim, block, scaling
        self.n_blocks = n_blocks = -(-m // block)
        self.step = n_blocks
        padded = torch.zeros(g, n_blocks * block, dim, dtype=torch.float32, device=query.device)
        padded[:, :m] = query.float()
        self.q = padded.view(g, n_blocks, block, dim).transpose(0, 1)  # [n_blocks, g, block, d], a view
        self.heads_out = torch.empty(g, n_blocks, block, dim, device=query.device)
        self.out = self.heads_out.transpose(0, 1)  # [n_blocks, g, block, d], a view
        self.lse = torch.empty(n_blocks, g, block, device=query.device)
        self.keys, self.offsets = keys, layout.offsets
        runs = ranges(layout.offsets)
        self.dense = len(runs) == 1 and runs[0][0] <= -(m - 1)
        self.runs = [(a, min(e, 0)) for a, e in runs if a < 0]  # the parts before the own block
        self.columns = None
        if layout.columns is not None and layout.columns.numel() and not self.dense:
            self.columns = layout.columns
            index = layout.columns + keys.front
            self.col_key, self.col_value = keys.key.index_select(0, index), keys.value.index_select(0, index)
            starts = torch.arange(n_blocks, device=query.device) * block
            self.sure = torch.searchsorted(layout.columns, starts).tolist()  # columns before each block
            low = int(layout.offsets[0])
            self.low, self.held = low, torch.zeros(block - low, dtype=torch.bool, device=query.device)
            self.held[layout.offsets - low] = True

    def _window(self, rows: torch.Tensor, start: int, count: int, width: int) -> torch.Tensor:
        """[count, g, width, d] overlapping windows of padded key rows start + i*block + (0..width-1)."""
        dim = rows.shape[-1]
        return rows.as_strided((count, self.g, width, dim), (self.block * dim, 0, dim, 1),
                               rows.storage_offset() + start * dim)

    def _attend(self, lo: int, hi: int, start: int, width: int, mask=None, causal: bool = False):
        keys = self.keys
        key = self._window(keys.key, keys.front + start, hi - lo, width)
        value = self._window(keys.value, keys.front + start, hi - lo, width)
        out, lse = _FLASH(self.q[lo:hi], key, value, 0.0, causal, attn_mask=mask, scale=self.scaling)
        return out, lse

    def _merge(self, lo: int, hi: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        # out's share of the merged row is sigmoid(lse - acc_lse): one fused pass over the outputs.
        acc_out, acc_lse = self.out[lo:hi], self.lse[lo:hi]
        acc_out.lerp_(out, torch.sigmoid(lse - acc_lse)[..., None])
        torch.logaddexp(acc_lse, lse, out=acc_lse)

    def compute(self, lo: int, hi: int) -> None:
        block = self.block
        if self.dense:  # one run reaching key 0 from every row: plain causal attention
            n = self.keys.n
            q = self.q.transpose(0, 1).reshape(1, self.g, -1, self.dim)[:, :, :self.m]
            key = self.keys.key[self.keys.front:self.keys.front + n].expand(1, self.g, n, self.dim)
            value = self.keys.value[self.keys.front:self.keys.front + n].expand(1, self.g, n, self.dim)
            out = _FLASH(q, key, value, 0.0, True, scale=self.scaling)[0]
            self.heads_out.view(self.g, -1, self.dim)[:, :self.m] = out[0]
            return
        # The own block: every row sees offsets 0..its own row (top-left causal), never empty.
        out, lse = self._attend(lo, hi, lo * block, block, causal=True)
        self.out[lo:hi], self.lse[lo:hi] = out, lse
        for a, e in self.runs:
            width = e - a
            first = max(lo, -e // block + 1)  # the first block that sees a key of the run
            whole = min(hi, max(first, -(a // block)))  # from here on the run lies after key 0
            # the run straddles key 0: mask the keys before it (one table, as strided views)
            if first < whole:
                table = torch.zeros((whole - first) * block + width, device=self.out.device)
                table[:max(0, -(first * block + a))] = float("-inf")
                mask = table.as_strided((whole - first, self.g, block, width), (block, 0, 0, 1))
                self._merge(first, whole, *self._attend(first, whole, first * block + a, width, mask))
            if whole < hi:
                self._merge(whole, hi, *self._attend(whole, hi, whole * block + a, width))
        if self.columns is not None:
            self._columns(lo, hi)

    def _columns(self, lo: int, hi: int) -> None:
        block, device = self.block, self.out.device
        lo = max(lo, next((b for b in range(lo, hi) if self.sure[b] > 0), hi))
        for b0 in range(lo, hi, COLUMN_GROUP):
            b1 = min(hi, b0 + COLUMN_GROUP)
            width = self.sure[b1 - 1]
            rel = self.columns[None, :width] - torch.arange(b0, b1, device=device)[:, None] * block
            hidden = rel >= 0  # the own block holds these (or they lie after the block)
            inside = (rel >= self.low) & ~hidden
            hidden[inside] |= self.held[rel[inside] - self.low]
            seen = (~hidden).sum(1)
            if not bool(seen.any()):
                continue
            mask = torch.zeros(b1 - b0, width, device=device).masked_fill_(hidden, float("-inf"))
            mask = mask.as_strided((b1 - b0, self.g, block, width), (width, 0, 0, 1))
            key = self.col_key[:width].expand(b1 - b0, self.g, width, self.dim)
            value = self.col_value[:width].expand(b1 - b0, self.g, width, self.dim)
            out, lse = _FLASH(self.q[b0:b1], key, value, 0.0, False, attn_mask=mask, scale=self.scaling)
            lse.masked_fill_((seen == 0)[:, None, None], float("-inf"))  # the kernel gives 0 for empty rows
            self._merge(b0, b1, out, lse)

    def result(self) -> torch.Tensor:
        """[g, m, d] float32."""
        return self.heads_out.view(self.g, -1, self.dim)[:, :self.m]
