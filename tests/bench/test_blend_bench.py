"""benchmarks/blend.py: its table and target from rows, and what the wrong answers are (no model)."""

import argparse
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("blend_bench", BENCH / "blend.py")
blend = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blend)

from blend_answers import answer_kinds  # noqa: E402

from kvlife.bench.tasks import get_task, rag  # noqa: E402


def _row(method, sample, predictions, scores, ttft, size=4096, threads=2, machine=None):
    return {"size": size, "sample_id": sample, "method": method, "model": "m", "dtype": "float32",
            "threads": threads, "ttft_s": ttft, **({"machine": machine} if machine else {}),
            "accuracy": sum(scores) / len(scores),
            "turns": [{"prediction": p, "reference": "x", "score": s, "reference_nll": 1.0}
                      for p, s in zip(predictions, scores)],
            "assembly": {"assembled_tokens": 4000, "recomputed_rows_last_layer": 100,
                         "assemble_load_s": 0.1, "assemble_recompute_s": 1.0}}


def test_wrong_answers_are_told_apart():
    sample = get_task("rag").samples("default", 1, seed=0, context_tokens=4096)[0]
    settings = get_task("rag").settings("default", 4096)
    pool = rag.document_pool(0, settings["pool"], settings["doc_tokens"])
    people = [pool[int(d.rsplit("-", 1)[1])][1] for d in sample.meta["documents"]]
    asked = next(p for p in people if p.name == sample.meta["asked"][0])
    other = next(p for p in people if p.name not in sample.meta["asked"])
    rows = [{"size": 4096, "sample_id": sample.id, "method": "concat", "turns": [
        {"prediction": "A traveller painted the quiet harbour", "reference": asked.town, "score": 0.0},
        {"prediction": f"In {other.town}.", "reference": asked.town, "score": 0.0},
        {"prediction": "I do not know", "reference": asked.town, "score": 0.0},
        {"prediction": asked.town, "reference": asked.town, "score": 1.0},
        {"prediction": asked.town, "reference": f"{asked.town}, x", "score": 0.5}]}]
    assert answer_kinds(rows, 4096, seed=0) == {
        "concat": {"filler": 1, "another_document": 1, "other": 1, "right": 1, "partly": 1}}


def test_table_pairs_ttft_only_at_one_thread_count_and_reads_the_target_both_ways(tmp_path):
    rows = []
    for i in range(6):
        rows += [_row("dense", f"rag-{i}", ["x", "x"], [1, 1 if i % 2 else 0], 100.0, size=8192),
                 _row("epic(k=16)", f"rag-{i}", ["x", "y"], [1, 0], 10.0, size=8192),
                 _row("cacheblend(ratio=0.15)", f"rag-{i}", ["x", "x"], [1, 1 if i % 2 else 0], 25.0,
                      size=8192),
                 # run at another thread count than dense: accuracy pairs, TTFT does not
                 _row("concat", f"rag-{i}", ["y", "y"], [0, 0], 1.0, size=8192, threads=1),
                 # on another machine than dense (whose rows name none: the earlier one): no TTFT either
                 _row("epic(k=4)", f"rag-{i}", ["x", "y"], [1, 0], 2.0, size=8192, machine="another CPU")]
    (tmp_path / "blend-rows.jsonl").write_text("".join(blend.json.dumps(r) + "\n" for r in rows))
    methods = ["dense", "concat", "epic(k=16)", "cacheblend(ratio=0.15)"]
    args = argparse.Namespace(out=tmp_path, sizes=[8192], methods=methods, samples=6, store="memory", seed=0)
    payload = blend.collect(args)
    epic = next(r for r in payload["rows"] if r["method"] == "epic(k=16)")
    concat = next(r for r in payload["rows"] if r["method"] == "concat")
    assert epic["speedup"] == 10.0 and epic["timed_samples"] == 6
    assert concat["ttft_s"] is None and concat["timed_samples"] == 0 and concat["samples"] == 6
    # epic: 0.5 against dense 0.75 (differences -0.5 or 0): the paired interval excludes 0; cacheblend
    # answers as dense at 4x: under the 5x asked
    assert epic["ci_high"] < 0 and epic["within_dense_interval"] is False
    assert payload["target"]["met_by"] == payload["target"]["met_by_both_readings"] == []
    blended = next(r for r in payload["rows"] if r["method"] == "cacheblend(ratio=0.15)")
    assert blended["ci_low"] == blended["ci_high"] == 0 and blended["within_dense_interval"]
    assert blended["speedup"] == 4.0
    assert payload["complete"] and "| - |" in (tmp_path / "blend-report.md").read_text()
    other = next(r for r in payload["rows"] if r["method"] == "epic(k=4)")
    assert other["ttft_s"] is None and other["timed_on"] is None and other["samples"] == 6
    assert epic["timed_on"] == blend.EARLIER_MACHINE


def test_anchors_are_documents_of_the_task_that_no_sample_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(blend, "ANCHORS", tmp_path)
    blend.write_anchors(argparse.Namespace(sizes=[4096, 8192]))
    task = get_task("rag")
    for size in (4096, 8192):
        text = (tmp_path / f"rag-anchor-{size}.txt").read_text()
        assert text == (BENCH / "data" / f"rag-anchor-{size}.txt").read_text()  # the committed files
        assert text.startswith(rag.SEPARATOR + "Document 1: the record of ")
        samples = task.samples("default", 16, seed=0, context_tokens=size)
        name = text.split("the record of ")[1].split(".")[0]
        assert all(name not in sample.context for sample in samples)
