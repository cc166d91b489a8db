"""The flex_attention path of the sparse prefill: its block mask and mask_mod are exactly the layouts'
pattern (`layout_mask`), and flex_attention under them equals the reference and kvlife's kernel."""

from __future__ import annotations

import pytest
import torch

from kvlife.methods.prefill import flex
from kvlife.methods.prefill.estimate import a_shape_layout, block_layout
from kvlife.methods.prefill.kernels import Layout, layout_mask, sparse_attention

from .test_prefill_kernels import expected, random_call, random_layouts

TOL = dict(atol=2e-5, rtol=2e-5)


def awkward_layouts(n: int) -> list[Layout]:
    """Parts that straddle tiles: a column next to a window edge, blocks and offsets that overlap."""
    n_blocks = -(-n // 64)
    return [
        Layout(columns=torch.tensor([0, 1, 63, 64, 100, n - 1]), offsets=torch.arange(-70, 64)),
        Layout(blocks=block_layout(torch.full((n_blocks, 1), 1)).blocks),  # block 1, from its own row on
        Layout(columns=torch.arange(65), offsets=torch.arange(-128, 64), window=129),  # A-shape
        Layout(
            columns=torch.arange(0, n, 3), offsets=torch.cat([torch.arange(-200, -136), torch.arange(-5, 64)])
        ),
        Layout(columns=torch.tensor([5]), offsets=torch.arange(0, 64)),
        Layout(
            blocks=block_layout(
                torch.randint(-1, n_blocks, (n_blocks, 3), generator=torch.Generator().manual_seed(n))
            ).blocks
        ),
    ]


@pytest.mark.parametrize("n", [65, 200, 333])
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("kind", ["random", "awkward"])
def test_flex_mask_is_the_layout_mask(n, tile, kind):
    layouts = random_layouts(n, 6, seed=n) if kind == "random" else awkward_layouts(n)
    want = torch.stack([layout_mask(layout, n) for layout in layouts])
    assert torch.equal(flex.flex_mask(layouts, n, 6, tile=tile), want)
    rows = torch.tensor([0, 1, 63, 64, n // 2, n - 1]).unique()
    assert torch.equal(flex.flex_mask(layouts, n, 6, rows, tile=tile), want[:, rows])
    for layout in layouts:  # one layout shared by every head
        assert torch.equal(flex.flex_mask([layout], n, 6, tile=tile)[0], layout_mask(layout, n))


def test_block_mask_skips_what_no_row_sees():
    n = 4096
    layout = a_shape_layout(n, 64, 512)
    mask = flex.flex_block_mask([layout], n, n, tile=64)
    block_mask = mask.block_mask
    tiles = int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())
    # 64 query blocks x (the sink's block + at most 10 window blocks): far fewer than causal's 2080
    assert mask.tables.slots == 64 and tiles <= 64 * 11
    assert int(block_mask.full_kv_num_blocks.sum()) > int(block_mask.kv_num_blocks.sum())  # mostly unmasked


def test_lengths_are_bucketed_and_padding_costs_no_tiles():
    assert [flex.bucket(n) for n in (65, 200, 1000, 4096, 4097, 8192, 30000, 32768)] == \
        [128, 256, 1024, 4096, 5120, 8192, 32768, 32768]
    n = 900  # bucketed to 1024: the last query block is all padding, lists no tile, attends to nothing
    mask = flex.flex_block_mask([a_shape_layout(n, 64, 256)], n, n, tile=64)
    assert mask.block_mask.seq_lengths == (1024, 64 + 1024)
    assert int(mask.block_mask.kv_num_blocks[0, 0, -1] + mask.block_mask.full_kv_num_blocks[0, 0, -1]) == 0


def test_tile_must_be_a_multiple_of_the_block():
    with pytest.raises(ValueError, match="multiple"):
        flex.flex_block_mask([a_shape_layout(300, 4, 40)], 300, 300, tile=96)


@pytest.mark.parametrize("n", [127, 200])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_eager_flex_equals_reference_and_kernel(n, shared, softcap):
    call = random_call(n, heads=6, kv_heads=2, dim=8, seed=n, softcap=softcap)
    layouts = awkward_layouts(n)
    layouts = layouts[2:3] if shared else layouts
    query, key, value = call.query[0], call.key[0], call.value[0]
    got = flex.flex_sparse_attention(
        query, key, value, layouts, call.scaling, softcap, compiled=False, tile=128
    )
    torch.testing.assert_close(got[None], expected(call, layouts), **TOL)
    torch.testing.assert_close(
        got, sparse_attention(query, key, value, layouts, call.scaling, softcap), **TOL
    )


def test_fewer_query_rows_than_keys():
    n, m = 300, 230  # Tri-shape: the last rows are computed elsewhere
    call = random_call(n, heads=6, kv_heads=2, dim=8, seed=3)
    layouts = random_layouts(n, 6, seed=3)
    query, key, value = call.query[0], call.key[0], call.value[0]
    got = flex.flex_sparse_attention(query[:, :m], key, value, layouts, call.scaling, compiled=False)
    torch.testing.assert_close(got[None], expected(call, layouts)[:, :, :m], **TOL)


def test_compiled_flex_on_cpu_equals_reference():
    """torch.compile's flex_attention (C++ on CPU, Triton on CUDA): the path a GPU takes, compiled here."""
    n = 200
    call = random_call(n, heads=6, kv_heads=2, dim=16, seed=7)
    layouts = awkward_layouts(n)
    got = flex.flex_sparse_attention(call.query[0], call.key[0], call.value[0], layouts, call.scaling)
    torch.testing.assert_close(got[None], expected(call, layouts), **TOL)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (compiles flex_attention to Triton)"
)
def test_compiled_flex_on_cuda_equals_reference():
    n = 1000
    call = random_call(n, heads=14, kv_heads=2, dim=64, seed=11)
    layouts = [Layout(**{name: None if part is None else part.cuda() for name, part in
                         (("columns", lay.columns), ("offsets", lay.offsets), ("blocks", lay.blocks))},
                      window=lay.window) for lay in random_layouts(n, 14, seed=11)]
    query, key, value = (x[0].cuda() for x in (call.query, call.key, call.value))
    got = flex.flex_sparse_attention(query, key, value, layouts, call.scaling)
    torch.testing.assert_close(
        got[None].cpu(), expected(call, random_layouts(n, 14, seed=11)), atol=1e-4, rtol=1e-4
    )
