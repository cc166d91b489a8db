"""lingua: hits the target rate, keeps the sentences holding the query's words, runs in a Session."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kvlife.errors import SpecError
from kvlife.methods.prompt.lingua import Lingua
from kvlife.recipe import parse
from kvlife.session import Session
from tiny import ByteTokenizer, tiny_model

FILLER = [" ".join("".join(random.Random(seed * 7 + i).choices("abcdefghij", k=5)) for i in range(6)) + "."
          for seed in range(30)]
NEEDLE = "the zebra code is 4711."
CONTEXT = " ".join(FILLER[:17] + [NEEDLE] + FILLER[17:])


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


def encode(text: str) -> list[int]:
    return ByteTokenizer().encode(text)


@pytest.mark.parametrize("rate", [0.2, 1 / 3, 0.5])
def test_hits_the_target_rate(model, rate):
    method = Lingua(rate=rate, chunk=64, overlap=8)
    ids = encode(CONTEXT)
    kept = method.compress_ids(ids, None, model, ByteTokenizer())
    assert len(kept) == round(rate * len(ids))
    assert method.last_rate == pytest.approx(len(kept) / len(ids))
    assert method.last_stats["original_tokens"] == len(ids) and method.last_stats["kept_tokens"] == len(kept)
    it = iter(ids)
    assert all(token in it for token in kept), "kept tokens are a subsequence of the context"


def test_keeps_the_sentence_with_the_query_words(model):
    method = Lingua(chunk=64, overlap=8)
    ids = encode(CONTEXT)
    kept = method.compress_ids(ids, encode("What is the zebra code?"), model, ByteTokenizer())
    assert NEEDLE in ByteTokenizer().decode(kept)
    assert len(kept) == round(len(ids) / 3)
    assert method.last_stats["query_sentence_tokens"] >= len(NEEDLE) - 1
    without = Lingua(chunk=64, overlap=8).compress_ids(ids, None, model, ByteTokenizer())
    assert NEEDLE not in ByteTokenizer().decode(without)  # the query is what kept it


def test_drops_the_least_surprising_tokens(model):
    method = Lingua(rate=0.5, chunk=64, overlap=8)
    ids = encode(CONTEXT)
    nll = method.surprisal(ids, model)
    keep = method.keep_mask(ids, None, model, ByteTokenizer())
    free = np.ones(len(ids), dtype=bool)
    free[-1] = False  # the last token is always kept
    assert nll[keep & free].min() >= nll[~keep].max()


def test_surprisal_of_the_first_chunk_matches_one_forward(model):
    ids = encode(CONTEXT)[:200]
    got = Lingua(chunk=64, overlap=8).surprisal(ids, model)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = -logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    assert np.isinf(got[0])
    np.testing.assert_allclose(got[1:64], want[:63], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["multi-turn", "multi-request"])
def test_session_prefills_the_compressed_context(model, mode):
    sess = Session(model, ByteTokenizer(), "lingua(chunk=64,overlap=8)", mode=mode, prompt_format="plain")
    sess.prefill(CONTEXT)
    result = sess.ask("What is the zebra code?", max_new_tokens=3, reference="4711")
    raw = len(sess.raw_context_ids)
    assert len(sess.context_ids) == round(raw / 3)
    assert sess.recipe.prompt.last_rate == pytest.approx(len(sess.context_ids) / raw)
    if mode == "multi-request":  # cut back to the (compressed) context after the answer
        assert sess.cache.next_position == len(sess.context_ids)
    else:  # turn 1 prefilled the compressed context with the query, which the compression saw
        assert result.prompt_tokens == len(sess.context_ids) + len(
            sess.format.query_ids("What is the zebra code?")
        )
        assert NEEDLE in ByteTokenizer().decode(sess.context_ids)


def test_bad_parameters_raise_spec_errors():
    for spec in ("lingua(rate=0)", "lingua(rate=1.5)", "lingua(chunk=8,overlap=8)", "lingua(query_share=2)"):
        with pytest.raises(SpecError):
            parse(spec)
