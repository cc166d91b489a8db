"""Method-specific tests of the query-agnostic compress methods: kvzip, expected_attention, keydiff,
duo_attention (and its head split search), chunkkv. The generic invariants are in test_compress_matrix.py."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kvlife.cache import KVCache
from kvlife.cli import main
from kvlife.errors import SpecError
from kvlife.methods.base import CacheStage
from kvlife.methods.compress import head_split
from kvlife.methods.compress.adakv import PAD_POSITION, HeadwiseLayer
from kvlife.methods.compress.chunkkv import chunk_ranked
from kvlife.methods.compress.duo_attention import budget_counts, streaming_mask, water_fill
from kvlife.methods.compress.duo_search import HeadSearch, haystack, search
from kvlife.methods.compress.expected_attention import (
    ExpectedAttention,
    mean_rotation,
    query_statistics,
    unrotate,
)
from kvlife.methods.compress.keep import allocate
from kvlife.methods.compress.keydiff import KeyDiff
from kvlife.methods.compress.kvzip import FIRST_PROMPT, NEXT_PROMPT, PREVIOUS_TAIL, reconstruction_scores
from kvlife.recipe import parse
from kvlife.session import Session
from tiny import ByteTokenizer, tiny_model

CONTEXT = " ".join("".join(random.Random(seed).choices("abcdefghij", k=4)) for seed in range(60))


def session(model, recipe, mode="multi-request") -> Session:
    return Session(model, ByteTokenizer(), recipe, mode=mode, prompt_format="plain")


def stage_of(sess: Session) -> CacheStage:
    return CacheStage(sess.model, sess.cache, sess.context_ids, sess.format.encode, sess.format.query_ids(""))


def held_per_layer(cache) -> list[int]:
    return [int((layer.positions != PAD_POSITION).sum()) for layer in cache.layers]


# ---- kvzip -----------------------------------------------------------------------------------


def test_kvzip_scores_are_the_max_attention_of_the_reconstruction():
    """One chunk: every score equals the largest attention probability that any query of the
    reconstruction pass (any head of the GQA group) gives the token, from transformers' eager attention."""
    model = tiny_model("qwen2")
    sess = session(model, None)
    sess.prefill(CONTEXT)
    ids = sess.context_ids
    scores, fed, chunks = reconstruction_scores(stage_of(sess), [0, 1, 2, 3], chunk_size=10_000)
    repeat = sess.format.encode(FIRST_PROMPT) + sess.format.query_ids("") + ids
    assert (fed, chunks) == (len(repeat), 1)
    eager = tiny_model("qwen2", attn="eager")
    out = eager(input_ids=torch.tensor([ids + repeat]), output_attentions=True)
    n = len(ids)
    for layer, attention in enumerate(out.attentions):
        peak = attention[0, :, n:, :n].amax(dim=1)  # [q_heads, n]: max over the pass's queries
        want = peak.view(2, 2, n).amax(dim=1)  # max over the GQA group
        assert torch.allclose(scores[layer], want, atol=1e-5)


def test_kvzip_chunks_bound_the_pass_and_leave_the_cache_as_it_was():
    model = tiny_model("llama")
    sess = session(model, None)
    sess.prefill(CONTEXT)
    before = [(layer.keys, layer.values, layer.positions, layer.next_position) for layer in sess.cache.layers]
    stage = stage_of(sess)
    scores, fed, chunks = reconstruction_scores(stage, [0, 1, 2, 3], chunk_size=64)
    n = len(sess.context_ids)
    assert chunks == -(-n // 64)
    repeat = stage.encode("Repeat the part of the previous context exactly, starting with ")
    prompts = len(stage.encode(FIRST_PROMPT)) + (chunks - 1) * (len(repeat) + 8)
    assert fed == n + prompts + chunks * len(stage.turn_end)
    assert all(s.shape == (2, n) for s in scores.values())
    for (keys, values, positions, next_position), layer in zip(before, sess.cache.layers):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)
        assert torch.equal(positions, layer.positions) and next_position == layer.next_position
    # Chunks see less of the pass than one long pass does, so their scores differ, but not their shape.
    whole, _, _ = reconstruction_scores(stage, [0], chunk_size=10_000)
    assert not torch.allclose(whole[0], scores[0])


