"""benchmarks/long.py: rows and SCBench findings from runs, judged by paired intervals."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "long_bench", Path(__file__).parents[2] / "benchmarks" / "long.py"
)
long_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(long_bench)


def _rows(scores_by_turn, n=12, task="kv"):
    return [{"task": task, "sample_id": f"s{i}", "turn": turn, "score": score, "context_tokens": 8000,
             "cache_bytes": 100} for i in range(n) for turn, score in enumerate(scores_by_turn, 1)]


def test_findings_hold_only_beyond_noise():
    rows = {
        ("dense", "multi-turn"): _rows([1, 1, 1, 1]),
        ("dense", "multi-request"): _rows([1, 1, 1, 1]),
        ("snapkv(ratio=0.25)", "multi-turn"): _rows([1, 0, 0, 0]),  # decays after turn 1
        ("snapkv(ratio=0.25)", "multi-request"): _rows([0, 0, 0, 0]),  # collapses before any query
        ("streamingllm(ratio=0.25)", "multi-turn"): _rows([1, 1, 1, 1]),  # no decay
        ("minference", "multi-turn"): _rows([1, 1, 1, 1]),
        ("a_shape", "multi-turn"): _rows([1, 1, 1, 1]),  # no difference: not shown
    }
    found = {(f["finding"], f.get("method") or f.get("static")): f for f in long_bench.findings(rows)}
    assert found[("sub-O(n) memory decays across turns", "snapkv(ratio=0.25)")]["holds"]
    assert not found[("sub-O(n) memory decays across turns", "streamingllm(ratio=0.25)")]["holds"]
    assert found[("multi-request hurts query-aware eviction", "snapkv(ratio=0.25)")]["holds"]
    assert not found[("dynamic sparse prefill beats static patterns", "a_shape")]["holds"]
    table = long_bench.table_rows(rows, 8192)
    snap = next(r for r in table if r["method"] == "snapkv(ratio=0.25)" and r["mode"] == "multi-request")
    assert snap["diff_vs_dense"] == -1.0 and snap["ci_high"] < 0 and snap["samples"] == 12
    assert {"method", "mode", "task", "context_tokens", "samples", "accuracy", "diff_vs_dense", "ci_low",
            "ci_high"} <= set(snap)
