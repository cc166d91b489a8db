"""Sparse prefill patterns: which keys each query row sees (`Layout`), and the same pattern as a
dense mask (`layout_mask`), the reference the kernels are tested against.

A `Layout` describes one head's sparse pattern on the plain causal layout (query row i and key j
at the same positions, 0..n-1), as the union of up to three parts, always intersected with
causality (j <= i):

- `columns`: absolute key indices that every later row sees (MInference's vertical lines,
  A-shape's initial tokens).
- `offsets`: block-relative key offsets (each < block): the rows of query block b (rows b*B ..
  b*B+B-1) see keys b*B + offsets. A diagonal ("slash") line at distance o, widened to the query
  block as MInference's kernel does, is the offsets [-o, B-o). With `window` set, the part keeps
  only keys with i - j < window: A-shape's exact sliding window.
- `blocks`: per query block, a list of key blocks (block-sparse patterns); a layout with blocks
  holds nothing else (the kernel adds its parts' keys, and only columns and offsets are kept apart).

`layout_mask` gives the pattern as a dense bool mask for `attention.reference_attention` (tests)
and for measuring the attention mass a pattern keeps (benchmarks, pattern search).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlife.attention import AttnCall

BLOCK = 64  # query rows per block (MInference's block size)


@dataclass
class Layout:
    """One head's sparse attention pattern (see the module docstring); None parts are empty."""

    columns: torch.Tensor | None = None  # [n_columns] sorted unique key indices
    offsets: torch.Tensor | None = None  # [n_offsets] sorted unique block-relative offsets, each < block
    window: int | None = None  # offsets part keeps only keys with i - j < window (then offsets must
    # hold [-(window - 1), block) and columns are skipped where the window covers them)
    blocks: torch.Tensor | None = None  # [n_query_blocks, k] key block indices per query block, -1 = none
    block: int = BLOCK

    def __post_init__(self) -> None:
        if self.blocks is not None and (self.columns is not None or self.offsets is not None):
            raise ValueError("a block-sparse layout holds only blocks, no columns or offsets")
        if self.window is not None and self.offsets is not None:
            low = -(self.window - 1)
            if int(self.offsets[0]) > low or int(self.offsets[-1]) < self.block - 1 or \
                    self.offsets.numel() < self.block - low:
                raise ValueError("a windowed layout's offsets must hold [-(window - 1), block)")


def plain_causal(call: AttnCall) -> bool:
    """True for the first prefill's layout: n queries and n keys at the same consecutive positions."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    if q_len != k_len or call.query.shape[0] != 1 or q_len == 0:
        return False
    q_pos = call.q_pos
    if int(q_pos[-1] - q_pos[0]) != q_len - 1 or (q_len > 1 and not bool((q_pos[1:] > q_pos[:-1]).all())):
        return False
    return bool((call.k_pos == q_pos[None]).all())


def layout_mask(layout: Layout, n: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [len(rows), n]: the keys each query row sees under `layout` (causality included)."""
    device = layout_device(layout)
    rows = torch.arange(n, device=device) if rows is None else rows.to(device)
    keys = torch.arange(n, device=device)
    block = layout.block
    mask = torch.zeros(len(rows), n, dtype=torch.bool, device=device)
    if layout.offsets is not None:
        # table[i] says whether offset i - n is held; a row in the block starting at s sees key k
        # when offset k - s is held, i.e. table[n - s + k]: one slice per block.
        table = torch.zeros(2 * n + block, dtype=torch.bool, device=device)
        table[layout.offsets[layout.offsets >= -n] + n] = True
        starts = rows // block * block
        for start in torch.unique(starts).tolist():
            mask[starts == start] = table[n - start:2 * n - start]
        if layout.window is not None:
            mask &= (rows[:, None] - keys[None]) < layout.window
    if layout.columns is not None:
        columns = torch.zeros(n, dtype=torch.bool, device=device)
        columns[layout.columns[layout.columns < n]] = True
        mask |= columns[None]
    if layout.blocks is not None:
        n_key_blocks = -(-n // block)
        chosen = layout.blocks[rows // block]  # [rows, k]
        seen = torch.zeros(len(rows), n_key_blocks + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(chosen >= 0, chosen, n_key_blocks), True)
        mask |= seen[:, :n_key_blocks].repeat_interleave(block, dim=1)[:, :n]
    return mask & (keys[None] <= rows[:, None])


def layout_device(layout: Layout) -> torch.device:
    for part in (layout.columns, layout.offsets, layout.blocks):
        if part is not None:
            return part.device
    return torch.device("cpu")