def eager_pass(eager, ids: list[int], repeat: list[int]):
    """transformers' eager attention probabilities and attention inputs of the pass `repeat` after `ids`."""
    out = eager(input_ids=torch.tensor([ids + repeat]), output_attentions=True, output_hidden_states=True)
    inputs = [block.input_layernorm(out.hidden_states[i]) for i, block in enumerate(eager.model.layers)]
    return out.attentions, inputs


def test_kvzip_chunk_normalization_scores_each_chunk_by_its_own_pass():
    """normalize=chunk (KVzip's code): a chunk's tokens get the largest probability from their own pass,
    the softmax taken over the sinks, the chunk and the pass only: eager attention renormalised there."""
    sess = session(tiny_model("qwen2"), None)
    sess.prefill(CONTEXT)
    ids, stage, size, sink = sess.context_ids, stage_of(sess), 64, 4
    scores, _, chunks = reconstruction_scores(stage, [0, 1, 2, 3], size, normalize="chunk", sink=sink)
    eager, n = tiny_model("qwen2", attn="eager"), len(ids)
    for index in range(chunks):
        chunk = ids[index * size:(index + 1) * size]
        prompt = stage.encode(FIRST_PROMPT) if index == 0 else (
            stage.encode(NEXT_PROMPT) + ids[index * size - PREVIOUS_TAIL:index * size])
        repeat = prompt + stage.turn_end + chunk
        attentions, _ = eager_pass(eager, ids, repeat)
        span = slice(index * size, index * size + len(chunk))
        allowed = torch.zeros(n + len(repeat), dtype=torch.bool)
        allowed[:sink], allowed[span], allowed[n:] = True, True, True
        for layer, attention in enumerate(attentions):
            probs = attention[0, :, n:] * allowed
            probs = probs / probs.sum(-1, keepdim=True)
            want = probs[..., span].amax(dim=1).view(2, 2, -1).amax(dim=1)
            got = scores[layer][:, span]
            keep = torch.arange(span.start, span.stop) >= sink  # the sinks are in every pass's softmax
            assert torch.allclose(got[:, keep], want[:, keep], atol=1e-5)
    cache_scores, _, _ = reconstruction_scores(stage, [0], size, sink=sink)
    assert not torch.allclose(cache_scores[0], scores[0])


