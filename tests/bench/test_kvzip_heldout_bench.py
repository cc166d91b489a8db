"""benchmarks/kvzip_heldout.py without a model: finished runs are read back, intervals are paired by
sample, seed 0's recorded scores are pooled in, rows of other recipes already written are kept, and
bad arguments stop before any model loads."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from kvlife.bench.runner import BenchConfig

BENCH = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("kvzip_heldout_bench", BENCH / "kvzip_heldout.py")
heldout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heldout)

RECIPES = "dense;kvzip(ratio=0.25)"


def _finished_run(out: Path, recipe: str, scores: list[float]) -> None:
    config = BenchConfig(model="qwen2.5-coder-0.5b", tasks=["kv"], mode="multi-request", method=recipe,
                         samples=len(scores), seed=1, dtype="float32")
    run = out / config.run_id()
    run.mkdir(parents=True)
    rows = [{"task": "kv", "sample_id": f"kv-{i}", "turn": 1, "score": score, "reference_nll": 0.1}
            for i, score in enumerate(scores)]
    (run / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run / "summary.json").write_text("{}")


def _main(monkeypatch, tmp_path, *argv) -> int:
    monkeypatch.setattr(sys, "argv", ["kvzip_heldout.py", "--out", str(tmp_path / "runs"),
                                      "--json", str(tmp_path / "heldout.json"), *argv])
    return heldout.main()


def test_finished_runs_are_paired_pooled_and_earlier_rows_kept(monkeypatch, tmp_path):
    _finished_run(tmp_path / "runs", "dense", [1.0, 1.0, 0.0, 1.0])
    _finished_run(tmp_path / "runs", "kvzip(ratio=0.25)", [1.0, 0.0, 0.0, 1.0])
    recorded = {"rows": [{"recipe": recipe, "encoding": "raw", "task": "kv", "target_context_tokens": None,
                          "scores_by_sample": {"kv-0": score, "kv-1": score}}
                         for recipe, score in (("dense", 1.0), ("kvzip(ratio=0.25)", 0.5))]}
    (tmp_path / "lifecycle.json").write_text(json.dumps(recorded))
    monkeypatch.setattr(heldout, "RESULTS", tmp_path)
    earlier = {"rows": [{"recipe": "kvzip(ratio=0.3)", "task": "kv", "seed": 1, "accuracy": 0.9}]}
    (tmp_path / "heldout.json").write_text(json.dumps(earlier))
    assert _main(monkeypatch, tmp_path, "--samples", "4", "--recipes", RECIPES) == 0
    rows = {row["recipe"]: row for row in json.loads((tmp_path / "heldout.json").read_text())["rows"]}
    assert set(rows) == {"dense", "kvzip(ratio=0.25)", "kvzip(ratio=0.3)"}
    kvzip = rows["kvzip(ratio=0.25)"]
    assert kvzip["accuracy"] == 0.5 and kvzip["dense_accuracy"] == 0.75 and kvzip["ratio_to_dense"] == 0.667
    assert kvzip["vs_dense"]["diff"] == -0.25 and kvzip["vs_dense"]["n"] == 4
    # seed 0's two recorded samples and seed 1's four, as distinct samples
    assert kvzip["pooled"]["samples"] == 6 and kvzip["pooled"]["vs_dense"]["n"] == 6
    assert kvzip["pooled"]["accuracy"] == pytest.approx(3 / 6, abs=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--recipes", "kvzip(ratio=0.25)"], "dense first"),
    (["--recipes", "dense;kvzip(ratio=0)"], "ratio must be in (0, 1]"),
    (["--seed", "0"], "screening seed"),
])
def test_bad_arguments_exit_2_before_any_model(monkeypatch, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        _main(monkeypatch, tmp_path, *argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "heldout.json").exists()
