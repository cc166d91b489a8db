"""Assemble methods (concat, cacheblend, epic, ape): full recompute reproduces dense, partial recompute is
what it says, and the Session and runner drive them on the rag task's segments."""

import pytest
import torch

from kvlife.bench.runner import run_sample
from kvlife.bench.tasks import get_task
from kvlife.errors import SpecError
from kvlife.methods import registry
from kvlife.methods.assemble.base import document_rows, selective_recompute
from kvlife.recipe import parse
from kvlife.session import Session
from kvlife.store import open_store
from tiny import ByteTokenizer, tiny_model

SEGMENTS = ["Read these notes, then answer.",
            "\n\nthe fox is red and runs far away from home every day.",
            "\n\nthe dog is blue and sleeps all day long under the tree.",
            "\n\nthe cat is green and sings at night."]
CONTEXT = "".join(SEGMENTS)
ASSEMBLE = sorted(name for name, cls in registry.METHODS.items() if cls.stage == "assemble")


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request):
    return tiny_model(request.param)


def prefilled(model, spec, store=None, mode="multi-request"):
    s = Session(model, ByteTokenizer(), spec, mode=mode, prompt_format="plain", store=store)
    result = s.prefill(CONTEXT, segments=SEGMENTS)
    return s, result


def next_logits(s):
    state = s.cache.checkpoint()
    logits = s.forward(s.format.query_ids("what is red?"), phase="extend")
    s.cache.rollback(state)
    return logits


def test_every_assemble_method_is_tested():
    assert ASSEMBLE == ["ape", "cacheblend", "concat", "epic"]


@pytest.mark.parametrize("spec", ["cacheblend(ratio=1.0)", "cacheblend(ratio=1.0,layer=3)", "epic(k=1000)"])
def test_recomputing_every_document_token_reproduces_dense(model, spec):
    dense, _ = prefilled(model, "dense")
    blended, result = prefilled(model, spec, open_store("memory", chunk_size=16))
    assert blended.context_ids == dense.context_ids
    for (k1, v1, p1), (k2, v2, p2) in zip(blended.cache.to_tensors(), dense.cache.to_tensors()):
        torch.testing.assert_close(k1, k2, rtol=0, atol=2e-5)
        torch.testing.assert_close(v1, v2, rtol=0, atol=2e-5)
        assert torch.equal(p1, p2)
    torch.testing.assert_close(next_logits(blended), next_logits(dense), rtol=0, atol=2e-5)
    documents = sum(len(piece) for piece in blended.format.segment_ids(SEGMENTS)[0][1:])
    assert result.stats["recomputed_rows_last_layer"] == documents


def test_partial_recompute_counts_and_differs_from_dense(model):
    store = open_store("memory", chunk_size=16)
    dense, _ = prefilled(model, "dense")
    pieces = dense.format.segment_ids(SEGMENTS)[0]
    documents = sum(len(piece) for piece in pieces[1:])
    errors = {}
    for spec in ["concat", "cacheblend(ratio=0.25)", "epic(k=4)"]:
        s, result = prefilled(model, spec, store)
        errors[spec] = float((next_logits(s) - next_logits(dense)).abs().max())
        last = result.stats["recomputed_rows_last_layer"]
        assert last == {"concat": 0, "cacheblend(ratio=0.25)": round(0.25 * documents), "epic(k=4)": 12}[spec]
        assert result.stats["assembled_tokens"] == sum(len(piece) for piece in pieces)
    assert min(errors.values()) > 1e-4  # documents computed alone are not the full prefill


def assembled(model):
    """The concat-assembled layers of CONTEXT (before its tail), their ids, the documents' spans,
    dense's layers."""
    dense, _ = prefilled(model, "dense")
    concat, _ = prefilled(model, "concat", open_store("memory", chunk_size=16))
    pieces = dense.format.segment_ids(SEGMENTS)[0]
    ids = [token for piece in pieces for token in piece]
    starts = [sum(len(piece) for piece in pieces[:i]) for i in range(len(pieces) + 1)]
    spans = list(zip(starts[1:-1], starts[2:]))
    layers = [(k[:, :, :len(ids)].clone(), v[:, :, :len(ids)].clone(), p[:, :len(ids)].clone())
              for k, v, p in concat.cache.to_tensors()]
    return layers, ids, spans, dense.cache.to_tensors()


