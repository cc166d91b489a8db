"""benchmarks/kvzip_layers.py's layer swap on a tiny model: teacher-forced exactness is the greedy
answer's, dense's cache in every layer gives dense's verdict, and both caches are left as they were."""

import importlib.util
import sys
from pathlib import Path

import torch

from kvlife.session import Session
from tiny import ByteTokenizer, tiny_model

BENCH = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("kvzip_layers_bench", BENCH / "kvzip_layers.py")
layers_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layers_bench)

CONTEXT = "".join(f"key {i:02d} holds value {(i * 37) % 100:02d}. " for i in range(40))
QUERY = "What does key 07 hold?"


def snapshot(session: Session) -> list:
    return [(type(layer), layer.positions.clone(), layer.dense_kv()[0].clone())
            for layer in session.cache.layers]


def test_exact_is_the_greedy_answer_and_dense_layers_give_dense_verdict():
    model = tiny_model("qwen2")
    dense, method = (Session(model, ByteTokenizer(), recipe, mode="multi-request", prompt_format="plain")
                     for recipe in (None, "kvzip(ratio=0.25)"))
    dense.prefill(CONTEXT)
    method.prefill(CONTEXT)
    greedy = dense.ask(QUERY, max_new_tokens=6).output_ids
    assert len(greedy) > 1
    assert layers_bench.exact(dense, QUERY, greedy)  # the model's own greedy answer is exact
    wrong = greedy[:-1] + [(greedy[-1] + 1) % 256]
    assert not layers_bench.exact(dense, QUERY, wrong)  # its last token changed is not
    before = snapshot(method) + snapshot(dense)
    every_layer = list(range(len(method.cache.layers)))
    for ref in (greedy, wrong):
        swapped = layers_bench.exact(method, QUERY, ref, dense, every_layer)
        assert swapped == layers_bench.exact(dense, QUERY, ref)
    after = snapshot(method) + snapshot(dense)
    for (kind, positions, keys), (kind_after, positions_after, keys_after) in zip(before, after):
        assert kind is kind_after and torch.equal(positions, positions_after)
        assert torch.equal(keys, keys_after)
