"""SCBench's released data: read its rows from local JSONL or parquet files (or the hub) as Samples.

A row is `{"id", "context", "multi_turns": [{"input", "answer", "options"?, "name"?, "task"?}],
...}` with per-task fields (`lang`, `repo` for repoqa). Files are named after SCBench's configs
(`scbench_kv.jsonl`, `scbench_vt.parquet`, or a directory `scbench_kv/` of such files, as the hub
lays them out), and map to kvlife tasks by `FILE_TASKS`. Each turn's query is the row's `input`
with an instruction in the task's own style (choice_eng lists the options); list answers keep
their first element as the reference (the others go to `meta`). Scoring is the task's own.

`--data hub` (or `hf:`) loads `microsoft/SCBench` with `datasets` when it is installed and the
hub is reachable; otherwise a one-line error says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvlife.bench.tasks import Sample, Task, Turn
from kvlife.errors import TaskError

HUB_DATASET = "microsoft/SCBench"

# SCBench config name -> kvlife task
FILE_TASKS = {
    "scbench_kv": "kv", "scbench_prefix_suffix": "prefix_suffix", "scbench_vt": "multihop",
    "scbench_repoqa": "repoqa", "scbench_qa_eng": "qa_eng", "scbench_qa_chn": "qa_chn",
    "scbench_choice_eng": "choice_eng", "scbench_many_shot": "many_shot", "scbench_mf": "math_find",
    "scbench_summary": "summary", "scbench_summary_with_needles": "summary_with_needles",
    "scbench_repoqa_and_kv": "repoqa_and_kv",
}
TASK_FILES = {task: name for name, task in FILE_TASKS.items()}

# Per-task instruction appended to the row's `input` (SCBench's templates carry the same intent).
_INSTRUCTIONS = {
    "kv": " Answer with the value only.",
    "prefix_suffix": " Answer with the full string only.",
    "multihop": " Answer with the variable names only, separated by commas.",
    "math_find": " Answer with the number only.",
    "qa_eng": " Answer with a few words only.",
    "qa_chn": "请只回答答案。",
    "many_shot": " Answer with the label only.",
    "summary": "",
    "repoqa": "",
}
# Generous new-token budgets, after SCBench's own per task.
MAX_NEW_TOKENS = {"kv": 64, "prefix_suffix": 64, "multihop": 48, "math_find": 16, "qa_eng": 40, "qa_chn": 40,
                  "choice_eng": 16, "many_shot": 16, "summary": 200, "summary_with_needles": 200,
                  "repoqa": 512, "repoqa_and_kv": 512}


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
        raise TaskError(f"--data {data}: no such directory (give a directory of scbench_*.jsonl or .parquet files)")
    files = data_files(data_dir, task)
    if not files:
        raise TaskError(f"no data for task {task} in {data_dir}: expected {TASK_FILES[task]}.jsonl or .parquet")
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
            raise TaskError(f"{files[0].parent}: row {index} of {task}: `multi_turns` must be a non-empty list of "
                            '{"input": ..., "answer": ...} objects; is this SCBench\'s format?')
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
    kind = FILE_TASKS.get(str(turn.get("task")), task_name)  # mixed tasks name each turn's own kind
    query = str(turn.get("input", ""))
    answer, _ = _answer(turn.get("answer", ""), join=kind == "multihop")
    options = turn.get("options")
    if options:
        from kvlife.bench.tasks.choice_eng import LETTERS, choice_query

        options = [str(o) for o in options][:4]
        query = choice_query(query, options)
        if answer in options:
            answer = f"{LETTERS[options.index(answer)]}) {answer}"
        elif answer.strip()[:1] in LETTERS:
            letter = answer.strip()[0]
            answer = f"{letter}) {options[LETTERS.index(letter)]}"
    elif kind == "repoqa":
        from kvlife.bench.tasks.repoqa import QUERY

        query = QUERY.format(description=query)
    else:
        query += _INSTRUCTIONS.get(kind, "")
    return Turn(query, answer)


def to_sample(task: Task, row: dict[str, Any], index: int) -> Sample:
    turns = [_turn(task.name, turn) for turn in row["multi_turns"]]
    meta = {key: value for key, value in row.items() if key not in ("context", "multi_turns")}
    meta["answers"] = [_answer(turn.get("answer", ""))[1] for turn in row["multi_turns"]]
    if hasattr(task, "remember_repository"):  # repoqa: score against every function of the repo
        from kvlife.bench.tasks.code import split_functions

        task.remember_repository([t.answer for t in turns], split_functions(str(row["context"])))
    sample_id = f"{task.name}-{row.get('id', index)}"
    return Sample(sample_id, task.name, str(row["context"]), turns, MAX_NEW_TOKENS.get(task.name, 64), meta)


def load_samples(task: Task, data: str, n: int | None = None) -> list[Sample]:
    """The first `n` (all if None) SCBench rows of `task` as Samples."""
    rows = read_rows(data, task.name)
    rows = rows if n is None else rows[:n]
    return [to_sample(task, row, index) for index, row in enumerate(rows)]


def truncate_middle(sample: Sample, tokenizer: Any, max_length: int) -> Sample:
    """Cut the context to `max_length` tokens by dropping its middle (SCBench's `truncate_input`)."""
    ids = tokenizer.encode(sample.context, add_special_tokens=False)
    if len(ids) <= max_length:
        return sample
    half = max_length // 2
    kept = tokenizer.decode(ids[:half]) + tokenizer.decode(ids[len(ids) - (max_length - half):])
    meta = {**sample.meta, "truncated_from_tokens": len(ids)}
    return Sample(sample.id, sample.task, kept, sample.turns, sample.max_new_tokens, meta)