def test_kvzip_plus_weights_each_probability_by_value_and_row_norms():
    """plus=true (KVzip+): probability / ||attention input of the row|| * ||W_O,h v|| before the max,
    checked against eager attention, the layer norm's output and the output projection applied to v."""
    sess = session(tiny_model("qwen2"), None)
    sess.prefill(CONTEXT)
    ids, stage = sess.context_ids, stage_of(sess)
    scores, _, _ = reconstruction_scores(stage, [0, 1, 2, 3], chunk_size=10_000, plus=True)
    repeat = stage.encode(FIRST_PROMPT) + stage.turn_end + ids
    eager, n = tiny_model("qwen2", attn="eager"), len(ids)
    attentions, inputs = eager_pass(eager, ids, repeat)
    for layer, attention in enumerate(attentions):
        attn = eager.model.layers[layer].self_attn
        values = sess.cache.layers[layer].values[0]  # [kv_heads, n, head_dim]
        dim = attn.head_dim
        norms = []
        for head in range(4):
            spread = torch.zeros(n, 4 * dim)
            spread[:, head * dim:(head + 1) * dim] = values[head // 2]
            norms.append(attn.o_proj(spread).norm(dim=-1))
        weighted = attention[0, :, n:, :n] / inputs[layer][0, n:].norm(dim=-1)[None, :, None]
        weighted = weighted * torch.stack(norms)[:, None, :]
        want = weighted.amax(dim=1).view(2, 2, n).amax(dim=1)
        assert torch.allclose(scores[layer], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", ["normalize=chunk", "plus=true", "normalize=chunk,plus=true"])
def test_kvzip_variants_keep_the_budget_and_the_sinks(options):
    sess = session(tiny_model("llama"), f"kvzip(ratio=0.25,chunk_size=100,{options})")
    sess.prefill(CONTEXT)
    target = round(0.25 * len(sess.context_ids))
    assert sum(held_per_layer(sess.cache)) == 4 * 2 * target
    for layer in sess.cache.layers:
        for head in range(2):
            assert set(range(4)) <= set(layer.positions[head].tolist())


def test_kvzip_safeguard_gives_every_head_its_own_top_tokens_first():
    """alpha (Ada-KV's safeguard) at the pair level: every KV head of every layer keeps at least its own
    top alpha * budget reconstruction scores, the total budget is unchanged, and alpha=1 leaves nothing
    to spread: the uniform level's choice exactly."""
    plain = session(tiny_model("qwen2"), None)
    plain.prefill(CONTEXT)
    scores, _, _ = reconstruction_scores(stage_of(plain), [0, 1, 2, 3], chunk_size=2000)
    target = round(0.25 * len(plain.context_ids))
    safe = int(0.9 * target)
    free = session(tiny_model("qwen2"), "kvzip(ratio=0.25,n_sink=0)")
    free.prefill(CONTEXT)
    guarded = session(tiny_model("qwen2"), "kvzip(ratio=0.25,n_sink=0,alpha=0.9)")
    guarded.prefill(CONTEXT)
    assert sum(held_per_layer(guarded.cache)) == sum(held_per_layer(free.cache)) == 4 * 2 * target
    per_head = [int((layer.positions[h] != PAD_POSITION).sum()) for layer in free.cache.layers
                for h in range(2)]
    assert min(per_head) < safe, "without the safeguard some head holds less than it guarantees"
    for index, layer in enumerate(guarded.cache.layers):
        for head in range(2):
            own_top = set(scores[index][head].topk(safe).indices.tolist())
            assert own_top <= set(layer.positions[head].tolist())
    whole = session(tiny_model("qwen2"), "kvzip(ratio=0.25,n_sink=0,alpha=1)")
    whole.prefill(CONTEXT)
    uniform = session(tiny_model("qwen2"), "kvzip(ratio=0.25,n_sink=0,level=uniform)")
    uniform.prefill(CONTEXT)
    for a, b in zip(whole.cache.layers, uniform.cache.layers):
        for head in range(2):
            assert sorted(a.positions[head][a.positions[head] != PAD_POSITION].tolist()) == sorted(
                b.positions[head].tolist())


def test_kvzip_records_its_cost_in_the_prefill_stats():
    sess = session(tiny_model("qwen2"), "kvzip(ratio=0.25,chunk_size=100)")
    result = sess.prefill(CONTEXT)
    cost = result.stats["compress"]
    n = len(sess.context_ids)
    assert cost["method"] == "kvzip(ratio=0.25,chunk_size=100)"
    assert cost["chunks"] == -(-n // 100) and cost["forward_tokens"] > n and cost["prefill_tokens"] == n
    assert cost["seconds"] > 0


@pytest.mark.parametrize("level", ["head", "pair"])
def test_kvzip_levels_spread_the_budget(level):
    sess = session(tiny_model("qwen2"), f"kvzip(ratio=0.25,level={level})")
    sess.prefill(CONTEXT)
    n = len(sess.context_ids)
    target = round(0.25 * n)
    held = held_per_layer(sess.cache)
    assert sum(held) == 4 * 2 * target  # layers x KV heads x budget, whatever the spread
    if level == "head":
        assert held == [2 * target] * 4
    layers = sess.cache.layers
    assert any(isinstance(layer, HeadwiseLayer) for layer in layers)
    per_head = [int((layer.positions[h] != PAD_POSITION).sum()) for layer in layers for h in range(2)]
    assert len(set(per_head)) > 1, "non-uniform budgets"
    for layer in layers:  # the sinks stay in every head
        for head in range(2):
            assert set(range(4)) <= set(layer.positions[head].tolist())


def test_allocate_pair_level_takes_the_top_scores_over_all_layers():
    scores = {0: torch.tensor([[9.0, 1.0, 8.0]]), 2: torch.tensor([[7.0, 6.0, float("-inf")]])}
    masks = allocate(scores, {0: 2, 2: 2}, "pair")
    assert masks[0].tolist() == [[True, False, True]] and masks[2].tolist() == [[True, True, False]]
    uniform = allocate(scores, {0: 1, 2: 1}, "uniform")
    assert uniform[0].tolist() == [[True, False, False]] and uniform[2].tolist() == [[True, False, False]]


# ---- keydiff ---------------------------------------------------------------------------------


def test_keydiff_keeps_the_keys_least_like_the_mean_without_queries():
    torch.manual_seed(0)
    common = torch.randn(16)
    keys = common + 0.05 * torch.randn(2, 40, 16)
    distinct = [3, 17, 31]
    keys[:, distinct] = torch.randn(2, 3, 16) * 3
    cache = KVCache([None])
    cache.layers[0].update(keys[None], torch.randn(1, 2, 40, 16))
    scores = KeyDiff(ratio=0.1).score(None, cache.layers[0])  # no call, no attention weights
    assert sorted(scores[0].topk(3).indices.tolist()) == distinct
    assert sorted(scores[1].topk(3).indices.tolist()) == distinct


# ---- expected_attention ----------------------------------------------------------------------


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate [heads, tokens, d] with transformers' own RoPE (Llama's), as the model does."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=x.shape[-1] * 2, num_attention_heads=2, rope_theta=theta,
                         head_dim=x.shape[-1])
    cos, sin = LlamaRotaryEmbedding(config)(x, positions[None])
    return apply_rotary_pos_emb(x[None], x[None], cos, sin)[0][0]


def test_unrotate_inverts_the_models_rope_and_mean_rotation_averages_it():
    torch.manual_seed(0)
    plain = torch.randn(3, 10, 16)
    positions = torch.arange(100, 110)
    assert torch.allclose(unrotate(rope(plain, positions), positions, 10000.0, 16), plain, atol=1e-4)
    future = torch.arange(200, 232)
    vector = torch.randn(1, 1, 16)
    rotated = rope(vector.expand(1, 32, 16).contiguous(), future).mean(dim=1)[0]
    assert torch.allclose(mean_rotation(future, 10000.0, 16, 16) @ vector[0, 0], rotated, atol=1e-4)


def test_expected_attention_statistics_follow_the_queries_to_future_positions():
    """Queries that are one pre-RoPE vector rotated at their positions: the estimated future query
    is that vector under RoPE's mean rotation over the next positions, with no spread."""
    from kvlife.attention import AttnCall
    from kvlife.codec.rope import RopeSpec

    torch.manual_seed(1)
    base = torch.randn(2, 1, 16)
    positions = torch.arange(50, 90)
    queries = rope(base.expand(2, 40, 16).contiguous(), positions)
    call = AttnCall(0, queries[None], queries[None, :1], queries[None, :1], positions, positions[None], 0.25)
    future = torch.arange(90, 90 + 64)
    mean, cov = query_statistics(call, slice(-32, None), future, RopeSpec(10000.0, 16))
    want = rope(base.expand(2, 64, 16).contiguous(), future).mean(dim=1)
    assert torch.allclose(mean, want, atol=1e-4)
    assert cov.abs().max() < 1e-4


def test_expected_attention_uses_the_models_rope_and_keeps_sinks():
    model = tiny_model("llama")
    sess = session(model, "expected_attention(ratio=0.25,n_sink=3)")
    sess.prefill(CONTEXT)
    for layer in sess.cache.layers:
        for head in range(2):
            assert {0, 1, 2} <= set(layer.positions[head].tolist())
    with pytest.raises(SpecError):
        ExpectedAttention(ratio=0.25, window_size=0)


# ---- chunkkv ---------------------------------------------------------------------------------


def test_chunk_ranking_keeps_whole_chunks():
    scores = torch.zeros(2, 30)
    scores[:, 12] = 5.0  # one hot token makes chunk 1 (slots 10..19) the best
    scores[0, 25], scores[1, 21] = 1.0, 1.0  # chunk 2 next
    ranked = chunk_ranked(scores, 10)
    keep = ranked.topk(15, dim=-1).indices.sort(dim=-1).values
    for row in keep:
        assert set(range(10, 20)) <= set(row.tolist())
        assert all(20 <= i < 30 for i in row.tolist() if not 10 <= i < 20)
    assert 25 in keep[0].tolist() and 21 in keep[1].tolist()  # inside a partial chunk, the best tokens


def test_chunkkv_in_a_session_keeps_runs_of_contiguous_tokens():
    sess = session(tiny_model("qwen2"), "chunkkv(ratio=0.25,chunk_length=8,scorer=keydiff)")
    sess.prefill(CONTEXT)
    n = len(sess.context_ids)
    chunks = [set(range(start, min(start + 8, n))) for start in range(0, n, 8)]
    for layer in sess.cache.layers:
        whole = []
        for head in range(2):
            kept = set(layer.positions[head].tolist())
            # one chunk at most is cut
            assert sum(0 < len(kept & chunk) < len(chunk) for chunk in chunks) <= 1
            whole.append([index for index, chunk in enumerate(chunks) if chunk <= kept])
        # the same chunks in every head
        assert whole[0] == whole[1] and len(whole[0]) >= round(0.25 * n) // 8 - 1


# ---- duo_attention ---------------------------------------------------------------------------


def test_water_fill_and_budget_counts_are_exact():
    assert water_fill([5, 100, 100], 101) == [5, 48, 48]
    assert sum(water_fill([3, 3, 3], 7)) == 7
    counts, retrieval = budget_counts([100, 100, 100, 100], 220, 20)
    assert (counts, retrieval) == ([100, 40, 40, 40], 1) and sum(counts) == 220
    counts, retrieval = budget_counts([100, 100], 30, 20)
    assert (counts, retrieval) == ([15, 15], 0)


def test_streaming_mask_keeps_sinks_and_newest():
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, PAD_POSITION])
    real = positions != PAD_POSITION
    assert streaming_mask(positions, real, 5, 2).nonzero().flatten().tolist() == [0, 1, 5, 6, 7]


