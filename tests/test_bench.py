"""Scorers, task generators, and the resumable runner."""

import json

import pytest

from kvlife.bench import runner, score
from kvlife.bench.runner import BenchConfig
from kvlife.bench.summary import summarize
from kvlife.bench.tasks import TASKS, get_task
from kvlife.errors import ResultsError, TaskError
from tiny import ByteTokenizer, tiny_model

# ---- scorers -------------------------------------------------------------------------------------


def test_contains_exact_right_wrong_partial():
    ref = "5745b97b-297d-4a74-9d3c-14e135cbaca6"
    assert score.contains_exact(f"The value is {ref}.", ref) == 1.0
    assert score.contains_exact("24834d13-ce78-47a9-9341-3410f4d4a6d8", ref) == 0.0
    assert score.contains_exact("5745b97b-297d-4a74", ref) == 0.0  # partial UUID is wrong
    assert score.contains_exact("", ref) == 0.0


def test_alnum_exact_is_case_sensitive_and_whole():
    assert score.alnum_exact('The code is "QLi8XBbf1Bti".', "QLi8XBbf1Bti") == 1.0
    assert score.alnum_exact("qli8xbbf1bti", "QLi8XBbf1Bti") == 0.0
    assert score.alnum_exact("QLi8XBbf1", "QLi8XBbf1Bti") == 0.0
    assert score.alnum_exact("QLi8XBbf1BtiX", "QLi8XBbf1Bti") == 0.0


def test_items_recall_gives_partial_credit():
    assert score.items_recall("ABCDE, FGHIJ", "ABCDE, FGHIJ") == 1.0
    assert score.items_recall("FGHIJ", "ABCDE, FGHIJ") == 0.5
    assert score.items_recall("ABCDEFGHIJ", "ABCDE, FGHIJ") == 0.0
    assert score.items_recall("abcde and fghij", "ABCDE, FGHIJ") == 1.0


def test_items_f1_penalizes_extra_names():
    assert score.items_f1("ABCDE, FGHIJ", "ABCDE, FGHIJ") == 1.0
    assert score.items_f1("FGHIJ", "ABCDE, FGHIJ") == pytest.approx(2 / 3)
    assert score.items_f1("ABCDE, FGHIJ, KLMNO, PQRST", "ABCDE, FGHIJ") == pytest.approx(2 / 3)
    assert score.items_f1("no names here", "ABCDE, FGHIJ") == 0.0


def test_first_number():
    assert score.first_number("The largest number is 1,234.", "1234") == 1.0
    assert score.first_number("12 or 34", "34") == 0.0
    assert score.first_number("none", "34") == 0.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_scores_its_own_reference_as_right(name):
    task = get_task(name)
    sample = task.samples("default", 1)[0]
    for turn in sample.turns:
        assert task.score(turn.answer, turn.answer) == 1.0
        assert task.score("I do not know.", turn.answer) == 0.0


# ---- generators ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_samples_are_deterministic_and_prefix_stable(name):
    task = get_task(name)
    a, b = task.samples("default", 3, seed=5), task.samples("default", 2, seed=5)
    assert [s.context for s in a[:2]] == [s.context for s in b]
    assert task.samples("default", 1, seed=6)[0].context != a[0].context
    for sample in a:
        assert sample.turns and all(turn.answer for turn in sample.turns)
        for turn in sample.turns:  # every answer is findable in the context (or computable from it)
            if name in ("kv", "prefix_suffix"):
                assert turn.answer in sample.context


def test_scbench_profiles_have_scbench_sizes():
    kv = get_task("kv").samples("scbench", 1)[0]
    assert len(json.loads(kv.context.split("\n\n", 1)[1])) == 2500
    assert len(kv.turns) == 5 and len(kv.turns[0].answer) == 36


def test_unknown_task_and_profile():
    with pytest.raises(TaskError, match="unknown task"):
        get_task("nope")
    with pytest.raises(TaskError, match="no profile"):
        get_task("kv").samples("huge")


# ---- runner --------------------------------------------------------------------------------------


@pytest.fixture
def small_profile(monkeypatch):
    from kvlife.bench.tasks.kv import KVRetrieval

    monkeypatch.setitem(KVRetrieval.profiles, "test",
                        {"samples": 3, "pairs": 2, "turns": 2, "context_tokens": 40, "dense_json": False})


def _run(tmp_path, model, method="dense", mode="multi-turn", out=None):
    config = BenchConfig(
        model="tiny", tasks=["kv"], mode=mode, method=method, profile="test", prompt_format="plain"
    )
    return runner.run(
        config, out=out or tmp_path / "run", model=model, tokenizer=ByteTokenizer(), progress=False
    )


def test_run_writes_config_predictions_summary(tmp_path, small_profile):
    out = _run(tmp_path, tiny_model())
    config = json.loads((out / "config.json").read_text())
    assert config["identity"]["method"] == "dense" and "torch" in config["versions"]
    rows = runner.read_rows(out / "predictions.jsonl")
    assert len(rows) == 6 and {r["turn"] for r in rows} == {1, 2}
    for row in rows:
        for key in (
            "prediction",
            "reference",
            "score",
            "prefill_s",
            "ttft_s",
            "cache_bytes",
            "reference_nll",
        ):
            assert key in row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["kv"]["samples"] == 3 and "1" in summary["tasks"]["kv"]["per_turn"]


