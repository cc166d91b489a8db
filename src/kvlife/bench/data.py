"""SCBench's released data: read its rows from local JSONL or parquet files (or the hub) as Samples.

A row is `{"id", "context", "multi_turns": [{"input", "answer", "options"?, "name"?, "task"?}],
...}` with per-task fields (`lang`, `repo` for repoqa). Files are named after SCBench's configs
(`scbench_kv.jsonl`, `scbench_vt.parquet`, or a directory `scbench_kv/` of such files, as the hub
lays them out), and map to the kvlife task whose `scbench_config` names them (`FILE_TASKS`). Each
turn is asked as its task asks released rows (`Task.released_turn`: the task's instruction after
the row's `input`; choice_eng lists the options) with the task's `scbench_max_new_tokens`; list
answers keep their first element as the reference (the others go to `meta`), or all of them where
the task says so. Scoring is the task's own. A sample's id is the task and the row's `id` (its
index in the file where the row has none, or shares another row's).

`--data hub` (or `hf:`) loads `microsoft/SCBench` with `datasets` when it is installed and the
hub is reachable; otherwise a one-line error says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvlife.bench.tasks import TASKS, Sample, Task, Turn, get_task
from kvlife.bench.tasks.code import split_functions
from kvlife.errors import TaskError

HUB_DATASET = "microsoft/SCBench"

# SCBench config name -> kvlife task; each task file names its own config (Task.scbench_config)
FILE_TASKS = {cls.scbench_config: name for name, cls in TASKS.items() if cls.scbench_config}
TASK_FILES = {task: name for name, task in FILE_TASKS.items()}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TaskError(f"cannot read {path}: {exc.strerror or exc}") from None
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TaskError(f"{path}:{number} is not UTF-8 text (byte {exc.start}); "
                            "is this SCBench's JSONL?") from None
        if text.strip():
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskError(f"{path} is parquet, which needs pyarrow: `pip install pyarrow` "
                        "(or convert the file to JSONL)") from None
    import pyarrow as pa

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TaskError(f"{path} is not a readable parquet file ({first})") from None


def data_files(data_dir: Path, task: str) -> list[Path]:
    """The files holding `task`'s rows under `data_dir`."""
    stem = TASK_FILES.get(task)
    if stem is None:
        raise TaskError(f"task {task} has no SCBench data file")
    found = []
    for suffix in (".jsonl", ".json", ".parquet"):
        found += sorted(data_dir.glob(f"{stem}{suffix}")) + sorted(data_dir.glob(f"{stem}/*{suffix}"))
        found += sorted(data_dir.glob(f"*/{stem}/*{suffix}"))  # hub layout: data/scbench_kv/test-*.parquet
    return found


def read_rows(data: str, task: str) -> list[dict[str, Any]]:
    """SCBench rows for `task` from a directory or the hub (`hub` / `hf:`)."""
    if data in ("hub", "hf") or data.startswith("hf:"):
        return _hub_rows(task)
    data_dir = Path(data).expanduser()
    if not data_dir.is_dir():
        raise TaskError(
            f"--data {data}: no such directory (give a directory of scbench_*.jsonl or .parquet files)"
        )
    files = data_files(data_dir, task)
    if not files:
        raise TaskError(
            f"no data for task {task} in {data_dir}: expected {TASK_FILES[task]}.jsonl or .parquet"
        )
    rows = []
    for path in files:
        rows += _read_parquet(path) if path.suffix == ".parquet" else _read_jsonl(path)
    if not rows:
        raise TaskError(f"no rows for task {task} in {', '.join(map(str, files))}: the file is empty")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "context" not in row or not isinstance(row.get("multi_turns"), list):
            raise TaskError(f"{files[0].parent}: row {index} of {task} lacks `context` or `multi_turns`; "
                            "is this SCBench's format?")
        if not row["multi_turns"] or not all(isinstance(turn, dict) for turn in row["multi_turns"]):
            raise TaskError(
                f"{files[0].parent}: row {index} of {task}: `multi_turns` must be a non-empty list of "
                '{"input": ..., "answer": ...} objects; is this SCBench\'s format?'
            )
    return rows


def _hub_rows(task: str) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise TaskError("loading SCBench from the hub needs `datasets` (pip install datasets); "
                        "or give --data a directory of downloaded files") from None
    try:
        return [dict(row) for row in load_dataset(HUB_DATASET, TASK_FILES[task], split="test")]
    except Exception as exc:  # network, auth, missing config: all mean the same to the user
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TaskError(f"cannot load {HUB_DATASET}/{TASK_FILES[task]} from the hub ({first}); "
                        "download the files and give --data DIR") from None


def _answer(value: Any, join: bool = False) -> tuple[str, list[str]]:
    """(reference, every answer given): a list is alternatives, or, with `join`, items all wanted."""
    if isinstance(value, list):
        values = [str(v) for v in value]
        if not values:
            return "", []
        return (", ".join(values) if join else values[0]), values
    return str(value), [str(value)]


def _turn(task_name: str, turn: dict[str, Any]) -> Turn:
    kind = get_task(FILE_TASKS.get(str(turn.get("task")), task_name))  # mixed tasks name each turn's own kind
    answer, _ = _answer(turn.get("answer", ""), join=kind.scbench_joins_answers)
    options = [str(option) for option in turn.get("options") or []]
    return kind.released_turn(str(turn.get("input", "")), answer, options)


def to_sample(task: Task, row: dict[str, Any], index: int) -> Sample:
    turns = [_turn(task.name, turn) for turn in row["multi_turns"]]
    meta = {key: value for key, value in row.items() if key not in ("context", "multi_turns")}
    meta["answers"] = [_answer(turn.get("answer", ""))[1] for turn in row["multi_turns"]]
    if hasattr(task, "remember_repository"):  # repoqa: score against every function of the repo
        task.remember_repository([t.answer for t in turns], split_functions(str(row["context"])))
    row_id = row.get("id")
    sample_id = f"{task.name}-{index if row_id is None else row_id}"
    return Sample(sample_id, task.name, str(row["context"]), turns, task.scbench_max_new_tokens, meta)


def load_samples(task: Task, data: str, n: int | None = None) -> list[Sample]:
    """The first `n` (all if None) SCBench rows of `task` as Samples."""
    rows = read_rows(data, task.name)
    rows = rows if n is None else rows[:n]
    samples = [to_sample(task, row, index) for index, row in enumerate(rows)]
    ids = [sample.id for sample in samples]
    for index, sample in enumerate(samples):
        if ids.count(sample.id) > 1:  # rows that share an id must not share their results rows
            sample.id = f"{task.name}-{index}"
    return samples


def truncate_middle(sample: Sample, tokenizer: Any, max_length: int) -> Sample:
    """Cut the context to `max_length` tokens by dropping its middle (SCBench's `truncate_input`)."""
    ids = tokenizer.encode(sample.context, add_special_tokens=False)
    if len(ids) <= max_length:
        return sample
    half = max_length // 2
    kept = tokenizer.decode(ids[:half]) + tokenizer.decode(ids[len(ids) - (max_length - half):])
    meta = {**sample.meta, "truncated_from_tokens": len(ids)}
    return Sample(sample.id, sample.task, kept, sample.turns, sample.max_new_tokens, meta)
