"""benchmarks/lifecycle.py without a model: rows of the committed results survive a checkout without
results/, and new rows pair with the rows they need (scores kept in the results file)."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("lifecycle_bench", BENCH / "lifecycle.py")
lifecycle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lifecycle)


def _row(recipe, task, scores=None, machine="old CPU", accuracy=0.5, **extra):
    row = {"recipe": recipe, "encoding": "raw", "task": task, "target_context_tokens": None,
           "context_tokens": 2000, "samples": 2, "turns": 4, "accuracy": accuracy, "run": f"run-{recipe}",
           "ttft_full_s": 10.0, "ttft_hit_s": 1.0, "ttft_speedup": 10.0, "bytes_per_token": 100.0,
           "dense_fp16_bytes_per_token": 1000, "machine": machine, **extra}
    if scores is not None:
        row["scores_by_sample"] = scores
    return row


def _lifecycle(tmp_path, recorded):
    results = tmp_path / "lifecycle.json"
    results.write_text(json.dumps({"machine": "old CPU", "rows": recorded}))
    args = argparse.Namespace(json=str(results), out=str(tmp_path / "out"), model="m", dtype="float32",
                              samples=2, long_samples=1)
    return lifecycle.Lifecycle(args), results


def test_a_checkout_without_results_keeps_every_recorded_row(tmp_path):
    recorded = [_row("dense", "kv", accuracy=1.0, ci_low=0.0, ci_high=0.0),
                _row("snapkv(ratio=0.25)", "kv", accuracy=0.0, ci_low=-1.0, ci_high=-0.8, verdict="worse")]
    runner, results = _lifecycle(tmp_path, recorded)
    runner.write(lifecycle.SETS["all"])
    rows = json.loads(results.read_text())["rows"]
    assert [(r["recipe"], r["carried"]) for r in rows] == [("dense", True), ("snapkv(ratio=0.25)", True)]
    # no scores to pair with: the recorded interval stands as it was computed
    assert rows[1]["ci_low"] == -1.0 and rows[1]["verdict"] == "worse"


def test_a_row_that_needs_an_unpaired_dense_row_measures_it_first(tmp_path):
    recorded = [_row("dense", "kv"), _row("dense", "qa_eng", scores={"qa_eng-0": 1.0})]
    runner, _ = _lifecycle(tmp_path, recorded)
    keys = [("kvzip(ratio=0.1)", "raw", "kv", None), ("kvzip(ratio=0.1)", "raw", "qa_eng", None)]
    assert runner.plan(keys) == [("dense", "raw", "kv", None), *keys]
    # a carried row asked for again (--redo) is measured again; one with scores is not otherwise
    assert runner.plan([("dense", "raw", "qa_eng", None)]) == []
    assert runner.plan([("dense", "raw", "qa_eng", None)], {("dense", "raw", "qa_eng", None)}) == [
        ("dense", "raw", "qa_eng", None)]


def test_new_rows_pair_with_recorded_scores_and_times_pair_on_one_machine(tmp_path):
    dense = _row("dense", "kv", scores={"kv-0": 1.0, "kv-1": 1.0}, accuracy=1.0)
    runner, results = _lifecycle(tmp_path, [dense])
    rows_dir = tmp_path / "out" / "rows"
    mine = _row("kvzip(ratio=0.1)", "kv", scores={"kv-0": 0.0, "kv-1": 1.0}, machine="new CPU")
    (rows_dir / "kvzip.json").write_text(json.dumps(mine))
    runner.write(lifecycle.SETS["all"])
    rows = {r["recipe"]: r for r in json.loads(results.read_text())["rows"]}
    new = rows["kvzip(ratio=0.1)"]
    assert new["diff_vs_dense"] == -0.5 and new["dense_accuracy"] == 1.0
    assert new["ttft_speedup_vs_dense_prefill"] is None  # dense ran on another machine
    assert "carried" not in new and rows["dense"]["carried"]


def test_a_carried_row_reads_predictions_only_from_a_run_of_its_own_recipe(tmp_path):
    """After a default changed, an old row relabelled `kvzip(...,alpha=0)` can name a run directory that
    now holds the new default's run (the directory is named by the recipe as typed)."""
    runner, _ = _lifecycle(tmp_path, [])
    run = tmp_path / "out" / "shared-run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"identity": {"method": "kvzip(ratio=0.25)"}}))
    (run / "predictions.jsonl").write_text(
        "".join(json.dumps({"task": "kv", "sample_id": f"kv-{i}", "turn": 1, "score": 1.0}) + "\n"
                for i in range(2)))
    old = _row("kvzip(ratio=0.25,alpha=0)", "kv", run="shared-run")
    new = _row("kvzip(ratio=0.25)", "kv", run="shared-run")
    assert runner.by_sample(old) is None
    assert runner.by_sample(new) == {("kv", "kv-0"): 1.0, ("kv", "kv-1"): 1.0}
    assert runner.by_sample(_row("dense", "kv", run="no-such-run")) is None
