"""The interface between the benchmark runner and whatever computes the turns.

A `Backend` checks its settings before anything is written, describes itself for config.json,
and opens `TurnSession`s; the runner opens one session per worker (`concurrency` workers run
samples side by side) and drives it with `prefill(context)` then `ask(query)` per turn, exactly
as it drives kvlife's own `Session`, which is one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvlife.bench.runner import BenchConfig
    from kvlife.bench.tasks import Sample, Task
    from kvlife.session import TurnResult

BACKENDS = ("local", "openai")


class TurnSession(Protocol):
    """What the runner drives: one shared context at a time, answered turn by turn."""

    mode: str

    @property
    def context_tokens(self) -> int | None: ...

    def prefill(self, context: str) -> TurnResult | None: ...

    def ask(self, query: str, max_new_tokens: int = 64, reference: str | None = None) -> TurnResult: ...


class Backend(Protocol):
    name: str
    concurrency: int  # samples run side by side (each worker has its own session)

    def check(self, config: BenchConfig, connect: bool = True) -> None:
        """Refuse unusable settings before anything is written; `connect`: there is work to do, so
        also reach what will compute it (a server: is it up, does it serve the model?)."""

    def describe(self) -> dict[str, Any]:
        """What config.json records about the backend (beside the run's identity)."""

    def prepare(self, todo: list[tuple[Task, Sample]], config: BenchConfig) -> list[tuple[Task, Sample]]:
        """Called once when there is work: load what is needed; may rewrite the samples."""

    def open_session(self, config: BenchConfig) -> TurnSession: ...

    def close(self) -> None: ...


class LocalBackend:
    """kvlife's own Session on a transformers model in this process (one worker)."""

    name = "local"
    concurrency = 1

    def __init__(self, model: Any = None, tokenizer: Any = None, store: Any = None) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store

    def check(self, config: BenchConfig, connect: bool = True) -> None:
        from kvlife import models

        if self.model is None:
            models.resolve(config.model)

    def describe(self) -> dict[str, Any]:
        return {}  # a local run's config.json stays as it was before backends existed

    def prepare(self, todo: list[tuple[Task, Sample]], config: BenchConfig) -> list[tuple[Task, Sample]]:
        from kvlife import models

        if self.model is None:
            self.model, self.tokenizer = models.load(config.model, dtype=config.dtype)
        if config.max_length:
            from kvlife.bench.data import truncate_middle

            todo = [(task, truncate_middle(sample, self.tokenizer, config.max_length)) for task, sample in todo]
        return todo

    def open_session(self, config: BenchConfig) -> TurnSession:
        from kvlife.session import Session

        return Session(self.model, self.tokenizer, config.method, mode=config.mode, own_answers=config.own_answers,
                       recompress=config.recompress, prompt_format=config.prompt_format, store=self.store)

    def close(self) -> None:
        pass
