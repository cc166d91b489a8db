"""Sparse prefill on PyTorch's `flex_attention`: a list of `Layout`s as a block mask and a mask_mod.

flex_attention computes attention tile by tile (BLOCK query rows x BLOCK keys) over the tiles a
`BlockMask` lists: "full" tiles with no mask, "partial" tiles whose scores pass a `mask_mod`. The
layouts' parts map onto that as follows:

- offsets (slashes, A-shape's window) and chosen key blocks (block-sparse) are tiles of the keys
  themselves: per query block, the key blocks its offsets or chosen blocks reach, full where every
  key of the tile is seen (a whole run of BLOCK offsets before the own block, inside the window; a
  chosen block before the own one), partial elsewhere.
- columns (vertical lines, A-shape's initial tokens) are scattered over the whole sequence and would
  touch nearly every key tile, so, as MInference's kernel does, they are gathered once into C extra
  keys placed before the sequence (C = the most columns of any head, rounded up to BLOCK). A
  column's key counts only where the offsets and blocks do not already hold it (each key once).

The block structure is derived from the layouts directly (O(blocks^2) per head), not by evaluating
the mask over every query-key pair as `create_block_mask` does (O(n^2) per head: 14 heads at 32K
tokens is 15 G evaluations). `flex_mask` gives the mask_mod's own dense mask for tests, which check
it against `kernels.layout_mask` pair by pair and the block structure against both.

On CUDA `flex_attention` is compiled by torch.compile into a Triton kernel; on CPU into a C++ one
(the first call per shape compiles: tens of seconds on a small CPU). Uncompiled it is PyTorch's
reference implementation, which materializes every score (tests only).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from kvlife.methods.prefill.kernels import Layout

FAR = 1 << 30  # position of a padding column slot: after every query row, so never seen
TILE = 64  # flex_attention tile: query rows x keys (a multiple of the layouts' block)


@dataclass
class FlexInputs:
    """Everything flex_attention needs for one call: keys and values with the gathered columns in
    front ([1, heads, C + n, d]), the block mask and whether the key heads are KV heads (GQA)."""

    key: torch.Tensor
    value: torch.Tensor
    block_mask: BlockMask
    gqa: bool


@dataclass
class _Tables:
    """Per layout head (one when shared): lookup tables the mask_mod reads."""

    offsets: torch.Tensor  # bool [H, n - 1 + block]: offset o held at index o + n - 1
    window: torch.Tensor  # long [H]: the offsets part's window (larger than any distance when none)
    blocks: torch.Tensor  # bool [H, n_query_blocks, n_key_blocks]: chosen key blocks
    column_pos: torch.Tensor  # long [H, C]: gathered column positions, FAR for padding slots
    n: int
    block: int

    @property
    def slots(self) -> int:
        return self.column_pos.shape[1]


def _tables(layouts: list[Layout], m: int, n: int, tile: int) -> _Tables:
    """Tables for query rows 0..m-1 over n keys (both already bucketed)."""
    block = layouts[0].block
    device = _device(layouts)
    heads, n_qb, n_kb = len(layouts), -(-m // block), -(-n // block)
    most = max([lay.columns.numel() for lay in layouts if lay.columns is not None] + [0])
    slots = bucket(most, tile) if most else 0
    offsets = torch.zeros(heads, n - 1 + block, dtype=torch.bool, device=device)
    window = torch.full((heads,), n + block, dtype=torch.long, device=device)
    blocks = torch.zeros(heads, n_qb, n_kb, dtype=torch.bool, device=device)
    column_pos = torch.full((heads, slots), FAR, dtype=torch.long, device=device)
    for h, lay in enumerate(layouts):
        if lay.offsets is not None:
            offsets[h, lay.offsets[lay.offsets > -n] + n - 1] = True
        if lay.window is not None:
            window[h] = lay.window
        if lay.blocks is not None:
            chosen = lay.blocks[:n_qb]
            rows = torch.arange(chosen.shape[0], device=device)[:, None].expand_as(chosen)
            keep = chosen >= 0
            blocks[h, rows[keep], chosen[keep]] = True
        if lay.columns is not None:
            column_pos[h, :lay.columns.numel()] = torch.where(lay.columns < n, lay.columns, FAR)
    return _Tables(offsets, window, blocks, column_pos, n, block)


def _device(layouts: list[Layout]) -> torch.device:
    for lay in layouts:
        for part in (lay.columns, lay.offsets, lay.blocks):
            if part is not None:
                return part.device
    return torch.device("cpu")


def _mask_mod(tables: _Tables, shared: bool):
    """The exact pattern: the offsets' and blocks' keys (causal; offsets inside the window), plus
    the gathered columns where those do not already hold them. Every table index is clamped: a
    compiled kernel may evaluate the mask on padding rows and keys past the sequence."""
    offsets, window, blocks, column_pos = tables.offsets, tables.window, tables.blocks, tables.column_pos
    n, block, slots = tables.n, tables.block, tables.slots
    last_offset, last_slot, last_qb = offsets.shape[1] - 1, max(slots - 1, 0), blocks.shape[1] - 1

    def held(head, q, key, start):
        """Whether the offsets or the chosen blocks hold key `key` for row q (causality aside)."""
        rel = key - start
        by_offset = (
            offsets[head, (rel + n - 1).clamp(0, last_offset)] & (rel < block) & (q - key < window[head])
        )
        return by_offset | blocks[head, (q // block).clamp(max=last_qb), key.clamp(0, n - 1) // block]

    def mask_mod(b, h, q, kv):
        head = h * 0 if shared else h
        start = q // block * block
        key = kv - slots
        seen = (key >= 0) & (key <= q) & held(head, q, key, start)
        if slots:
            pos = column_pos[head, kv.clamp(0, last_slot)]
            seen = seen | ((kv < slots) & (pos <= q) & ~held(head, q, pos, start))
        return seen

    return mask_mod


def _block_tiles(
    layouts: list[Layout], tables: _Tables, m: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [H, n_query_blocks, C/block + n_key_blocks] at the layouts' block size: the tiles holding
    any seen key (touched) and those whose every key is seen (full), for the first `rows` of m rows. Touched
    may hold tiles with no seen key (a window edge's neighbour, a column after a block's last row):
    flex_attention only skips fewer tiles then."""
    block, n = tables.block, tables.n
    device = tables.offsets.device
    n_qb, n_kb = -(-m // block), -(-n // block)
    b = torch.arange(n_qb, device=device)[:, None]
    kb = torch.arange(n_kb, device=device)[None]
    rel = kb - b  # key block - query block: <= 0 under causality
    touched, full = [], []
    for h, lay in enumerate(layouts):
        main_touched = torch.zeros(n_qb, n_kb, dtype=torch.bool, device=device)
        main_full = torch.zeros_like(main_touched)
        if lay.offsets is not None and lay.offsets.numel():
            d = torch.div(lay.offsets, block, rounding_mode="floor")  # the offset's key block, relative
            low = int(d[0])
            counts = torch.bincount(d - low, minlength=1 - low)  # relative blocks low .. 0
            inside = (rel >= low) & (rel <= 0)
            count = torch.zeros_like(rel)
            count[inside] = counts[(rel - low)[inside]]
            distance_min, distance_max = -rel * block - (block - 1), -rel * block + block - 1
            window = lay.window if lay.window is not None else n + block
            main_touched |= (count > 0) & (distance_min < window)
            main_full |= (count == block) & (rel < 0) & (distance_max < window)
        if lay.blocks is not None:
            main_touched |= tables.blocks[h] & (rel <= 0)
            main_full |= tables.blocks[h] & (rel < 0)
        main_full &= (kb + 1) * block <= n  # the last, shorter key block is never full
        first = tables.column_pos[h].view(-1, block)[:, 0]  # each slot block's first (least) column
        column_touched = first[None] <= b * block + block - 1
        touched.append(torch.cat([column_touched, main_touched], dim=1))
        full.append(torch.cat([torch.zeros_like(column_touched), main_full], dim=1))
    touched, full = torch.stack(touched), torch.stack(full)
    real = -(-rows // block)  # query blocks past the real rows (bucket padding) attend to nothing
    touched[:, real:] = False
    full[:, real:] = False
    return touched, full


def _pool(tiles: torch.Tensor, factor: int, any_: bool) -> torch.Tensor:
    """Bool tiles [H, Q, K] at `factor` times the size: any (touched) or all (full) of the small ones."""
    if factor == 1:
        return tiles
    heads, q, k = tiles.shape
    padded = tiles.new_full((heads, -(-q // factor) * factor, -(-k // factor) * factor), any_ is False)
    padded[:, :q, :k] = tiles
    if not any_:
        padded[:, :, k:] = False  # keys past the sequence: a tile reaching there is never full
    view = padded.view(heads, padded.shape[1] // factor, factor, padded.shape[2] // factor, factor)
    return view.any(4).any(2) if any_ else view.all(4).all(2)


def _listed(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flex_attention's (num_blocks [1, H, Q], indices [1, H, Q, K]) from bool tiles [H, Q, K]."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None], indices[None]


def bucket(n: int, tile: int = TILE) -> int:
    """n rounded up to a multiple of a quarter of its highest power of two (and of `tile`): at most
    4 lengths per octave, under 25% padding.

    Compiled flex_attention is specialized to its shapes (with dynamic shapes its CPU kernel does not
    compile in torch 2.13), so each new length compiles again (tens of seconds) and past dynamo's
    recompile limit falls back to the uncompiled reference, which holds every score in memory.
    Padding lengths to these buckets makes shapes repeat; padded query rows attend to nothing and
    padded keys are never listed, so they cost copies, not attention."""
    step = max(tile, 1 << max(0, n.bit_length() - 3))
    return -(-n // step) * step


@dataclass
class FlexMask:
    """A block mask over bucketed lengths and the tables its mask_mod reads."""

    block_mask: BlockMask
    tables: _Tables
    rows: int  # the real query rows (the mask's own are bucketed)
    keys: int  # the real keys


def flex_block_mask(layouts: list[Layout], m: int, n: int, tile: int = TILE) -> FlexMask:
    """The block mask of query rows 0..m-1 over C gathered column keys followed by the n keys, both
    lengths bucketed, in `tile` x `tile` tiles (a multiple of the layouts' block)."""
    block = layouts[0].block
    if tile % block:
        raise ValueError(f"flex tile {tile} must be a multiple of the layouts' block {block}")
    padded_m, padded_n = bucket(m, tile), bucket(n, tile)
    tables = _tables(layouts, padded_m, padded_n, tile)
    touched, full = _block_tiles(layouts, tables, padded_m, m)
    touched, full = _pool(touched, tile // block, True), _pool(full, tile // block, False)
    partial_counts, partial = _listed(touched & ~full)
    full_counts, full_index = _listed(full)
    block_mask = BlockMask.from_kv_blocks(
        partial_counts,
        partial,
        full_counts,
        full_index,
        BLOCK_SIZE=tile,
        mask_mod=_mask_mod(tables, len(layouts) == 1),
        seq_lengths=(padded_m, tables.slots + padded_n),
        compute_q_blocks=False,
    )
    return FlexMask(block_mask, tables, m, n)


def flex_inputs(key: torch.Tensor, value: torch.Tensor, layouts: list[Layout], m: int, q_heads: int,
                tile: int = TILE) -> FlexInputs:
    """The inputs of `flex_sparse_attention` for query rows 0..m-1 over keys [kv_heads, n, d]: keys
    and values with the gathered columns in front and zeros after the last key up to the bucket."""
    kv_heads, n, dim = key.shape
    shared = len(layouts) == 1
    mask = flex_block_mask(layouts, m, n, tile)
    slots, padding = mask.tables.slots, mask.tables.n - n
    gqa = shared or slots == 0
    if gqa:  # the KV heads themselves: the columns (if any) are every head's
        index, source_key, source_value = None, key, value
    else:  # per query head: each gathers its own columns
        groups = q_heads // kv_heads
        source_key, source_value = key.repeat_interleave(groups, 0), value.repeat_interleave(groups, 0)
    parts_key, parts_value = [], []
    if slots:
        position = torch.full((len(layouts), slots), n - 1, dtype=torch.long, device=key.device)
        for h, lay in enumerate(layouts):  # padding slots read key n-1; the mask hides them
            if lay.columns is not None:
                position[h, :lay.columns.numel()] = lay.columns.clamp(max=n - 1)
        index = position.expand(source_key.shape[0], -1) if shared else position
        gather = index[..., None].expand(-1, -1, dim)
        parts_key.append(source_key.gather(1, gather))
        parts_value.append(source_value.gather(1, gather))
    zeros = key.new_zeros(source_key.shape[0], padding, dim)
    full_key = torch.cat([*parts_key, source_key, zeros], dim=1)
    full_value = torch.cat([*parts_value, source_value, zeros], dim=1)
    return FlexInputs(full_key[None], full_value[None], mask.block_mask, gqa and kv_heads != q_heads)


@functools.cache
def _compiled():
    return torch.compile(flex_attention, dynamic=False)


RECOMPILES = 64  # compiled shapes kept (dynamo's default, 8, is a handful of buckets and patterns)


def flex_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layouts: list[Layout],
                          scaling: float, softcap: float | None = None, compiled: bool = True,
                          tile: int = TILE) -> torch.Tensor:
    """`kernels.sparse_attention` on flex_attention: query rows 0..m-1 [q_heads, m, d] over key and
    value [kv_heads, n, d], one layout per query head or one shared; returns [q_heads, m, d]."""
    q_heads, m, dim = query.shape
    inputs = flex_inputs(key.to(query.dtype), value.to(query.dtype), layouts, m, q_heads, tile)
    padded = query.new_zeros(1, q_heads, inputs.block_mask.seq_lengths[0], dim)
    padded[0, :, :m] = query
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q, kv):
            return torch.tanh(score / softcap) * softcap
    run = _compiled() if compiled else flex_attention
    # compiled, past the limit: an error, never the uncompiled reference's n^2 scores
    limit = (torch._dynamo.config.patch(recompile_limit=RECOMPILES, fail_on_recompile_limit_hit=True)
             if compiled else contextlib.nullcontext())
    with limit:
        out = run(padded, inputs.key, inputs.value, score_mod=score_mod, block_mask=inputs.block_mask,
                  scale=scaling, enable_gqa=inputs.gqa)
    return out[0, :, :m]


def flex_mask(layouts: list[Layout], n: int, q_heads: int, rows: torch.Tensor | None = None,
              tile: int = TILE) -> torch.Tensor:
    """Bool [heads, len(rows), n]: the keys that flex_attention lets each query row see (the block
    mask's full tiles, and its partial tiles where the mask_mod holds), folded back onto the sequence
    (a gathered column counts at its position). Tests hold it to `kernels.layout_mask`."""
    rows = torch.arange(n) if rows is None else rows
    mask = flex_block_mask(layouts, int(rows.max()) + 1, n, tile)
    block_mask, tables = mask.block_mask, mask.tables
    slots = tables.slots
    mask_mod = _mask_mod(tables, len(layouts) == 1)
    heads = 1 if len(layouts) == 1 else q_heads
    width = block_mask.seq_lengths[1]
    n_tiles = width // tile
    out = torch.zeros(heads, len(rows), n, dtype=torch.bool)
    kv = torch.arange(width)
    for head in range(heads):
        tiles = []
        for counts, index in ((block_mask.kv_num_blocks, block_mask.kv_indices),
                              (block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
            listed = torch.zeros(counts.shape[2], n_tiles + 1, dtype=torch.bool)
            chosen = index[0, head].long()
            chosen = torch.where(
                torch.arange(chosen.shape[1])[None] < counts[0, head, :, None], chosen, n_tiles
            )
            listed.scatter_(1, chosen, True)
            tiles.append(listed[:, :n_tiles].repeat_interleave(tile, 1)[rows // tile])
        partial, full = tiles
        seen = (partial & mask_mod(0, torch.tensor(head), rows[:, None], kv[None])) | full
        out[head] = seen[:, slots:slots + n]
        if slots:
            pos = tables.column_pos[head]
            real = pos < n
            out[head][:, pos[real]] |= seen[:, :slots][:, real]
    return out