def write_split(path, scores, n_sink=2, n_local=8, **extra):
    split = {"format": head_split.FORMAT, "model": "tiny", "signature": "x", "n_layers": len(scores),
             "kv_heads": 2, "n_sink": n_sink, "n_local": n_local, "scores": scores, **extra}
    head_split.write(path, split)
    return path


def test_duo_retrieval_heads_keep_everything_streaming_heads_their_window(tmp_path):
    path = write_split(tmp_path / "split.json", [[0.9, 0.0], [0.0, 0.8], [0.1, 0.2], [0.0, 0.05]])
    sess = session(tiny_model("qwen2"), f"duo_attention(config={path})")  # sparsity 0.5: 4 of 8 heads stream
    sess.prefill(CONTEXT)
    n = len(sess.context_ids)
    layers = sess.cache.layers
    kept = {(i, h): int((layers[i].positions[h] != PAD_POSITION).sum()) for i in range(4) for h in range(2)}
    for retrieval in [(0, 0), (1, 1), (2, 0), (2, 1)]:
        assert kept[retrieval] == n
    for streaming in [(0, 1), (1, 0), (3, 0), (3, 1)]:
        assert kept[streaming] == 10
        row = layers[streaming[0]].positions[streaming[1]]
        assert sorted(row[row != PAD_POSITION].tolist()) == [0, 1, *range(n - 8, n)]


