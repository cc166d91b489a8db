"""One file per task; importing this package registers them all in `TASKS`."""

from kvlife.bench.tasks import (  # noqa: F401
    choice_eng,
    kv,
    many_shot,
    math_find,
    multihop,
    prefix_suffix,
    qa_chn,
    qa_eng,
    rag,
    repoqa,
    repoqa_and_kv,
    summary,
    summary_with_needles,
)
from kvlife.bench.tasks.base import TASKS, Sample, Task, Turn

__all__ = ["TASKS", "Sample", "Task", "Turn", "get_task"]


def get_task(name: str) -> Task:
    from kvlife.errors import TaskError

    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]()