def test_cacheblend_check_layer_compares_the_full_prefill_keys_and_runs_only_the_chosen_rows(model):
    layers, ids, spans, dense = assembled(model)
    rows = document_rows(spans)
    stored_keys = layers[1][0][0, :, rows].clone()
    seen, deviations = {}, []
    hooks = [layer.register_forward_pre_hook(lambda module, args, kwargs, index=index: seen.__setitem__(
        index, (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
        for index, layer in enumerate(model.model.layers)]

    def chooser(deviation, chosen_from):
        deviations.append(deviation)
        return torch.arange(0, chosen_from.numel(), 4)

    try:
        last = selective_recompute(model, layers, ids, rows, check_layer=1, chooser=chooser)
    finally:
        for hook in hooks:
            hook.remove()
    kept = len(range(0, rows.numel(), 4))
    # layer 0 recomputes every document row; from the check layer on, only the chosen rows run attention
    # and MLP
    assert seen[0] == rows.numel() and all(seen[i] == kept for i in range(1, len(model.model.layers)))
    assert last == kept
    # layer 0 recomputed in full, so the check layer's fresh keys are the full prefill's: the deviation is the
    # distance between dense's and the stored keys there
    expected = dense[1][0][0, :, rows] - stored_keys
    torch.testing.assert_close(deviations[0], expected.pow(2).sum(dim=(0, 2)), rtol=1e-4, atol=1e-5)


def test_cacheblend_recomputes_the_tokens_that_deviate_most():
    method = parse("cacheblend(ratio=0.5)").assemble
    deviation = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 4.0])
    assert method.choose(deviation, torch.arange(10, 16)).tolist() == [1, 3, 5]


def test_a_deeper_check_layer_recomputes_every_document_token_up_to_it(model):
    store = open_store("memory", chunk_size=16)
    prefilled(model, "concat", store)  # the documents stored: the first layer calls below are the recompute
    seen = {}

    def first_call(module, args, kwargs, index):
        seen.setdefault(index, (args[0] if args else kwargs["hidden_states"]).shape[1])

    hooks = [layer.register_forward_pre_hook(lambda module, args, kwargs, index=index: first_call(
        module, args, kwargs, index), with_kwargs=True) for index, layer in enumerate(model.model.layers)]
    try:
        s, result = prefilled(model, "cacheblend(ratio=0.25,layer=2)", store)
    finally:
        for hook in hooks:
            hook.remove()
    documents = result.stats["recomputed_rows_first_layer"]
    assert seen[0] == seen[1] == documents  # the layers before the check layer in full
    assert seen[2] == seen[3] == result.stats["recomputed_rows_last_layer"] == round(0.25 * documents)


def test_a_check_layer_outside_the_model_is_one_clear_error(model):
    with pytest.raises(SpecError, match="layer must be >= 1"):
        parse("cacheblend(layer=0)")
    with pytest.raises(SpecError, match="check layer 4 is past the model's 4 layers"):
        prefilled(model, "cacheblend(layer=4)", open_store("memory", chunk_size=16))


def test_epic_rows_are_the_first_k_of_each_document():
    assert document_rows([(5, 8), (8, 20)], first=2).tolist() == [5, 6, 8, 9]
    assert parse("epic(k=2)").assemble.rows([(5, 6), (8, 20)]).tolist() == [5, 8, 9]


def test_ape_divides_the_document_keys_by_its_temperature_and_nothing_else(model):
    store = open_store("memory", chunk_size=16)
    for plain, spec in [("concat", "ape(temperature=0.5,k=0)"), ("epic(k=3)", "ape(temperature=0.8,k=3)")]:
        base, _ = prefilled(model, plain, store)
        scaled, result = prefilled(model, spec, store)
        temperature = parse(spec).assemble.temperature
        pieces = base.format.segment_ids(SEGMENTS)[0]
        head, documents = len(pieces[0]), sum(len(piece) for piece in pieces[1:])
        for (k1, v1, p1), (k2, v2, p2) in zip(base.cache.to_tensors(), scaled.cache.to_tensors()):
            # the instruction keeps its keys; every document key is divided by T; values and positions
            # as assembled; the context's tail (prefilled after the scaling) attends to the scaled keys
            torch.testing.assert_close(k2[:, :, :head], k1[:, :, :head], rtol=0, atol=0)
            torch.testing.assert_close(k2[:, :, head:head + documents], k1[:, :, head:head + documents]
                                       / temperature, rtol=1e-6, atol=1e-6)
            kept = slice(0, head + documents)
            torch.testing.assert_close(v2[:, :, kept], v1[:, :, kept], rtol=0, atol=0)
            assert torch.equal(p1, p2)
        assert result.stats["recomputed_rows_last_layer"] == (0 if plain == "concat" else 9)
    # temperature 1 is concat exactly
    one, _ = prefilled(model, "ape(temperature=1,k=0)", store)
    concat, _ = prefilled(model, "concat", store)
    torch.testing.assert_close(next_logits(one), next_logits(concat), rtol=0, atol=0)


def test_multi_turn_assembles_before_turn_one(model):
    store = open_store("memory", chunk_size=16)
    blended, result = prefilled(model, "cacheblend(ratio=1.0)", store, mode="multi-turn")
    assert result is not None and result.prefill_s > 0
    dense = Session(model, ByteTokenizer(), "dense", mode="multi-turn", prompt_format="plain")
    dense.prefill(CONTEXT, segments=SEGMENTS)
    for query in ["what is red?", "who sleeps?"]:
        assert (blended.ask(query, max_new_tokens=5).output_ids
                == dense.ask(query, max_new_tokens=5).output_ids)


def test_contexts_without_segments_prefill_densely(model):
    s = Session(model, ByteTokenizer(), "epic", mode="multi-request", prompt_format="plain")
    dense = Session(model, ByteTokenizer(), "dense", mode="multi-request", prompt_format="plain")
    s.prefill(CONTEXT)
    dense.prefill(CONTEXT)
    torch.testing.assert_close(next_logits(s), next_logits(dense), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", ["concat+snapkv(ratio=0.5)", "epic+a_shape", "cacheblend+lingua",
                                  "concat+retrieval_attention", "cacheblend(ratio=1.5)", "epic(k=-1)",
                                  "ape(temperature=0)", "ape(temperature=1.5)", "ape(k=-2)"])