def test_duo_split_errors_are_one_line(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        parse("duo_attention(config=no-such-split)")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": "other"}))
    with pytest.raises(SpecError, match="not a kvlife head split"):
        parse(f"duo_attention(config={broken})")
    wrong = write_split(tmp_path / "wrong.json", [[0.1, 0.2]] * 3)
    sess = session(tiny_model("qwen2"), f"duo_attention(config={wrong},ratio=0.5)")
    with pytest.raises(SpecError, match="3 layers x 2 KV heads"):
        sess.prefill(CONTEXT)
    with pytest.raises(SpecError, match="no shipped head split for this model"):
        session(tiny_model("qwen2"), "duo_attention(ratio=0.5)").prefill(CONTEXT)


@pytest.mark.parametrize("argv,message", [
    (["bench", "--method", "kvzip(ratio=0)"], "ratio must be in (0, 1]"),
    (["bench", "--method", "kvzip(ratio=1.5)"], "ratio must be in (0, 1]"),
    (["bench", "--method", "kvzip(level=layer)"], "level must be one of"),
    (["bench", "--method", "kvzip(normalize=layer)"], "normalize must be one of"),
    (["bench", "--method", "kvzip(plus=3)"], "plus must be true or false"),
    (["bench", "--method", "kvzip(alpha=1.5)"], "alpha must be in [0, 1]"),
    (["bench", "--method", "duo_attention(config=/no/such/split.json)"], "not found"),
    (["bench", "--method", "chunkkv(scorer=h2o)"], "unknown scorer"),
])
def test_bad_parameters_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("kvlife: error:")


def test_search_heads_scores_what_streaming_hides(tmp_path):
    """Every head scores > 0 when its window hides the middle of the haystack, and exactly 0 when
    the window covers the whole context (the head then sees what dense attention sees)."""
    model = tiny_model("llama")
    settings = HeadSearch(samples=1, tokens=200, passkeys=3, queries=2, n_sink=4, n_local=16)
    context, asked = haystack(ByteTokenizer(), settings, 0)
    assert len(asked) == 2 and all(key in context for _, key in asked)
    split = search(model, ByteTokenizer(), "tiny-llama", settings, log=lambda _: None)
    assert split["signature"] == head_split.model_signature(model)
    assert len(split["scores"]) == 4 and all(len(row) == 2 and min(row) > 0 for row in split["scores"])
    wide = HeadSearch(samples=1, tokens=200, passkeys=3, queries=2, n_sink=4, n_local=100_000)
    found = search(model, ByteTokenizer(), "t", wide, log=lambda _: None)
    assert all(row == [0.0, 0.0] for row in found["scores"])
    path = tmp_path / "split.json"
    head_split.write(path, split)
    loaded = head_split.load(str(path))
    assert loaded.n_sink == 4 and loaded.n_local == 16 and loaded.scores[0] == tuple(split["scores"][0])


def test_search_heads_gradient_is_the_gate_derivative():
    """The score's gradient equals the finite difference of the answer NLL in one head's gate."""
    from types import SimpleNamespace

    from kvlife.methods.base import model_forward
    from kvlife.methods.compress.duo_search import GatedStreaming, gate_gradients, prompt_ids

    model, tokenizer = tiny_model("qwen2"), ByteTokenizer()
    settings = HeadSearch(samples=1, tokens=150, passkeys=2, queries=1, n_sink=4, n_local=16)
    context, [(question, answer)] = haystack(tokenizer, settings, 0)
    context_ids, question_ids = prompt_ids(tokenizer, context, question)
    answer_ids = tokenizer.encode(answer)
    grads = gate_gradients(model, context_ids, question_ids, answer_ids, [0, 1, 2, 3], 2, settings)

    def nll(layer: int, head: int, value: float) -> float:
        cache = KVCache.for_model(model)
        model_forward(model, cache, context_ids, None)
        gates = {i: torch.zeros(2) for i in range(4)}
        gates[layer][head] = value
        recipe = SimpleNamespace(prefill=GatedStreaming(gates, len(context_ids), 4, 16), compress=None,
                                 load=None)
        logits = model_forward(model, cache, question_ids + answer_ids, recipe, all_logits=True)
        logits = logits[len(question_ids) - 1:-1]
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids), reduction="mean"))

    assert float(grads.abs().max()) > 1e-4
    for layer, head in [(0, 0), (2, 1), (3, 0)]:
        step = 1e-3
        finite = (nll(layer, head, step) - nll(layer, head, -step)) / (2 * step)
        assert abs(finite - float(grads[layer, head])) < 1e-3 * max(1.0, abs(finite))


def test_shipped_splits_load():
    for name in ("qwen2.5-coder-0.5b", "smollm2-135m"):
        split = head_split.load(name)
        assert split.model == name and len(split.signature) == 16
        assert (split.n_sink, split.n_local) == (64, 256)
        assert all(row is not None and min(row) >= 0 for row in split.scores)


@pytest.mark.slow
def test_shipped_split_is_found_for_its_model(real_model):
    model, _ = real_model
    assert head_split.for_model(model).model == "smollm2-135m"
