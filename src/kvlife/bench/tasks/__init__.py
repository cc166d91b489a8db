"""One file per task; importing this package registers them all in `TASKS`."""

from kvlife.bench.tasks import kv, math_find, multihop, prefix_suffix  # noqa: F401
from kvlife.bench.tasks.base import TASKS, Sample, Task, Turn

__all__ = ["TASKS", "Sample", "Task", "Turn", "get_task"]


def get_task(name: str) -> Task:
    from kvlife.errors import TaskError

    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]()
