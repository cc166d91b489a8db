"""Session: modes, rollback, positions, and streamingllm against dense."""

import pytest
import torch

from kvlife.session import Session
from tiny import ByteTokenizer, tiny_model

CONTEXT = "the quick brown fox jumps over the lazy dog and keeps running far away. " * 2


def _session(kind="qwen2", spec="dense", mode="multi-turn", **kwargs):
    return Session(tiny_model(kind), ByteTokenizer(), spec, mode=mode, prompt_format="plain", **kwargs)


def _same_cache(a, b):
    assert len(a) == len(b)
    for (layer_a, state_a), (layer_b, state_b) in zip(a, b):
        assert layer_a is layer_b
        assert torch.equal(state_a.keys, state_b.keys) and torch.equal(state_a.values, state_b.values)
        assert torch.equal(state_a.positions, state_b.positions)
        assert state_a.next_position == state_b.next_position


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
@pytest.mark.parametrize("spec", ["dense", "streamingllm(n_sink=2,n_local=20)"])
def test_multi_request_cuts_back_to_the_context_cache(kind, spec):
    session = _session(kind, spec, mode="multi-request")
    session.prefill(CONTEXT)
    context_state = session.cache.checkpoint()
    for query in ("what jumps?", "who is lazy?"):
        session.ask(query, max_new_tokens=5, reference="fox")
        _same_cache(session.cache.checkpoint(), context_state)


def test_multi_request_answers_do_not_depend_on_earlier_queries():
    session = _session(mode="multi-request")
    session.prefill(CONTEXT)
    first = session.ask("what jumps?", max_new_tokens=6).output_ids
    session.ask("something else entirely", max_new_tokens=6)
    assert session.ask("what jumps?", max_new_tokens=6).output_ids == first


def test_multi_turn_equals_one_long_dense_prompt():
    """Turn 2 of multi-turn sees context + q1 + golden answer + q2, as a single dense prompt would."""
    session = _session()
    session.prefill(CONTEXT)
    session.ask("q1?", max_new_tokens=4, reference="ans")
    second = session.ask("q2?", max_new_tokens=4)
    fresh = _session()
    fresh.prefill(CONTEXT + "\n\nq1?\nans\n\n" + "q2?")
    fresh_answer = fresh.ask("", max_new_tokens=4)  # plain format: query "" adds only the newline
    assert second.output_ids == fresh_answer.output_ids


def test_own_answers_feed_back_the_prediction():
    golden, own = _session(), _session(own_answers=True)
    for session in (golden, own):
        session.prefill(CONTEXT)
        session.ask("q1?", max_new_tokens=3, reference="a very different reference answer")
    assert own.pending_answer != golden.pending_answer
    assert golden.pending_answer == "a very different reference answer"


@pytest.mark.parametrize("mode", ["multi-turn", "multi-request"])
def test_streamingllm_with_large_window_reproduces_dense(mode):
    dense, stream = _session(mode=mode), _session(spec="streamingllm(n_sink=4,n_local=10000)", mode=mode)
    for session in (dense, stream):
        session.prefill(CONTEXT)
    for query in ("what jumps?", "who?"):
        a = dense.ask(query, max_new_tokens=8, reference="fox")
        b = stream.ask(query, max_new_tokens=8, reference="fox")
        assert a.output_ids == b.output_ids
        assert a.reference_nll == pytest.approx(b.reference_nll, abs=1e-6)
        assert a.cache_bytes == b.cache_bytes


def test_streamingllm_shrinks_bytes_and_keeps_true_positions():
    dense, stream = _session(mode="multi-request"), _session(spec="streamingllm(n_sink=4,n_local=28)",
                                                             mode="multi-request")
    dense.prefill(CONTEXT)
    stream.prefill(CONTEXT)
    n = len(stream.context_ids)
    assert stream.cache.tokens_held() == [32] * 4
    assert stream.cache.bytes() * n == pytest.approx(dense.cache.bytes() * 32)
    positions = stream.cache.layers[0].positions[0].tolist()
    assert positions == list(range(4)) + list(range(n - 28, n))
    assert stream.cache.next_position == n  # decoding continues at the true next position
    seen = []
    original = stream.forward

    def spy(ids, phase, **kwargs):
        seen.append((stream.cache.next_position, len(ids)))
        return original(ids, phase, **kwargs)

    stream.forward = spy
    stream.ask("q?", max_new_tokens=3)
    assert seen[0] == (n, 3)  # the query "q?\n" (3 bytes) starts at the true next position n
    assert [start for start, _ in seen[1:]] == [n + seen[0][1] + i for i in range(len(seen) - 1)]


def test_ratio_budget_streamingllm():
    session = _session(spec="streamingllm(ratio=0.5,n_sink=4)", mode="multi-request")
    session.prefill(CONTEXT)
    n = len(session.context_ids)
    assert session.cache.tokens_held()[0] == round(0.5 * n)


def test_turn_results_report_costs():
    session = _session(mode="multi-request")
    prefill = session.prefill(CONTEXT)
    assert prefill.prompt_tokens == len(CONTEXT.encode()) + 2 and prefill.cache_bytes > 0
    result = session.ask("what?", max_new_tokens=5, reference="fox")
    assert result.prefill_s > 0 and result.ttft_s >= result.prefill_s * 0.5
    assert result.new_tokens <= 5 and result.reference_nll > 0
    assert result.cache_bytes > prefill.cache_bytes


def test_chat_format_segments_concatenate_to_the_template(real_model):
    model, tokenizer = real_model
    session = Session(model, tokenizer, "dense", prompt_format="chat")
    fmt = session.format
    assert fmt.style == "chat"
    text = fmt.head + "CTX\n\n" + "Q1" + fmt.after_query
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "CTX\n\nQ1"}], tokenize=False,
                                             add_generation_prompt=True)
    assert text == expected
