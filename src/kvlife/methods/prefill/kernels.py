"""Sparse prefill attention: `sparse_attention` runs one `Layout` per head (or one shared by all)
on the fastest kernel that computes it, per head: `flash_kernel.FlashPlan` (PyTorch's fused CPU
flash attention over contiguous key ranges) where `flash_fits`, else `matmul_kernel.MatmulPlan`
(plain matmuls, any layout, any device). Both split the query blocks into tasks; on CPU the tasks
are spread over `torch.get_num_threads()` worker threads, each running single-threaded ops (see
`_run`).

The pattern itself (`Layout`, `BLOCK`, `layout_mask`, `plain_causal`) lives in `layout.py` and is
imported from here too, as the prefill methods do.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from kvlife.methods.prefill.flash_kernel import FlashPlan, flash_fits
from kvlife.methods.prefill.layout import BLOCK, Layout, layout_device, layout_mask, plain_causal
from kvlife.methods.prefill.matmul_kernel import Keys, MatmulPlan, pad

__all__ = ["BLOCK", "FlashPlan", "Layout", "flash_fits", "layout_device", "layout_mask", "plain_causal",
           "sparse_attention"]


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
        padded.append(Keys(pad(key[kv].float(), front, back), pad(value[kv].float(), front, back),
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


def _plan(query, keys: Keys, layout: Layout, scaling: float, softcap: float | None):
    if flash_fits(layout, query.device, softcap):
        return FlashPlan(query, keys, layout, scaling)
    return MatmulPlan(query, keys, layout, scaling, softcap)


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