def test_combinations_and_parameters_that_make_no_sense_are_spec_errors(spec):
    with pytest.raises(SpecError) as info:
        parse(spec)
    assert "\n" not in str(info.value)


def test_runner_passes_the_rag_segments_and_records_the_assembly(model):
    task = get_task("rag")
    sample = task.samples("default", 1, context_tokens=300)[0]
    s = Session(model, ByteTokenizer(), "epic(k=4)", mode="multi-request", prompt_format="plain",
                store=open_store("memory", chunk_size=64))
    rows = run_sample(s, task, sample, max_turns=None)
    assert len(rows) == 2 and rows[0]["assembly"]["documents"] == len(sample.meta["segments"]) - 1
    assert rows[0]["assembly"]["doc_misses"] == len(sample.meta["segments"])
    assert rows[0]["ttft_s"] >= rows[0]["assembly"]["assemble_load_s"]
    assert "assembly" not in rows[1]


def test_kvlife_bench_assembles_rag_contexts_from_a_store(tmp_path):
    import json

    from kvlife.cli import main
    from tiny import tiny_tokenizer

    tiny_model("qwen2", attn="sdpa").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    common = ["bench", "--model", str(tmp_path / "tiny"), "--tasks", "rag", "--samples", "2",
              "--context-tokens", "150", "--store", f"disk:{tmp_path / 'docs'}", "--mode", "multi-request",
              "--no-progress"]
    for spec, out in [("epic(k=4)", "first"), ("cacheblend(ratio=0.15)", "second")]:
        assert main([*common, "--method", spec, "--out", str(tmp_path / out)]) == 0
    first, second = (
        [json.loads(line) for line in (tmp_path / out / "predictions.jsonl").read_text().splitlines()]
        for out in ("first", "second")
    )
    assert (first[0]["assembly"]["doc_misses"] == 4
            and first[0]["assembly"]["recomputed_rows_last_layer"] == 12)
    # the second run finds every document stored by the first
    assert second[0]["assembly"]["doc_misses"] == 0 and second[0]["assembly"]["doc_hits"] == 4
    assert second[0]["ttft_s"] > 0 and "assembly" not in second[1]


