"""The OpenAI backend against a real engine: llama.cpp's llama-server on loopback, serving the
embedded SmolLM2-135M GGUF with prompt caching on.

Skipped (with the reason) when no llama-server binary is found: `scripts/llama-server.sh` builds
one (CI does, through KVLIFE_LLAMA_SERVER=build in scripts/test.sh), or set $KVLIFE_LLAMA_SERVER.
Asserts counts the server reports, never speed (benchmarks/openai_backend.py measures TTFT).
"""

from __future__ import annotations

import os

import pytest

from kvlife import cli, models
from kvlife.backends.openai import OpenAIBackend
from kvlife.bench import runner
from kvlife.bench.runner import BenchConfig
from kvlife.errors import ModelError

# conftest gives each test a temporary KVLIFE_HOME; the binary and the GGUF live in the real one
REAL_HOME = str(models.kvlife_home())
ALIAS = models.TEST_MODEL


@pytest.fixture(scope="module")
def server():
    from kvlife.backends.llama_server import LlamaServer, embedded_gguf, find_binary

    saved = os.environ.get("KVLIFE_HOME")
    os.environ["KVLIFE_HOME"] = REAL_HOME
    try:
        binary = find_binary()
        if binary is None:
            pytest.skip("no llama-server binary: build it with scripts/llama-server.sh (llama.cpp, once, "
                        "~15 min on 2 cores) or point $KVLIFE_LLAMA_SERVER at one")
        try:
            gguf = embedded_gguf(ALIAS)
        except ModelError as exc:
            pytest.skip(f"the {ALIAS} GGUF is not available: {exc}")
    finally:
        if saved is None:
            os.environ.pop("KVLIFE_HOME", None)
        else:
            os.environ["KVLIFE_HOME"] = saved
    with LlamaServer(binary, gguf, alias=ALIAS, ctx_size=4096, parallel=1, threads=1) as running:
        yield running


@pytest.fixture
def kv_profile(monkeypatch):
    from kvlife.bench.tasks.kv import KVRetrieval

    monkeypatch.setitem(KVRetrieval.profiles, "llama",
                        {"samples": 2, "pairs": 3, "turns": 3, "context_tokens": 600, "dense_json": False})


def _run(server, tmp_path, mode: str) -> list[dict]:
    config = BenchConfig(
        model=ALIAS, tasks=["kv"], mode=mode, profile="llama", backend="openai", base_url=server.url
    )
    out = runner.run(
        config, out=tmp_path / mode, progress=False, backend=OpenAIBackend(server.url, timeout_s=120)
    )
    return runner.read_rows(out / "predictions.jsonl")


def test_multi_request_turns_after_the_first_come_from_the_engines_cache(server, kv_profile, tmp_path):
    rows = _run(server, tmp_path, "multi-request")
    assert len(rows) == 6
    for row in rows:
        assert row["prompt_tokens"] > 500 and row["new_tokens"] > 0 and row["ttft_s"] <= row["latency_s"]
        assert row["server_prompt_tokens"] + row["cached_tokens"] == row["prompt_tokens"]
    for row in rows:
        if row["turn"] == 1:  # a new context: only the chat template's head can be reused
            assert row["cached_tokens"] < 0.2 * row["prompt_tokens"]
        else:  # the shared context is served from the slot's cache; only the query is computed
            assert row["cached_tokens"] > 0.85 * row["prompt_tokens"]
            assert row["server_prompt_tokens"] < 60


def test_multi_turn_chat_reuses_the_previous_turns(server, kv_profile, tmp_path):
    rows = _run(server, tmp_path, "multi-turn")
    by_sample: dict[str, list[dict]] = {}
    for row in rows:
        by_sample.setdefault(row["sample_id"], []).append(row)
    for turns in by_sample.values():
        turns.sort(key=lambda r: r["turn"])
        for before, after in zip(turns, turns[1:]):
            assert after["prompt_tokens"] > before["prompt_tokens"]  # the chat grows
            # the previous request's prompt is reused (up to where the template re-renders it)
            assert after["cached_tokens"] >= before["prompt_tokens"] - 8


def test_a_model_name_the_server_does_not_serve_is_one_line(server, kv_profile, tmp_path, capsys):
    code = cli.main(["bench", "--backend", "openai", "--base-url", server.url, "--model", "no-such-model",
                     "--tasks", "kv", "--profile", "llama", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"it serves: {ALIAS}" in err
