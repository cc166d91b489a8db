"""SCBench's released data format: fixture rows in that exact format, read into kvlife samples."""

import json
import sys
from pathlib import Path

import pytest

from kvlife.bench import data, runner
from kvlife.bench.runner import BenchConfig
from kvlife.bench.tasks import TASKS, get_task
from kvlife.errors import TaskError
from tiny import ByteTokenizer, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"


def test_every_scbench_file_maps_to_a_kvlife_task():
    assert len(data.FILE_TASKS) == 12
    assert data.FILE_TASKS["scbench_vt"] == "multihop" and data.FILE_TASKS["scbench_mf"] == "math_find"
    for task in data.FILE_TASKS.values():
        get_task(task)  # every target exists


def test_kv_rows_become_samples():
    samples = data.load_samples(get_task("kv"), str(FIXTURES))
    assert len(samples) == 1 and samples[0].id == "kv-0"
    sample = samples[0]
    assert sample.context.startswith("JSON data:") and len(sample.turns) == 2
    assert sample.turns[0].answer == "24834d13-ce78-47a9-9341-3410f4d4a6d8"
    assert sample.turns[0].query.startswith('Key: "5745b97b') and "value only" in sample.turns[0].query
    assert get_task("kv").score(f"It is {sample.turns[1].answer}", sample.turns[1].answer) == 1.0