def test_killed_run_resumes_without_recomputing(tmp_path, small_profile, monkeypatch):
    model = tiny_model()
    calls = []
    real = runner.run_sample

    def counting(session, task, sample, max_turns):
        calls.append(sample.id)
        if len(calls) == 2 and not getattr(counting, "killed", False):
            counting.killed = True
            raise KeyboardInterrupt  # killed while the second sample is in flight
        return real(session, task, sample, max_turns)

    monkeypatch.setattr(runner, "run_sample", counting)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, model)
    done = runner.read_rows(tmp_path / "run" / "predictions.jsonl")
    assert {r["sample_id"] for r in done} == {"kv-0"}
    # a torn half-line from the kill must not break the resume
    with (tmp_path / "run" / "predictions.jsonl").open("a") as handle:
        handle.write('{"task": "kv", "sample_id": "kv-1", "tu')
    calls.clear()
    _run(tmp_path, model)
    assert calls == ["kv-1", "kv-2"]
    rows = runner.read_rows(tmp_path / "run" / "predictions.jsonl")
    assert sorted({r["sample_id"] for r in rows}) == ["kv-0", "kv-1", "kv-2"] and len(rows) == 6
    calls.clear()
    _run(tmp_path, model)  # complete: nothing recomputed, and no model needed
    assert calls == []


def test_resume_refuses_a_different_run(tmp_path, small_profile):
    _run(tmp_path, tiny_model())
    with pytest.raises(ResultsError, match="different run"):
        _run(tmp_path, tiny_model(), method="streamingllm(n_local=8)", out=tmp_path / "run")


def test_resume_refuses_a_run_made_under_another_default(tmp_path, small_profile, monkeypatch):
    """The spec names only non-default parameters; config.json holds them all, and a resume after a
    default changed (the same spec, another computation) is refused."""
    from kvlife.methods.compress.streamingllm import StreamingLLM
    out = _run(tmp_path, tiny_model(), method="streamingllm(n_local=8)")
    params = json.loads((out / "config.json").read_text())["method_params"]
    assert params["streamingllm"]["n_local"] == 8 and "n_sink" in params["streamingllm"]
    _run(tmp_path, tiny_model(), method="streamingllm(n_local=8)")  # the same parameters: resumes
    monkeypatch.setattr(StreamingLLM.__dataclass_fields__["n_sink"], "default", 2)  # a release where 2 is
    with pytest.raises(ResultsError, match="other parameters"):
        _run(tmp_path, tiny_model(), method="streamingllm(n_local=8,n_sink=2)")


def test_unwritable_output_dir(tmp_path, small_profile):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ResultsError, match="cannot write results"):
        _run(tmp_path, tiny_model(), out=blocker / "run")


def test_dense_agreement_uses_a_sibling_dense_run(tmp_path, small_profile):
    model = tiny_model()
    _run(tmp_path, model, out=tmp_path / "dense")
    out = _run(tmp_path, model, method="streamingllm(n_local=10000)", out=tmp_path / "stream")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dense_run"] == "dense"
    assert summary["tasks"]["kv"]["dense_agreement"] == 1.0


def test_summarize_per_turn():
    rows = [{"task": "kv", "sample_id": f"s{i}", "turn": t, "score": float(t == 1), "context_tokens": 10,
             "cache_bytes": 100, "prefill_s": 1.0, "ttft_s": 1.0, "decode_tok_s": 5.0, "reference_nll": 0.5,
             "prediction": "x"} for i in range(2) for t in (1, 2)]
    summary = summarize(rows)
    assert summary["tasks"]["kv"]["per_turn"] == {"1": 1.0, "2": 0.0}
    assert summary["tasks"]["kv"]["all_turns"] == 0.5 and summary["overall"]["turn1"] == 1.0


def test_html_report_has_table_and_plots(tmp_path, small_profile):
    from kvlife.bench.report import write_html

    model = tiny_model()
    runs = [_run(tmp_path, model, out=tmp_path / "dense"),
            _run(tmp_path, model, method="streamingllm(n_local=8)", out=tmp_path / "stream"),
            _run(tmp_path, model, mode="multi-request", out=tmp_path / "dense-mr")]
    page = write_html(runs, tmp_path / "report.html").read_text()
    assert "<table id='scores'>" in page and page.count("<tr") > 6
    for name in ("turns", "bytes", "modes"):
        assert f"id='plot-{name}'" in page
    assert page.count("data:image/png;base64,") == 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_seed_and_dtype_give_the_same_scores(tmp_path, small_profile, dtype):
    import torch

    runs = []
    for name in ("a", "b"):
        model = tiny_model().to(getattr(torch, dtype))
        config = BenchConfig(model="tiny", tasks=["kv"], mode="multi-request", method="snapkv(ratio=0.5)",
                             profile="test", prompt_format="plain", seed=3, dtype=dtype)
        out = runner.run(config, out=tmp_path / name, model=model, tokenizer=ByteTokenizer(), progress=False)
        runs.append(runner.read_rows(out / "predictions.jsonl"))
    fields = ("sample_id", "turn", "prediction", "score", "reference_nll", "dtype")
    assert [[row[f] for f in fields] for row in runs[0]] == [[row[f] for f in fields] for row in runs[1]]
    assert {row["dtype"] for row in runs[0]} == {dtype} and len(runs[0]) == 6
