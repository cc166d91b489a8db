"""kvlife's dense path equals transformers' own sdpa logits."""

import pytest
import torch

from kvlife.attention import AttnCall, StepContext, dense_attention, reference_attention
from kvlife.cache import KVCache, cache_kwarg
from tiny import tiny_model

KINDS = ["llama", "qwen2", "gemma3"]


@pytest.mark.parametrize("kind", KINDS)
def test_dense_matches_sdpa_prefill_extend_decode(kind):
    ref, ours = tiny_model(kind, attn="sdpa"), tiny_model(kind)
    ids = torch.randint(1, 256, (1, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        cache = KVCache.for_model(ours)
        pieces = [(0, 25), (25, 33)] + [(i, i + 1) for i in range(33, 41)]
        got = []
        for start, stop in pieces:
            pos = torch.arange(start, stop)
            phase = "prefill" if start == 0 else ("extend" if stop - start > 1 else "decode")
            out = ours(ids[:, start:stop], **cache_kwarg(ours, cache), position_ids=pos[None],
                       kvlife=StepContext(cache, pos, phase=phase))
            got.append(out.logits)
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_plain_forward_without_session_matches_sdpa(kind):
    ref, ours = tiny_model(kind, attn="sdpa"), tiny_model(kind)
    ids = torch.randint(1, 256, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_gemma3_sliding_layers_keep_only_the_window():
    model = tiny_model("gemma3")
    cache = KVCache.for_model(model)
    pos = torch.arange(30)
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 30)), **cache_kwarg(model, cache), position_ids=pos[None],
              kvlife=StepContext(cache, pos))
    windows = [layer.sliding_window for layer in cache.layers]
    assert windows == [8, 8, None, 8]
    assert cache.tokens_held() == [7, 7, 30, 7]
    assert cache.layers[0].positions[0].tolist() == list(range(23, 30))


def _random_call(q_len, k_len, heads=4, kv_heads=2, dim=8, window=None, seed=0, shuffle=False):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, heads, q_len, dim, generator=gen)
    key = torch.randn(1, kv_heads, k_len, dim, generator=gen)
    value = torch.randn(1, kv_heads, k_len, dim, generator=gen)
    k_pos = torch.arange(k_len).expand(kv_heads, k_len).clone()
    if shuffle:  # head-wise eviction: different positions per head, gaps
        k_pos = torch.stack(
            [torch.randperm(3 * k_len, generator=gen)[:k_len].sort().values for _ in range(kv_heads)]
        )
    q_pos = torch.arange(int(k_pos.max()) + 1 - q_len, int(k_pos.max()) + 1)
    return AttnCall(0, query, key, value, q_pos, k_pos, dim**-0.5, window)


@pytest.mark.parametrize("q_len,k_len,window,shuffle", [
    (37, 37, None, False), (1, 50, None, False), (5, 50, None, False), (37, 37, 7, False),
    (1, 50, 7, False), (9, 40, None, True), (1, 40, None, True), (3, 40, 11, True),
])
def test_dense_fast_paths_equal_reference(q_len, k_len, window, shuffle):
    call = _random_call(q_len, k_len, window=window, shuffle=shuffle)
    torch.testing.assert_close(dense_attention(call), reference_attention(call), atol=1e-5, rtol=1e-5)


def test_long_query_chunks_equal_reference(monkeypatch):
    import kvlife.attention as attention

    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    for window in (None, 9):
        call = _random_call(70, 70, window=window)
        torch.testing.assert_close(dense_attention(call), reference_attention(call), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_embedded_model_dense_matches_sdpa(real_model):
    from transformers import AutoModelForCausalLM

    from kvlife import models
    from kvlife.session import Session

    # float32 on both sides: `real_model` loads at the "auto" dtype, bfloat16 on a CPU with native
    # bfloat16 (AMX, AVX512_BF16), where the logits differ from float32 sdpa's by up to ~0.8
    model, tokenizer = models.load(models.TEST_MODEL, dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(
        str(models.resolve(models.TEST_MODEL)), attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    session = Session(model, tokenizer, "dense")
    session.cache = session.new_cache()
    got = torch.cat([session.forward(ids[:40], "prefill", all_logits=True),
                     session.forward(ids[40:], "extend", all_logits=True)])
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
