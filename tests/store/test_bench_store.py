"""`kvlife bench --store`: runs (and methods sharing the dense prefill) reuse each other's prefills."""

import pytest

from kvlife import cli
from kvlife.bench import runner
from kvlife.bench.runner import BenchConfig
from kvlife.store import open_store
from tiny import ByteTokenizer, tiny_model


@pytest.fixture
def small_profile(monkeypatch):
    from kvlife.bench.tasks.kv import KVRetrieval

    monkeypatch.setitem(KVRetrieval.profiles, "test",
                        {"samples": 1, "pairs": 2, "turns": 1, "context_tokens": 60, "dense_json": False})


def _rows(out):
    return runner.read_rows(out / "predictions.jsonl")


def test_bench_reuses_prefills_across_runs_and_methods(tmp_path, small_profile):
    model, store = tiny_model(), open_store("memory", chunk_size=8)
    outs = []
    for index, method in enumerate(["dense", "quest(page_size=4,budget=16)"]):
        config = BenchConfig(model="tiny", tasks=["kv"], mode="multi-request", method=method, profile="test",
                             prompt_format="plain", max_turns=1)
        outs.append(runner.run(config, out=tmp_path / f"run{index}", model=model, tokenizer=ByteTokenizer(),
                               progress=False, store=store))
    dense, quest = (_rows(out) for out in outs)
    assert all(r["store"]["store_hit_tokens"] == 0 for r in dense)
    assert all(r["store"]["store_hit_tokens"] > 0 for r in quest)


def test_cli_bench_store_flag_reports_bad_urls(capsys):
    code = cli.main(["bench", "--store", "ftp://nowhere", "--tasks", "kv", "--no-progress"])
    assert code == cli.EXIT_USER_ERROR
    assert "unknown store tier" in capsys.readouterr().err


def test_cli_serve_needs_a_token(tmp_path, capsys):
    code = cli.main(["serve", "--store", str(tmp_path)])
    assert code == cli.EXIT_USER_ERROR
    assert "token" in capsys.readouterr().err
