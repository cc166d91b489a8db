"""Online pattern estimation (MInference, FlexPrefill) and the layouts the patterns build.

Estimates are cheap next to the attention they steer: the last `last_q` queries against every key
(vertical-slash: one [last_q, n] softmax per head), or mean-pooled query and key blocks
(block-sparse: one [n/64, n/64] softmax per head).
"""

from __future__ import annotations

import torch

from kvlife.attention import AttnCall
from kvlife.methods.prefill.kernels import BLOCK, Layout

FORCED_COLUMNS = 30  # MInference always keeps the first 30 columns (the attention sinks) ...
FORCED_DIAGONALS = 100  # ... and the 100 most local diagonals.
GAP = 64  # vertical-slash offsets fill gaps shorter than this between their runs (see fill_gaps)


def a_shape_layout(n: int, n_init: int, n_local: int, device: torch.device | str = "cpu") -> Layout | None:
    """The first `n_init` keys plus a sliding window of `n_local` keys (the row's own included);
    None when that covers every key (n <= n_init + n_local)."""
    if n <= n_init + n_local:
        return None
    columns = torch.arange(n_init, device=device) if n_init > 0 else None
    offsets = torch.arange(-(n_local - 1), BLOCK, device=device)
    return Layout(columns=columns, offsets=offsets, window=n_local)


def _scores(call: AttnCall, query: torch.Tensor, kv_head: int) -> torch.Tensor:
    """float32 scores of query rows [g, r, d] against every key of one KV head: [g, r, n]."""
    scores = torch.matmul(query.float() * call.scaling, call.key[0, kv_head].float().T)
    if call.softcap is not None:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    return scores


