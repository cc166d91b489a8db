"""The interface between the benchmark runner and whatever computes the turns.

A `TurnBackend` checks its settings before anything is written, describes itself for config.json,
and opens `TurnSession`s; the runner opens one session per worker (`concurrency` workers run
samples side by side) and drives it with `prefill(context)` then `ask(query)` per turn, exactly
as it drives kvlife's own `Session`, which is one. A backend reads a run's settings through
`RunSettings` (the runner's `BenchConfig` has them), so nothing here imports the benchmark.
"""

from __future__ import annotations

from typing import Any, Protocol

from kvlife import models
from kvlife.session import Session, TurnResult

BACKENDS = ("local", "openai")


class RunSettings(Protocol):
    """The settings of a run that a backend reads."""

    model: str
    dtype: str
    method: str
    mode: str
    own_answers: bool
    recompress: bool
    prompt_format: str
    max_length: int | None


class TurnSession(Protocol):
    """What the runner drives: one shared context at a time, answered turn by turn."""

    mode: str

    @property
    def context_tokens(self) -> int | None: ...

    def prefill(self, context: str) -> TurnResult | None: ...

    def ask(self, query: str, max_new_tokens: int = 64, reference: str | None = None) -> TurnResult: ...


class TurnBackend(Protocol):
    """What computes a run's turns: kvlife's Session here, or a server."""

    name: str
    concurrency: int  # samples run side by side (each worker has its own session)
    tokenizer: Any  # the model's tokenizer once prepared, where the backend has one (--max-length needs it)

    def check(self, config: RunSettings, connect: bool = True) -> None:
        """Refuse unusable settings before anything is written; `connect`: there is work to do, so
        also reach what will compute it (a server: is it up, does it serve the model?)."""

    def describe(self) -> dict[str, Any]:
        """What config.json records about the backend (beside the run's identity)."""

    def prepare(self, config: RunSettings) -> None:
        """Called once when there is work: load what is needed."""

    def open_session(self, config: RunSettings) -> TurnSession: ...

    def close(self) -> None: ...


class LocalBackend:
    """kvlife's own Session on a transformers model in this process (one worker)."""

    name = "local"
    concurrency = 1

    def __init__(self, model: Any = None, tokenizer: Any = None, store: Any = None) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store

    def check(self, config: RunSettings, connect: bool = True) -> None:
        if self.model is None:
            models.resolve(config.model)

    def describe(self) -> dict[str, Any]:
        return {}  # a local run's config.json stays as it was before backends existed

    def prepare(self, config: RunSettings) -> None:
        if self.model is None:
            self.model, self.tokenizer = models.load(config.model, dtype=config.dtype)

    def open_session(self, config: RunSettings) -> TurnSession:
        return Session(
            self.model,
            self.tokenizer,
            config.method,
            mode=config.mode,
            own_answers=config.own_answers,
            recompress=config.recompress,
            prompt_format=config.prompt_format,
            store=self.store,
        )

    def close(self) -> None:
        pass