def test_lead_in_head_makes_the_first_document_exact_and_the_rest_differ(model):
    """lead_in=head: each document computed after the context's first piece (APE's shared prefix), which is
    exactly what precedes the first document in the context, so its K/V are dense's."""
    dense, _ = prefilled(model, "dense")
    store = open_store("memory", chunk_size=16)
    blended, result = prefilled(model, "concat(lead_in=head)", store)
    alone, _ = prefilled(model, "concat", store)
    pieces, _ = dense.format.segment_ids(SEGMENTS)
    first = slice(len(pieces[0]), len(pieces[0]) + len(pieces[1]))
    second = slice(first.stop, first.stop + len(pieces[2]))
    for (k, v, _), (dk, dv, _) in zip(blended.cache.to_tensors(), dense.cache.to_tensors()):
        torch.testing.assert_close(k[:, :, :first.stop], dk[:, :, :first.stop], rtol=0, atol=2e-5)
        torch.testing.assert_close(v[:, :, :first.stop], dv[:, :, :first.stop], rtol=0, atol=2e-5)
    assert not torch.allclose(blended.cache.to_tensors()[1][1][:, :, second],
                              dense.cache.to_tensors()[1][1][:, :, second], atol=1e-4)
    assert not torch.allclose(blended.cache.to_tensors()[1][1][:, :, first],
                              alone.cache.to_tensors()[1][1][:, :, first], atol=1e-4)
    assert result.stats["doc_misses"] == len(SEGMENTS)


def test_lead_in_file_puts_its_text_after_the_first_piece(model, tmp_path):
    anchor = tmp_path / "anchor.txt"
    anchor.write_text("\n\nthe owl is grey and reads old books.")
    method = parse(f"epic(k=2,lead_in={anchor})").assemble
    head = [5, 6, 7]
    encode = ByteTokenizer().encode
    assert method.lead_in_ids(head, encode) == head + encode(anchor.read_text())
    s, result = prefilled(model, f"epic(k=2,lead_in={anchor})", open_store("memory", chunk_size=16))
    assert result.stats["documents"] == len(SEGMENTS) - 1


@pytest.mark.parametrize("spec", ["concat(lead_in=/no/such/anchor.txt)", "epic(lead_in=nowhere)",
                                  "cacheblend(lead_in=/no/file)", "ape(lead_in=/no/file)"])
def test_a_lead_in_that_is_not_a_file_is_a_spec_error(spec):
    with pytest.raises(SpecError, match="lead_in must be none, head or a text file") as info:
        parse(spec)
    assert "\n" not in str(info.value)


def test_a_session_keeps_the_document_stores_of_a_few_lead_ins_only(model):
    from kvlife.session import LEAD_IN_STORES

    s = Session(model, ByteTokenizer(), "concat(lead_in=head)", mode="multi-request", prompt_format="plain",
                store=open_store("memory", chunk_size=16))
    for index in range(LEAD_IN_STORES + 2):  # another instruction each time: another lead-in
        segments = [f"Instruction number {index}.", *SEGMENTS[1:]]
        s.prefill("".join(segments), segments=segments)
    assert len(s._lead_in_documents) == LEAD_IN_STORES
