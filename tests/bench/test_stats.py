"""Bootstrap intervals, the paired difference against dense, and how summaries and tables show it."""

import json

import pytest
from rich.console import Console

from kvlife.bench import runner
from kvlife.bench.stats import bootstrap_mean, paired_difference
from kvlife.bench.summary import print_tables, summarize, write_summary


def test_interval_of_a_constant_is_the_constant():
    found = bootstrap_mean([1.0] * 8)
    assert (found.mean, found.low, found.high, found.n) == (1.0, 1.0, 1.0, 8)
    assert bootstrap_mean([]) is None


def test_interval_is_reproducible_and_covers_the_mean():
    values = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0]
    first, second = bootstrap_mean(values), bootstrap_mean(values)
    assert first == second
    assert first.low < first.mean < first.high
    assert 0.3 < first.low < 0.6 and 0.8 < first.high <= 1.0


def test_paired_difference_pairs_by_sample_and_gives_a_verdict():
    dense = {f"s{i}": 1.0 for i in range(16)}
    lost_all = {f"s{i}": 0.0 for i in range(16)}
    assert paired_difference(lost_all, dense).verdict == "worse"
    assert paired_difference(dense, lost_all).verdict == "better"
    # one answer lost of 16: the interval reaches 0, so no difference
    one_lost = {**dense, "s3": 0.0}
    found = paired_difference(one_lost, dense)
    assert found.mean == pytest.approx(-1 / 16) and found.verdict == "same"
    # unpaired samples are ignored
    assert paired_difference({"x": 0.0, **dense}, dense).n == 16


def _rows(scores_by_sample, task="kv"):
    rows = []
    for sample, scores in scores_by_sample.items():
        for turn, score in enumerate(scores, 1):
            rows.append(
                {
                    "task": task,
                    "sample_id": sample,
                    "turn": turn,
                    "score": score,
                    "prediction": str(score),
                    "context_tokens": 100,
                    "cache_bytes": 1000,
                    "prefill_s": 0.1,
                    "ttft_s": 0.1,
                }
            )
    return rows


def test_summary_marks_a_turn_worse_only_when_its_interval_is_below_zero():
    dense = _rows({f"s{i}": [1.0, 1.0] for i in range(12)})
    method = _rows({f"s{i}": [1.0, 0.0] for i in range(12)})
    summary = summarize(method, dense)
    vs = summary["tasks"]["kv"]["vs_dense"]
    assert vs["per_turn"]["1"]["verdict"] == "same" and vs["per_turn"]["1"]["diff"] == 0
    assert vs["per_turn"]["2"]["verdict"] == "worse" and vs["per_turn"]["2"]["ci_high"] < 0
    assert vs["all_turns"]["diff"] == -0.5
    assert summary["overall"]["vs_dense"]["all_turns"]["verdict"] == "worse"
    assert summary["tasks"]["kv"]["turn1_ci"] == [1.0, 1.0]
    assert "vs_dense" not in summarize(method)["tasks"]["kv"]


def _write_run(path, method, rows, dtype="float32"):
    path.mkdir(parents=True)
    identity = {
        "model": "m",
        "mode": "multi-request",
        "profile": "default",
        "seed": 0,
        "prompt_format": "chat",
        "own_answers": False,
        "method": method,
        **({"dtype": dtype} if dtype != "float32" else {}),
    }
    (path / "config.json").write_text(json.dumps({"identity": identity}))
    runner.append_rows(path / "predictions.jsonl", rows)


def test_dense_reference_must_share_the_dtype(tmp_path):
    _write_run(tmp_path / "a-dense", "dense", _rows({"s0": [1.0]}), dtype="bfloat16")
    _write_run(tmp_path / "b-snapkv", "snapkv", _rows({"s0": [0.0]}))
    assert write_summary(tmp_path / "b-snapkv")["dense_run"] is None
    _write_run(tmp_path / "c-dense", "dense", _rows({"s0": [1.0]}))
    summary = write_summary(tmp_path / "b-snapkv")
    assert summary["dense_run"] == "c-dense" and summary["tasks"]["kv"]["vs_dense"]["turn1"]["diff"] == -1.0


def test_table_in_80_columns_keeps_names_whole_and_shows_the_interval():
    dense = _rows({f"s{i}": [1.0, 1.0, 1.0, 1.0] for i in range(8)}, task="summary_with_needles")
    method = _rows({f"s{i}": [1.0, 0.0, 1.0, 1.0] for i in range(8)}, task="summary_with_needles")
    summary = {**summarize(method, dense), "dense_run": "dense-run", "config": {"method": "snapkv"}}
    console = Console(width=80, record=True, force_terminal=False)
    print_tables(summary, console)
    text = console.export_text()
    assert "summary_with_needles" in text and "average" in text and "…" not in text
    assert "-1.00" in text and "[-1.00," in text and "[-.25," in text  # the difference and its interval
    assert "turn 4" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_a_loss_that_rises_is_worse():
    method = {i: 2.0 + 0.01 * i for i in range(8)}
    dense = {i: 1.0 for i in range(8)}
    assert paired_difference(method, dense).verdict == "better"  # a score that rises
    assert paired_difference(method, dense, lower_is_better=True).verdict == "worse"  # an NLL that rises
    assert paired_difference(dense, method, lower_is_better=True).verdict == "better"
