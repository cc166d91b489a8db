"""The sparse prefill kernel equals dense masked softmax under the same pattern, on awkward shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvlife.attention import AttnCall, reference_attention
from kvlife.methods.prefill import kernels
from kvlife.methods.prefill.estimate import a_shape_layout, block_layout, diagonal_offsets
from kvlife.methods.prefill.kernels import Layout, layout_mask, sparse_attention
from kvlife.methods.prefill.minference import full_layout

TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(autouse=True, params=[4096, 40000])
def small_chunks(monkeypatch, request):
    # One or several blocks per chunk, and runs of offsets read as views from 8 on: every path runs.
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", request.param)
    monkeypatch.setattr(kernels, "LONG_RUN", 8)
    # Tiny tensors: intra-op thread hand-offs cost far more than the math on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_call(n: int, heads: int = 6, kv_heads: int = 2, dim: int = 8, seed: int = 0, softcap=None) -> AttnCall:
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
def test_per_head_layouts_equal_reference(n, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
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
    got = sparse_attention(call.query[0, :, :rows], call.key[0], call.value[0], layouts, call.scaling, call.softcap)
    torch.testing.assert_close(got[None], expected(call, layouts)[:, :, :rows], **TOL)


@pytest.mark.parametrize("n", [97, 200])
def test_patterns_covering_every_key_reproduce_dense(n):
    call = random_call(n, heads=4, kv_heads=2)
    dense = F.scaled_dot_product_attention(call.query, call.key.repeat_interleave(2, 1),
                                           call.value.repeat_interleave(2, 1), is_causal=True, scale=call.scaling)
    n_blocks = -(-n // kernels.BLOCK)
    every_block = torch.arange(n_blocks).expand(n_blocks, -1)
    covering = [
        full_layout(n),  # every diagonal
        Layout(columns=torch.arange(n), offsets=torch.arange(0, kernels.BLOCK)),  # every column
        block_layout(every_block),  # every causal block
        Layout(columns=torch.arange(10), offsets=torch.arange(-(n - 1), kernels.BLOCK), window=n),  # window >= n
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