def test_rows_without_or_sharing_an_id_get_their_own_sample_ids(tmp_path):
    row = json.loads((FIXTURES / "scbench_kv.jsonl").read_text().splitlines()[0])
    rows = [{**row, "id": None}, {**row, "id": None}, {**row, "id": 7}, {**row, "id": 7}, {**row, "id": 9}]
    (tmp_path / "scbench_kv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [sample.id for sample in data.load_samples(get_task("kv"), str(tmp_path))]
    assert ids == ["kv-0", "kv-1", "kv-2", "kv-3", "kv-9"]


def test_every_task_with_released_rows_names_them_in_its_own_file():
    configs = {name: cls.scbench_config for name, cls in TASKS.items() if cls.scbench_config}
    assert data.TASK_FILES == configs
    assert TASKS["multihop"].scbench_joins_answers and not TASKS["kv"].scbench_joins_answers


def test_answers_lists_options_and_per_turn_kinds():
    vt = data.load_samples(get_task("multihop"), str(FIXTURES))[0]
    assert vt.turns[0].answer == "QWERT, ASDFG"  # every variable is wanted
    qa = data.load_samples(get_task("qa_eng"), str(FIXTURES))[0]
    assert qa.turns[0].answer == "Edda Holm" and qa.meta["answers"] == [["Edda Holm", "Holm"]]
    choice = data.load_samples(get_task("choice_eng"), str(FIXTURES))[0]
    assert [t.answer for t in choice.turns] == ["B) Pell", "C) Dunmoor"]  # option text and letter answers
    assert "A) Mara\nB) Pell\nC) Dunmoor\nD) Tam\n" in choice.turns[0].query
    assert get_task("choice_eng").score("B", choice.turns[0].answer) == 1.0
    zh = data.load_samples(get_task("qa_chn"), str(FIXTURES))[0]
    assert get_task("qa_chn").score("青石镇", zh.turns[0].answer) == 1.0
    mixed = data.load_samples(get_task("summary_with_needles"), str(FIXTURES))[0]
    task = get_task("summary_with_needles")
    assert task.score("The passkey is 48213.", mixed.turns[1].answer) == 1.0
    assert 0 < task.score("A bridge was built.", mixed.turns[0].answer) < 1


def test_repoqa_rows_score_against_the_repository_functions():
    task = get_task("repoqa")
    sample = data.load_samples(task, str(FIXTURES))[0]
    assert sample.meta["lang"] == "python" and sample.meta["repo"] == "example/tiny"
    answer = sample.turns[0].answer
    assert "multiplies every element" in sample.turns[0].query
    assert task.score(f"```python\n{answer}\n```", answer) == 1.0
    assert task.score("def add(a, b):\n    total = a + b\n    return total", answer) == 0.0
    mixed_task = get_task("repoqa_and_kv")
    mixed = data.load_samples(mixed_task, str(FIXTURES))[0]
    assert "copy its complete code" in mixed.turns[0].query and "value only" in mixed.turns[1].query
    assert mixed_task.score(mixed.turns[0].answer, mixed.turns[0].answer) == 1.0
    assert mixed_task.score(mixed.turns[1].answer, mixed.turns[1].answer) == 1.0


def test_truncate_middle_keeps_both_ends():
    sample = data.load_samples(get_task("kv"), str(FIXTURES))[0]
    cut = data.truncate_middle(sample, ByteTokenizer(), 40)
    assert len(cut.context.encode()) == 40
    assert cut.context[:20] == sample.context[:20] and cut.context[-20:] == sample.context[-20:]
    assert cut.meta["truncated_from_tokens"] == len(sample.context.encode())
    assert data.truncate_middle(sample, ByteTokenizer(), 10_000) is sample


def test_bench_runs_on_official_rows_with_max_length(tmp_path, monkeypatch):
    monkeypatch.setattr(TASKS["kv"], "scbench_max_new_tokens", 4)  # a random tiny model: keep decoding short
    config = BenchConfig(model="tiny", tasks=["kv"], mode="multi-request", prompt_format="plain",
                         data=str(FIXTURES), max_length=64)
    assert config.identity()["data"] == str(FIXTURES) and config.identity()["max_length"] == 64
    assert "data" not in BenchConfig(model="tiny", tasks=["kv"]).identity()  # old run ids unchanged
    out = runner.run(
        config, out=tmp_path / "run", model=tiny_model(), tokenizer=ByteTokenizer(), progress=False
    )
    rows = runner.read_rows(out / "predictions.jsonl")
    assert [(r["sample_id"], r["turn"]) for r in rows] == [("kv-0", 1), ("kv-0", 2)]
    assert all(r["task"] == "kv" and r["sample_id"] for r in rows)
    assert all(r["context_tokens"] <= 64 + 2 for r in rows)


def test_missing_data_and_bad_rows_are_clear_errors(tmp_path):
    with pytest.raises(TaskError, match="no such directory"):
        data.read_rows(str(tmp_path / "nope"), "kv")
    with pytest.raises(TaskError, match="expected scbench_kv.jsonl"):
        data.read_rows(str(tmp_path), "kv")
    (tmp_path / "scbench_kv.jsonl").write_text(json.dumps({"id": 1, "text": "x"}) + "\n")
    with pytest.raises(TaskError, match="lacks `context`"):
        data.read_rows(str(tmp_path), "kv")
    (tmp_path / "scbench_kv.jsonl").write_text("{not json\n")
    with pytest.raises(TaskError, match="not valid JSON"):
        data.read_rows(str(tmp_path), "kv")


def test_parquet_needs_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "scbench_mf").mkdir()
    (tmp_path / "scbench_mf" / "test-00000.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(TaskError, match="needs pyarrow"):
        data.read_rows(str(tmp_path), "math_find")


def test_parquet_rows_when_pyarrow_is_installed(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow not installed (parquet is optional)")
    import pyarrow as pa

    rows = [json.loads(line) for line in (FIXTURES / "scbench_kv.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "scbench_kv.parquet")
    assert data.read_rows(str(tmp_path), "kv") == rows


def test_hub_without_datasets_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TaskError, match="needs `datasets`") as info:
        data.read_rows("hub", "kv")
    assert "\n" not in str(info.value)


def test_cli_bench_with_data_fails_in_one_line(tmp_path, capsys):
    from kvlife import cli

    assert (
        cli.main(["bench", "--data", str(tmp_path / "nope"), "--tasks", "kv", "--model", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlife: error:") and "\n" not in err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("scbench_kv.jsonl", b"\xff\xfe" + bytes(range(256)) * 4, "not UTF-8"),
        (
            "scbench_kv.jsonl",
            json.dumps({"id": 1, "context": "c", "multi_turns": [1, 2]}).encode(),
            "multi_turns",
        ),
        (
            "scbench_kv.jsonl",
            json.dumps({"id": 1, "context": "c", "multi_turns": []}).encode(),
            "multi_turns",
        ),
        ("scbench_kv.jsonl", b"", "empty"),
        ("scbench_kv.jsonl", b"\n  \n", "empty"),
        ("scbench_kv.parquet", b"PAR1" + bytes(range(256)) + b"PAR1", "not a readable parquet"),
    ],
)
def test_bad_data_files_are_one_line_errors(tmp_path, name, content, message):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow.parquet", reason="pyarrow not installed (parquet is optional)")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TaskError, match=message) as info:
        data.load_samples(get_task("kv"), str(tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"\xff\xfe" + bytes(range(256)), b""])
def test_cli_bench_with_bad_data_exits_2_in_one_line(tmp_path, capsys, content):
    from kvlife import cli

    (tmp_path / "scbench_kv.jsonl").write_bytes(content)
    assert cli.main(["bench", "--data", str(tmp_path), "--model", "tiny-missing", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlife: error:") and "\n" not in err