def last_query_probs(call: AttnCall, heads: list[int], last_q: int) -> torch.Tensor:
    """Attention probabilities of the last `last_q` query rows of `heads`: float32 [h, last_q, n]."""
    n, groups = call.query.shape[2], call.groups
    last_q = min(last_q, n)
    out = torch.empty(len(heads), last_q, n, device=call.query.device)
    rows = torch.arange(n - last_q, n, device=call.query.device)
    future = torch.arange(n, device=call.query.device)[None] > rows[:, None]
    for kv_head in sorted({head // groups for head in heads}):
        index = [i for i, head in enumerate(heads) if head // groups == kv_head]
        query = call.query[0, [heads[i] for i in index], n - last_q:]
        scores = _scores(call, query, kv_head)
        scores[..., n - last_q:].masked_fill_(future[:, n - last_q:], float("-inf"))  # the only future keys
        out[index] = torch.softmax(scores, dim=-1)
    return out


def vertical_slash_sums(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass per key column and per diagonal (offset query - key) from the last rows'
    probabilities [h, r, n]: (vertical [h, n], slash [h, n], slash[o] = mass at distance o)."""
    h, rows, n = probs.shape
    vertical = probs.sum(1)
    slash = torch.zeros(h, n, device=probs.device)
    for r in range(rows):
        reach = n - rows + r + 1  # row r sits at position n - rows + r and sees keys 0..that
        slash[:, :reach] += probs[:, r, :reach].flip(-1)
    return vertical, slash


def top_columns(vertical: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` heaviest columns of [n] scores, the first FORCED_COLUMNS always among them; sorted."""
    n = vertical.shape[-1]
    scores = vertical.clone()
    scores[:FORCED_COLUMNS] = float("inf")
    return torch.topk(scores, min(n, max(size, FORCED_COLUMNS)), sorted=False).indices.sort().values


def top_diagonals(slash: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` heaviest diagonals (offsets query - key) of [n] scores, the FORCED_DIAGONALS most
    local always among them."""
    n = slash.shape[-1]
    scores = slash.clone()
    scores[:FORCED_DIAGONALS] = float("inf")
    return torch.topk(scores, min(n, max(size, FORCED_DIAGONALS)), sorted=False).indices


def diagonal_offsets(diagonals: torch.Tensor, n: int, block: int = BLOCK) -> torch.Tensor:
    """Block-relative key offsets covered by diagonals widened to the query block, as MInference's
    kernel computes them: diagonal o gives the rows of a block the keys [start - o, start + block - o)."""
    device = diagonals.device
    diff = torch.zeros(n + block + 1, dtype=torch.int32, device=device)  # index = offset + n - 1
    ones = torch.ones_like(diagonals, dtype=torch.int32)
    diff.index_add_(0, n - 1 - diagonals, ones)
    diff.index_add_(0, n - 1 + block - diagonals, -ones)
    covered = diff.cumsum(0)[: n - 1 + block] > 0
    return torch.nonzero(covered).flatten() - (n - 1)


def vertical_slash_layout(columns: torch.Tensor, diagonals: torch.Tensor, n: int) -> Layout:
    return Layout(columns=columns, offsets=diagonal_offsets(diagonals, n))


def pooled_block_scores(call: AttnCall, head: int) -> torch.Tensor:
    """Block attention estimate of one query head: softmax over causal key blocks of the mean-pooled
    query blocks against the mean-pooled key blocks; float32 [n_blocks, n_blocks] (0 above the diagonal)."""
    n = call.query.shape[2]
    n_blocks = -(-n // BLOCK)
    counts = torch.full((n_blocks, 1), float(BLOCK), device=call.query.device)
    counts[-1] = n - (n_blocks - 1) * BLOCK

    def pool(rows: torch.Tensor) -> torch.Tensor:
        padded = rows.float().new_zeros(n_blocks * BLOCK, rows.shape[-1])
        padded[:n] = rows.float()
        return padded.view(n_blocks, BLOCK, -1).sum(1) / counts

    query, key = pool(call.query[0, head]), pool(call.key[0, head // call.groups])
    scores = torch.matmul(query, key.T) * call.scaling
    if call.softcap is not None:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    upper = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=scores.device).triu(1)
    return torch.softmax(scores.masked_fill_(upper, float("-inf")), dim=-1)


def block_layout(chosen: torch.Tensor) -> Layout:
    """A block-sparse layout from chosen key blocks [n_blocks, k] (-1 = none); the first key block
    and each query block's own (diagonal) block are always added."""
    n_blocks = chosen.shape[0]
    own = torch.arange(n_blocks, device=chosen.device)[:, None]
    chosen = torch.cat([torch.zeros_like(own), own, chosen], dim=1)
    chosen = torch.where((chosen >= 0) & (chosen <= own), chosen, -1)
    # Drop repeats within a row (each key block is attended once).
    chosen = chosen.sort(dim=1, descending=True).values
    repeat = torch.zeros_like(chosen, dtype=torch.bool)
    repeat[:, 1:] = chosen[:, 1:] == chosen[:, :-1]
    chosen = chosen.masked_fill(repeat, -1).sort(dim=1, descending=True).values
    width = int((chosen >= 0).sum(1).max())
    return Layout(blocks=chosen[:, :width])


def top_blocks(scores: torch.Tensor, top_k: int) -> Layout:
    """Block-sparse layout keeping each query block's `top_k` heaviest causal key blocks."""
    k = min(top_k, scores.shape[-1])
    values, index = torch.topk(scores, k, dim=-1)
    return block_layout(torch.where(values > 0, index, -1))


def offset_values(slash: torch.Tensor, n: int, block: int = BLOCK) -> torch.Tensor:
    """Estimated attention mass per block-relative key offset f in [-(n-1), block) (index f + n - 1)
    from the mass per diagonal `slash` [n]: row r of a query block sees offset f on diagonal r - f,
    so f's value is the mass of diagonals -f .. block-1-f (the block's rows alike)."""
    total = torch.zeros(n + 1, dtype=slash.dtype, device=slash.device)
    total[1:] = slash.cumsum(0)
    f = torch.arange(-(n - 1), block, device=slash.device)
    return total[(block - f).clamp(max=n)] - total[(-f).clamp(min=0)]


def diagonal_sums(probs: torch.Tensor) -> torch.Tensor:
    """Mass per diagonal [n] of the last rows' probabilities [r, n] (as `vertical_slash_sums`, in one
    op): row i (position n - r + i) meets diagonal n - 1 - t at key i + 1 - r + t, so a strided view
    of the rows zero-padded before key 0 lines up the diagonals in columns t (reversed after)."""
    rows, n = probs.shape
    padded = torch.zeros(rows, n + rows, device=probs.device)
    padded[:, rows:] = probs
    return padded.as_strided((rows, n), (n + rows + 1, 1), 1).sum(0).flip(0)


def _less_keys(slash: torch.Tensor, probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`slash` (diagonal sums of `probs` [r, n]) without the mass of columns `keys`."""
    rows, n = probs.shape
    diagonals = (torch.arange(n - rows, n, device=probs.device)[:, None] - keys[None]).flatten()
    mass = probs[:, keys].flatten()
    seen = diagonals >= 0
    return slash.index_add(0, diagonals[seen], mass[seen], alpha=-1.0)


def fill_gaps(offsets: torch.Tensor, gap: int) -> torch.Tensor:
    """Sorted unique offsets with every gap shorter than `gap` between two of them filled: the kernel
    reads a run of offsets as one dense slice per query block, and a short slice costs ~2x per key
    what a long one does, so a small gap is cheaper computed (and its attention kept) than skipped."""
    if offsets.numel() < 2 or gap <= 1:
        return offsets
    steps = offsets[1:] - offsets[:-1]
    fill = (steps > 1) & (steps < gap)
    if not bool(fill.any()):
        return offsets
    extra = [torch.arange(int(a) + 1, int(b), device=offsets.device)
             for a, b in zip(offsets[:-1][fill].tolist(), offsets[1:][fill].tolist())]
    return torch.cat([offsets, *extra]).sort().values


def select_vertical_slash(probs: torch.Tensor, n: int, vertical_size: int, slash_size: int,
                          block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's vertical-slash pattern from its last rows' attention `probs` [r, n] (the rows at
    positions n-r .. n-1): (columns, offsets), both sorted.

    The budget is what the kernel computes: `slash_size` block-relative offsets (each one key per
    query row), picked by the mass of the diagonals each covers over a query block (so heavy
    diagonals come with their neighbours, in contiguous ranges the kernel reads as dense slices), the
    own block and the FORCED_DIAGONALS most local diagonals always among them; then `vertical_size`
    columns, the first FORCED_COLUMNS always among them, picked by the mass the offsets do not
    already hold, and the offsets re-picked on the mass the columns do not hold (a heavy column is
    also a heavy run of diagonals on the last rows; kept as a column, it costs no offsets)."""
    rows = probs.shape[0]
    device = probs.device
    forced_low = -(FORCED_DIAGONALS - 1)
    size = min(n - 1 + block, max(slash_size, block - forced_low))
    first = torch.arange(min(FORCED_COLUMNS, n), device=device)

    def offsets_of(slash: torch.Tensor) -> torch.Tensor:
        values = offset_values(slash, n, block)
        values[forced_low + n - 1:] = float("inf")
        offsets = torch.topk(values, size, sorted=False).indices.sort().values - (n - 1)
        return fill_gaps(offsets, GAP)

    slash = diagonal_sums(probs)
    offsets = offsets_of(_less_keys(slash, probs, first))
    # Columns on the mass the offsets leave (per query block of the last rows: its keys start + offsets).
    vertical = probs.sum(0)
    positions = torch.arange(n - rows, n, device=device)
    for start in torch.unique(positions // block * block).tolist():
        keys = offsets + start
        keys = keys[(keys >= 0) & (keys < n)]
        vertical.index_add_(0, keys, probs[positions // block * block == start][:, keys].sum(0), alpha=-1.0)
    vertical[first] = float("inf")
    columns = torch.topk(vertical, min(n, max(vertical_size, len(first))), sorted=False).indices.sort().values
    return columns, offsets_of(_less_keys(slash, probs, columns))
