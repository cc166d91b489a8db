"""benchmarks/kvzip_heldout.py without a model: finished runs are read back, intervals are paired by
sample, seed 0's recorded scores and earlier seeds' rows are pooled in, rows of other recipes already
written are kept, and bad arguments stop before any model loads."""

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
    earlier = {"rows": [{"recipe": "kvzip(ratio=0.3)", "task": "kv", "seed": 1, "accuracy": 0.9},
                        {"recipe": "dense", "task": "kv", "seed": 2, "accuracy": 1.0,
                         "scores_by_sample": {"kv-0": 1.0}},
                        {"recipe": "kvzip(ratio=0.25)", "task": "kv", "seed": 2, "accuracy": 0.5,
                         "scores_by_sample": {"kv-0": 0.0, "kv-1": 1.0}}]}
    (tmp_path / "heldout.json").write_text(json.dumps(earlier))
    assert _main(monkeypatch, tmp_path, "--samples", "4", "--recipes", RECIPES) == 0
    written = json.loads((tmp_path / "heldout.json").read_text())["rows"]
    assert {(row["recipe"], row["seed"]) for row in written} == {("dense", 1), ("kvzip(ratio=0.25)", 1),
                                                                 ("kvzip(ratio=0.3)", 1), ("dense", 2),
                                                                 ("kvzip(ratio=0.25)", 2)}
    rows = {row["recipe"]: row for row in written if row["seed"] == 1}
    kvzip = rows["kvzip(ratio=0.25)"]
    assert kvzip["accuracy"] == 0.5 and kvzip["dense_accuracy"] == 0.75 and kvzip["ratio_to_dense"] == 0.667
    assert kvzip["vs_dense"]["diff"] == -0.25 and kvzip["vs_dense"]["n"] == 4
    # seed 0's two recorded samples, seed 1's four and seed 2's two, as distinct samples; dense has
    # one of seed 2's, so the pair (and the ratio) covers seven
    pooled = kvzip["pooled"]
    assert pooled["seeds"] == [0, 1, 2] and pooled["samples"] == 8
    assert pooled["accuracy"] == pytest.approx(4 / 8, abs=1e-4)
    assert pooled["paired_samples"] == 7 and pooled["vs_dense"]["n"] == 7
    assert pooled["dense_accuracy"] == pytest.approx(6 / 7, abs=1e-4)
    assert pooled["ratio_to_dense"] == round((3 / 7) / (6 / 7), 3)
    assert pooled["vs_dense"]["diff"] == pytest.approx(3 / 7 - 6 / 7, abs=1e-4)
    # every seed's row of a recipe carries the same pooled block; a row without scores has none
    seed_2 = next(r for r in written if r["recipe"] == "kvzip(ratio=0.25)" and r["seed"] == 2)
    assert seed_2["pooled"] == pooled
    assert "pooled" not in rows["kvzip(ratio=0.3)"]
    held = kvzip["heldout"]  # seeds 1 and 2 only: seed 0's two samples left out
    assert held["seeds"] == [1, 2] and held["samples"] == 6 and held["paired_samples"] == 5
    assert "vs_default" not in pooled  # the default itself


def test_a_variant_is_pooled_against_the_default_on_the_samples_both_have(monkeypatch, tmp_path):
    _finished_run(tmp_path / "runs", "dense", [1.0, 1.0, 1.0, 1.0])
    _finished_run(tmp_path / "runs", "kvzip(ratio=0.25)", [0.0, 1.0, 0.0, 1.0])
    _finished_run(tmp_path / "runs", "kvzip(ratio=0.25,alpha=0)", [1.0, 1.0, 0.0, 1.0])
    monkeypatch.setattr(heldout, "RESULTS", tmp_path)
    recipes = RECIPES + ";kvzip(ratio=0.25,alpha=0)"
    assert _main(monkeypatch, tmp_path, "--samples", "4", "--recipes", recipes) == 0
    rows = {row["recipe"]: row for row in json.loads((tmp_path / "heldout.json").read_text())["rows"]}
    assert rows["kvzip(ratio=0.25,alpha=0)"]["heldout"] == rows["kvzip(ratio=0.25,alpha=0)"]["pooled"]
    against = rows["kvzip(ratio=0.25,alpha=0)"]["pooled"]["vs_default"]
    assert against["recipe"] == "kvzip(ratio=0.25)" and against["samples"] == 4 and against["n"] == 4
    assert against["diff"] == pytest.approx(0.25)


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
