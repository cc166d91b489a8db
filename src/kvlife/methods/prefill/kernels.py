"""Sparse prefill attention: which keys each query row sees (`Layout`), a fast kernel, a reference.

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

The fast path (`sparse_attention`) never touches a skipped key. Each part is computed over whole
query blocks with dense matmuls: a run of at least LONG_RUN consecutive offsets is a strided view
of the keys (`unfold`, no copy; one `mm` per block, because a batched matmul over overlapping
windows copies them first), the other offsets and the chosen key blocks are gathered once per
chunk of query blocks, columns are one matmul against the gathered columns. The parts are merged
by an online softmax (flash attention's running max and sum). Chunks hold up to CHUNK_ELEMENTS
scores so that the softmax passes run over cache-resident data (over scores streamed from memory
the CPU's exp runs ~5x slower) while each op is large enough to amortize its dispatch. On CPU the
chunks are spread over `torch.get_num_threads()` worker threads, each running single-threaded ops
(see `_run`). Measured on one Qwen2.5 layer, the kernel costs 1.2-1.7x dense SDPA's time per
computed score, so its speed-up is about 1 / (1.2-1.7 x density). Pure PyTorch: no compiler at
install time, and the same code runs on any device.

`layout_mask` gives the same pattern as a dense bool mask for `attention.reference_attention`
(tests) and for measuring the attention mass a pattern keeps (benchmarks, pattern search).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvlife.attention import AttnCall

BLOCK = 64  # query rows per block (MInference's block size)
CHUNK_ELEMENTS = 1 << 21  # float32 scores per chunk (8 MiB): fewer, larger ops; still cache-resident in L2+L3
FLOOR = -1e30  # running-max floor of rows that see no key yet
LONG_RUN = 256  # offsets in runs at least this long are read as strided views, not gathered


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


# ---- reference -------------------------------------------------------------------------------------

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


# ---- fast kernel -----------------------------------------------------------------------------------

def sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layouts: list[Layout],
                     scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Attention of query rows 0..m-1 [q_heads, m, d] over key/value [kv_heads, n, d] (m <= n).

    `layouts` holds one layout per query head, or a single layout that every head shares (then
    the query heads of one KV group are stacked into the rows of each block: 7x larger matmuls on
    a GQA model). Returns [q_heads, m, d] in the query's dtype.
    """
    q_heads, kv_heads, n = query.shape[0], key.shape[0], key.shape[1]
    groups = q_heads // kv_heads
    shared = len(layouts) == 1
    # Keys padded once per KV head (zeros before key 0 for offsets reaching back, and after the last
    # key up to two blocks), then read as views by every head and part of that group.
    padded = []
    for kv in range(kv_heads):
        group = layouts if shared else layouts[kv * groups:(kv + 1) * groups]
        front = max([-int(lay.offsets[0]) for lay in group
                     if lay.offsets is not None and lay.offsets.numel()] + [0])
        block = group[0].block
        back = -(-n // block) * block + block - n
        padded.append(_Keys(_pad(key[kv].float(), front, back), _pad(value[kv].float(), front, back),
                            front, n))
    if shared:
        plans = [_plan(query[h * groups:(h + 1) * groups], padded[h], layouts[0], scaling, softcap)
                 for h in range(kv_heads)]
    else:
        plans = [_plan(query[h:h + 1], padded[h // groups], layouts[h], scaling, softcap)
                 for h in range(q_heads)]
    tasks = [(plan, lo, min(lo + plan.step, plan.n_blocks)) for plan in plans
             for lo in range(0, plan.n_blocks, plan.step)]
    _run(tasks, query.device)
    return torch.cat([plan.result() for plan in plans]).to(query.dtype)


def _plan(query, keys: _Keys, layout: Layout, scaling: float, softcap: float | None):
    if flash_fits(layout, query.device, softcap):
        return _FlashPlan(query, keys, layout, scaling)
    return _Plan(query, keys, layout, scaling, softcap)


def _run(tasks: list, device: torch.device) -> None:
    """Run (plan, lo, hi) tasks. On CPU, `torch.get_num_threads()` workers each run whole tasks
    single-threaded: thousands of small ops with an intra-op thread team each pay a barrier per op,
    which on a busy machine (a descheduled team member) costs far more than the op itself."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1 or len(tasks) <= 1:
        for plan, lo, hi in tasks:
            plan.compute(lo, hi)
        return
    slices = [tasks[i::threads * 4] for i in range(threads * 4)]

    def work(part: list) -> None:
        for plan, lo, hi in part:
            plan.compute(lo, hi)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, slices))
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Keys:
    """One KV head's keys and values, zero-padded: key j is row `front + j`."""

    key: torch.Tensor
    value: torch.Tensor
    front: int
    n: int


def _pad(rows: torch.Tensor, front: int, back: int) -> torch.Tensor:
    return torch.cat([rows.new_zeros(front, rows.shape[-1]), rows, rows.new_zeros(back, rows.shape[-1])])


def _ranges(indices: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted unique indices as a list of [a, b) ranges of consecutive values."""
    return [(int(indices[a]), int(indices[b - 1]) + 1) for a, b in _runs(indices)] if indices.numel() else []


def _runs(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """Index ranges [a, b) of the runs of consecutive values in sorted `offsets`."""
    breaks = (torch.nonzero(offsets[1:] - offsets[:-1] != 1).flatten() + 1).tolist()
    edges = [0, *breaks, offsets.numel()]
    return list(zip(edges[:-1], edges[1:]))


class _Plan:
    """One head, or heads sharing a layout, ready to compute any chunk of its query blocks.

    Rows are blocked as [n_blocks, g * block, d]: the g heads' rows of one query block stacked,
    pre-scaled, float32. `compute(lo, hi)` fills `out[lo:hi]`.
    """

    def __init__(self, query, keys: _Keys, layout: Layout, scaling: float, softcap: float | None) -> None:
        g, m, dim = query.shape
        block = layout.block
        self.g, self.m, self.dim, self.block, self.softcap = g, m, dim, block, softcap
        self.n_blocks = n_blocks = -(-m // block)
        padded = torch.zeros(g, n_blocks * block, dim, dtype=torch.float32, device=query.device)
        padded[:, :m] = query.float() * scaling
        self.rows = padded.view(g, n_blocks, block, dim).transpose(0, 1).reshape(n_blocks, g * block, dim)
        self.out = torch.empty_like(self.rows)
        self.parts: list[_Part] = []
        if layout.offsets is not None and layout.offsets.numel():
            # Long runs of offsets are strided views of the keys; the short rest is gathered.
            rest = []
            for a, b in _runs(layout.offsets):
                if b - a >= LONG_RUN or layout.window is not None:
                    self.parts.append(_OffsetsPart(keys, layout.offsets[a:b], layout.window, block,
                                                   n_blocks, g))
                else:
                    rest.append(layout.offsets[a:b])
            if rest:
                self.parts.append(_OffsetsPart(keys, torch.cat(rest), None, block, n_blocks, g))
        if layout.columns is not None and layout.columns.numel():
            self.parts.append(_ColumnsPart(keys, layout, n_blocks))
        if layout.blocks is not None:
            self.parts.append(_BlocksPart(keys, layout.blocks[:n_blocks], block))
        for part in self.parts:
            part.softcap = softcap
        width = max([part.width for part in self.parts], default=1)
        self.step = max(1, CHUNK_ELEMENTS // (g * block * width))

    def compute(self, lo: int, hi: int) -> None:
        """Online softmax over the parts (flash attention's running max, sum and output)."""
        rows = self.rows[lo:hi]
        top = total = out = None
        for part in self.parts:
            scores, values = part.scores(rows, lo, hi)
            if scores.shape[-1] == 0:
                continue
            part_top = scores.amax(-1, keepdim=True)
            # A finite floor: a row that sees no key yet keeps exp(-inf - floor) = 0, never NaN.
            new_top = part_top.clamp_min(FLOOR) if top is None else torch.maximum(top, part_top)
            probs = scores.sub_(new_top).exp_()
            part_total = probs.sum(-1, keepdim=True)
            part_out = torch.matmul(probs, values)
            if top is None:
                top, total, out = new_top, part_total, part_out
                continue
            scale = torch.exp(top - new_top)
            total = total.mul_(scale).add_(part_total)
            out = out.mul_(scale).add_(part_out)
            top = new_top
        if out is None:
            self.out[lo:hi] = 0.0
        else:  # total >= 1 for a row that sees any key (its maximum adds exp(0)); 0 rows stay 0
            torch.div(out, total.clamp_min(1.0), out=self.out[lo:hi])

    def result(self) -> torch.Tensor:
        """[g, m, d] float32."""
        g, block, dim = self.g, self.block, self.dim
        out = self.out.view(self.n_blocks, g, block, dim).transpose(0, 1).reshape(g, -1, dim)
        return out[:, :self.m]


def _cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2-style logit soft-capping, in place, before any mask."""
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    return scores


class _Part:
    width: int
    softcap: float | None = None

    def scores(self, rows: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked scores [c, r, w] of query blocks lo..hi-1 and the matching values ([c, w, d] or [w, d])."""
        raise NotImplementedError


class _OffsetsPart(_Part):
    """Block b sees keys b*block + offsets: a strided view of the keys when the offsets are one run."""

    def __init__(self, keys: _Keys, offsets, window: int | None, block: int, n_blocks: int, g: int) -> None:
        device = keys.key.device
        front = keys.front
        self.key, self.value = keys.key, keys.value
        self.offsets, self.width = offsets, offsets.numel()
        width = self.width
        # Causality (and the window) depend only on (row in block, offset): one bias for all blocks,
        # added only to the columns it masks (the offsets within one block of the row).
        in_block = torch.arange(block, device=device)[:, None]
        visible = offsets[None] <= in_block
        if window is not None:
            visible &= (in_block - offsets[None]) < window
        bias = torch.zeros(block, width, device=device).masked_fill_(~visible, float("-inf")).repeat(g, 1)
        masked = torch.nonzero((~visible).any(0)).flatten()
        self.bias = [(a, b, bias[:, a:b]) for a, b in _ranges(masked)]  # A-shape: the window's two edges
        # Offsets may reach before key 0: block b's valid offsets start at index first_valid[b].
        self.starts = torch.arange(n_blocks, device=device) * block
        self.first_valid = torch.searchsorted(offsets, -self.starts).tolist()
        self.contiguous = int(offsets[-1] - offsets[0]) == width - 1
        if self.contiguous:
            shift = front + int(offsets[0])
            self.key_view = self.key[shift:].unfold(0, width, block)  # [windows, d, width], no copy
            self.value_view = self.value[shift:].unfold(0, width, block).transpose(1, 2)
        else:
            self.index = offsets + front  # block b reads padded rows b*block + index

    def scores(self, rows, lo, hi):
        # Offsets before key 0 for every block of the chunk are skipped; those before key 0 for only
        # some of its blocks (a narrow range: offsets are sorted) are masked.
        skip, partial = self.first_valid[hi - 1], self.first_valid[lo]
        if self.contiguous:
            values = self.value_view[lo:hi, skip:]
            # One mm per block: a batched matmul over these overlapping windows copies them first (2x slower).
            scores = rows.new_empty(hi - lo, rows.shape[1], self.width - skip)
            for i, block in enumerate(range(lo, hi)):
                torch.mm(rows[i], self.key_view[block, :, skip:], out=scores[i])
            scores = _cap(scores, self.softcap)
        else:
            flat = (self.starts[lo:hi, None] + self.index[None, skip:]).reshape(-1)
            shape = (hi - lo, self.width - skip, self.key.shape[-1])
            keys = self.key.index_select(0, flat).view(shape)
            values = self.value.index_select(0, flat).view(shape)
            scores = _cap(torch.matmul(rows, keys.transpose(1, 2)), self.softcap)
        for a, b, bias in self.bias:
            if b > skip:
                scores[..., max(a, skip) - skip:b - skip].add_(bias[:, max(a, skip) - a:])
        if partial > skip:
            before = (self.starts[lo:hi, None] + self.offsets[None, skip:partial]) < 0  # [c, offsets]
            scores[..., :partial - skip].masked_fill_(before[:, None], float("-inf"))
        return scores, values


class _ColumnsPart(_Part):
    """Columns every later row sees; a chunk only computes the columns at or before its last row."""

    def __init__(self, keys: _Keys, layout: Layout, n_blocks: int) -> None:
        block, columns = layout.block, layout.columns
        self.block, self.columns, self.window = block, columns, layout.window
        self.key = keys.key.index_select(0, columns + keys.front)
        self.value = keys.value.index_select(0, columns + keys.front)
        device = keys.key.device
        self.width = columns.numel()
        self.skip = None
        if layout.window is None and layout.offsets is not None and layout.offsets.numel():
            # A column that block b's offsets already cover is counted there, not here.
            rel = columns[None] - torch.arange(n_blocks, device=device)[:, None] * block
            low = int(layout.offsets[0])
            table = torch.zeros(block - low, dtype=torch.bool, device=device)
            table[layout.offsets - low] = True
            inside = (rel >= low) & (rel < block)
            self.skip = torch.zeros_like(inside)
            self.skip[inside] = table[rel[inside] - low]
        # Per query block: columns every row sees (`sure`), columns some row sees (`stop`).
        lag = self.window or 0  # with a window, row q sees column c only if q - c >= window
        starts = torch.arange(n_blocks, device=device) * block
        self.sure = torch.searchsorted(columns, starts - lag, right=True).tolist()
        self.stop = torch.searchsorted(columns, starts + block - 1 - lag, right=True).tolist()
        self.reach = (starts[:, None] + torch.arange(block, device=device)) - lag  # [n_blocks, block]

    def scores(self, rows, lo, hi):
        stop = self.stop[hi - 1]
        sure = min(stop, self.sure[lo])
        scores = _cap(torch.matmul(rows, self.key[:stop].T), self.softcap)
        if stop > sure:  # columns visible to only some rows of the chunk
            reach = self.reach[lo:hi].repeat(1, rows.shape[1] // self.block)
            scores[..., sure:stop].masked_fill_(self.columns[sure:stop] > reach[..., None], float("-inf"))
        if self.skip is not None:
            scores.masked_fill_(self.skip[lo:hi, None, :stop], float("-inf"))
        return scores, self.value[:stop]


class _BlocksPart(_Part):
    """Per query block, its chosen key blocks, gathered; a chunk computes only as many key blocks as
    its fullest query block chose (-1 entries read an all-zero, masked block)."""

    def __init__(self, keys: _Keys, chosen: torch.Tensor, block: int) -> None:
        n_key_blocks = -(-keys.n // block)
        rows = slice(keys.front, keys.front + (n_key_blocks + 1) * block)  # the padding ends in a zero block
        self.key = keys.key[rows].view(n_key_blocks + 1, block, -1)
        self.value = keys.value[rows].view(n_key_blocks + 1, block, -1)
        device = keys.key.device
        chosen = chosen.gather(1, torch.argsort((chosen < 0).to(torch.int8), dim=1, stable=True))  # -1s last
        self.counts = (chosen >= 0).sum(1)
        self.row_pos = torch.arange(chosen.shape[0] * block, device=device).view(-1, block)
        self.safe = torch.where(chosen >= 0, chosen, n_key_blocks)
        self.block, self.width = block, chosen.shape[1] * block
        key_pos = self.safe[:, :, None] * block + torch.arange(block, device=device)
        self.key_pos = torch.where(chosen[:, :, None] >= 0, key_pos, 1 << 62).reshape(chosen.shape[0], -1)

    def scores(self, rows, lo, hi):
        k = int(self.counts[lo:hi].max())
        index = self.safe[lo:hi, :k].reshape(-1)
        shape = (hi - lo, k * self.block, self.key.shape[-1])
        keys = self.key.index_select(0, index).view(shape)
        values = self.value.index_select(0, index).view(shape)
        scores = _cap(torch.matmul(rows, keys.transpose(1, 2)), self.softcap)
        pos = self.row_pos[lo:hi].repeat(1, rows.shape[1] // self.block)
        scores.masked_fill_(self.key_pos[lo:hi, None, :k * self.block] > pos[..., None], float("-inf"))
        return scores, values


# ---- fast kernel over contiguous key ranges (CPU flash attention) -----------------------------------

try:  # PyTorch's fused CPU flash-attention kernel, which also returns the rows' log-sum-exp
    _FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # pragma: no cover - older PyTorch
    _FLASH = None
COLUMN_GROUP = 16  # query blocks per columns call: they share one prefix of the columns


def flash_fits(layout: Layout, device: torch.device, softcap: float | None) -> bool:
    """Whether `_FlashPlan` computes this layout: on CPU, without soft-capping, for columns plus
    offsets that hold the whole own block [0, block) (every vertical-slash layout: its most local
    diagonals are always kept), no window and no blocks."""
    offsets = layout.offsets
    if _FLASH is None or device.type != "cpu" or softcap is not None or layout.window is not None \
            or layout.blocks is not None or offsets is None or offsets.numel() < layout.block:
        return False
    return bool(offsets[-layout.block] == 0) and int(offsets[-1]) == layout.block - 1


class _FlashPlan:
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

    def __init__(self, query, keys: _Keys, layout: Layout, scaling: float) -> None:
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
        runs = _ranges(layout.offsets)
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
