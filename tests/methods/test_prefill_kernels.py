"""The sparse prefill kernel equals dense masked softmax under the same pattern, on awkward shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvlife.attention import AttnCall, reference_attention
from kvlife.methods.prefill import flash_kernel, kernels, matmul_kernel
from kvlife.methods.prefill.estimate import (
    FORCED_COLUMNS,
    FORCED_DIAGONALS,
    a_shape_layout,
    block_layout,
    diagonal_offsets,
    diagonal_sums,
    fill_gaps,
    offset_values,
    select_vertical_slash,
    vertical_slash_sums,
)
from kvlife.methods.prefill.kernels import Layout, layout_mask, sparse_attention
from kvlife.methods.prefill.minference import full_layout

TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(autouse=True, params=[4096, 40000])
def small_chunks(monkeypatch, request):
    # One or several blocks per chunk, and runs of offsets read as views from 8 on: every path runs.
    monkeypatch.setattr(matmul_kernel, "CHUNK_ELEMENTS", request.param)
    monkeypatch.setattr(matmul_kernel, "LONG_RUN", 8)
    yield  # one torch thread: conftest.py's one_thread


def random_call(
    n: int, heads: int = 6, kv_heads: int = 2, dim: int = 8, seed: int = 0, softcap=None
) -> AttnCall:
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, heads, n, dim, generator=gen) * 2
    key = torch.randn(1, kv_heads, n, dim, generator=gen) * 2
    value = torch.randn(1, kv_heads, n, dim, generator=gen)
    pos = torch.arange(n)
    return AttnCall(0, query, key, value, pos, pos.expand(kv_heads, n).clone(), dim**-0.5, softcap=softcap)


def random_layouts(n: int, heads: int, seed: int) -> list[Layout]:
    gen = torch.Generator().manual_seed(seed)
    n_blocks = -(-n // kernels.BLOCK)
    layouts = []
    for head in range(heads):
        kind = head % 3
        if kind == 0:  # columns and scattered diagonals (gathered and viewed runs)
            columns = torch.randperm(n, generator=gen)[: max(1, n // 7)].sort().values
            diagonals = torch.cat([torch.arange(3), torch.randperm(n, generator=gen)[:4]]).unique()
            layouts.append(Layout(columns=columns, offsets=diagonal_offsets(diagonals, n)))
        elif kind == 1:  # blocks, unevenly many per query block
            chosen = torch.randint(-1, n_blocks, (n_blocks, 3), generator=gen)
            layouts.append(block_layout(chosen))
        else:  # A-shape with an odd window
            layouts.append(a_shape_layout(n, 5, 37 + head) or full_layout(n))
    return layouts


def expected(call: AttnCall, layouts: list[Layout]) -> torch.Tensor:
    n, heads = call.query.shape[2], call.query.shape[1]
    masks = torch.stack([layout_mask(layout, n) for layout in layouts])
    return reference_attention(call, mask=masks.expand(heads, -1, -1))


@pytest.mark.parametrize("n", [65, 127, 200, 333])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("flash", [True, False])
def test_per_head_layouts_equal_reference(n, threads, flash, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    if not flash:  # the matmul kernel for every layout (as on devices without the fused kernel)
        monkeypatch.setattr(flash_kernel, "_FLASH", None)
    call = random_call(n, seed=n)
    layouts = random_layouts(n, 6, seed=n)
    got = sparse_attention(call.query[0], call.key[0], call.value[0], layouts, call.scaling)
    torch.testing.assert_close(got[None], expected(call, layouts), **TOL)


@pytest.mark.parametrize("n", [70, 259])
def test_shared_layout_stacks_group_heads(n):
    call = random_call(n, heads=6, kv_heads=2)
    layout = a_shape_layout(n, 3, 50)
    got = sparse_attention(call.query[0], call.key[0], call.value[0], [layout], call.scaling)
    torch.testing.assert_close(got[None], expected(call, [layout]), **TOL)


def test_softcap_and_fewer_query_rows():
    n = 150
    call = random_call(n, softcap=5.0)
    layouts = random_layouts(n, 6, seed=3)
    rows = 101  # rows 0..100 only (Tri-shape computes the last rows densely)
    got = sparse_attention(
        call.query[0, :, :rows], call.key[0], call.value[0], layouts, call.scaling, call.softcap
    )
    torch.testing.assert_close(got[None], expected(call, layouts)[:, :, :rows], **TOL)


@pytest.mark.parametrize("n", [97, 200])
def test_patterns_covering_every_key_reproduce_dense(n):
    call = random_call(n, heads=4, kv_heads=2)
    dense = F.scaled_dot_product_attention(
        call.query,
        call.key.repeat_interleave(2, 1),
        call.value.repeat_interleave(2, 1),
        is_causal=True,
        scale=call.scaling,
    )
    n_blocks = -(-n // kernels.BLOCK)
    every_block = torch.arange(n_blocks).expand(n_blocks, -1)
    covering = [
        full_layout(n),  # every diagonal
        Layout(columns=torch.arange(n), offsets=torch.arange(0, kernels.BLOCK)),  # every column
        block_layout(every_block),  # every causal block
        Layout(
            columns=torch.arange(10), offsets=torch.arange(-(n - 1), kernels.BLOCK), window=n
        ),  # window >= n
    ]
    for layout in covering:
        assert bool(layout_mask(layout, n).equal(torch.ones(n, n, dtype=torch.bool).tril()))
        got = sparse_attention(call.query[0], call.key[0], call.value[0], [layout] * 4, call.scaling)
        torch.testing.assert_close(got[None], dense, **TOL)


def test_diagonals_widen_to_the_query_block():
    n, block = 300, kernels.BLOCK
    offsets = diagonal_offsets(torch.tensor([0, 130]), n)
    assert offsets.tolist() == list(range(-130, -130 + block)) + list(range(0, block))
    mask = layout_mask(Layout(offsets=offsets), n)
    # Row 200 (block 3, rows 192..255) sees keys 62..125 and 192..200.
    assert torch.nonzero(mask[200]).flatten().tolist() == list(range(62, 126)) + list(range(192, 201))


def vertical_slash_layouts(n: int, heads: int, seed: int) -> list[Layout]:
    """Columns plus offsets holding the own block: what the flash-attention plan computes. Runs of
    offsets straddle key 0, some columns lie inside the offsets, some blocks see no column."""
    gen = torch.Generator().manual_seed(seed)
    layouts = []
    for head in range(heads):
        columns = torch.randperm(n, generator=gen)[: 1 + head * n // 9].sort().values
        diagonals = torch.cat([torch.arange(2), torch.randperm(n, generator=gen)[:1 + head]]).unique()
        offsets = fill_gaps(diagonal_offsets(diagonals, n), 1 + 20 * (head % 3))
        layouts.append(Layout(columns=columns if head % 4 else None, offsets=offsets))
    return layouts


@pytest.mark.parametrize("n", [65, 131, 257, 450])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (3, 3)])
def test_flash_plan_equals_reference(n, heads, kv_heads, monkeypatch):
    used, plan = [], kernels.FlashPlan
    monkeypatch.setattr(kernels, "FlashPlan", lambda *args: used.append(1) or plan(*args))
    call = random_call(n, heads=heads, kv_heads=kv_heads, seed=n)
    layouts = vertical_slash_layouts(n, heads, seed=n)
    for shared in (layouts, layouts[1:2]):
        got = sparse_attention(call.query[0], call.key[0], call.value[0], shared, call.scaling)
        torch.testing.assert_close(got[None], expected(call, shared), **TOL)
    assert len(used) == heads + kv_heads  # per head, then per KV group with the shared layout
    # Fewer query rows than keys, as Tri-shape runs it.
    got = sparse_attention(call.query[0, :, :n - 7], call.key[0], call.value[0], layouts, call.scaling)
    torch.testing.assert_close(got[None], expected(call, layouts)[:, :, :n - 7], **TOL)


def test_flash_plan_only_where_it_fits():
    n, cpu = 300, torch.device("cpu")
    vertical_slash = Layout(columns=torch.arange(5), offsets=diagonal_offsets(torch.tensor([0, 100]), n))
    assert kernels.flash_fits(vertical_slash, cpu, None)
    assert not kernels.flash_fits(vertical_slash, cpu, 5.0)  # soft-capping: the matmul kernel
    # not the whole own block
    assert not kernels.flash_fits(Layout(offsets=torch.arange(-100, 40)), cpu, None)
    assert not kernels.flash_fits(a_shape_layout(n, 4, 64), cpu, None)  # a window
    assert not kernels.flash_fits(block_layout(torch.zeros(5, 1, dtype=torch.long)), cpu, None)


def test_offset_values_sum_the_diagonals_each_offset_meets():
    n, block = 200, kernels.BLOCK
    slash = torch.rand(n, generator=torch.Generator().manual_seed(0))
    values = offset_values(slash, n, block)
    for f in (-(n - 1), -150, -64, -1, 0, 5, block - 1):
        want = sum(float(slash[r - f]) for r in range(block) if 0 <= r - f < n)
        assert abs(float(values[f + n - 1]) - want) < 1e-4


def test_fill_gaps():
    offsets = torch.tensor([-300, -200, -199, -150, -10, -5, 0, 1])
    assert fill_gaps(offsets, 10).tolist() == [-300, -200, -199, -150, *range(-10, 2)]
    assert fill_gaps(offsets, 1).equal(offsets)


@pytest.mark.parametrize("n", [150, 1000])
def test_select_vertical_slash_keeps_budget_and_forced_keys(n):
    gen = torch.Generator().manual_seed(n)
    rows = 64
    scores = torch.randn(rows, n, generator=gen) * 3
    position = torch.arange(n - rows, n)
    probs = torch.softmax(scores.masked_fill(torch.arange(n)[None] > position[:, None], float("-inf")), -1)
    columns, offsets = select_vertical_slash(probs, n, vertical_size=40, slash_size=200)
    assert columns.tolist() == sorted(set(columns.tolist())) and len(columns) == min(n, 40)
    assert set(range(min(n, FORCED_COLUMNS))) <= set(columns.tolist())
    local = set(range(-(FORCED_DIAGONALS - 1), kernels.BLOCK))
    assert local <= set(offsets.tolist()) and int(offsets.max()) == kernels.BLOCK - 1
    assert offsets.tolist() == sorted(set(offsets.tolist())) and int(offsets.min()) > -n
    assert len(offsets) >= min(200, n - 1 + kernels.BLOCK)  # the budget, plus the gaps filled
    assert kernels.flash_fits(Layout(columns=columns, offsets=offsets), torch.device("cpu"), None)
    # The one-view diagonal sums equal the per-row ones.
    torch.testing.assert_close(
        diagonal_sums(probs), vertical_slash_sums(probs[None])[1][0], atol=1e-5, rtol=1e-5
    )


def test_blocks_do_not_mix_with_other_parts():
    blocks = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="only blocks"):
        Layout(columns=torch.arange(3), blocks=blocks)
    with pytest.raises(ValueError, match="only blocks"):
        Layout(offsets=torch.arange(64), blocks=blocks)
