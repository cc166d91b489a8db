"""The benchmark runner: samples x turns through a Session, resumable, with a progress bar.

A run writes `<out>/config.json`, `<out>/predictions.jsonl` (one row per sample and turn) and
`<out>/summary.json`. Rows are appended a whole sample at a time and flushed to disk, so a killed
run loses at most the sample in flight, and a restarted run recomputes nothing already written.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import kvlife
from kvlife.backends.base import BACKENDS, LocalBackend, TurnBackend, TurnSession
from kvlife.backends.openai import OpenAIBackend
from kvlife.bench.data import load_samples, truncate_middle
from kvlife.bench.rows import append_rows, read_rows, sample_done
from kvlife.bench.summary import write_summary
from kvlife.bench.tasks import Sample, Task, get_task
from kvlife.errors import KvlifeError, ResultsError
from kvlife.models import dtype_name, resolve_dtype
from kvlife.recipe import parse

RESULTS_ROOT = Path("results")


@dataclass
class BenchConfig:
    model: str
    tasks: list[str]
    mode: str = "multi-turn"
    method: str = "dense"
    samples: int | None = None
    profile: str = "default"
    seed: int = 0
    own_answers: bool = False
    recompress: bool = False
    max_turns: int | None = None
    prompt_format: str = "chat"
    data: str | None = None  # a directory of SCBench's released files (or "hub") instead of generated samples
    max_length: int | None = None  # cut longer contexts to this many tokens, from the middle
    backend: str = "local"  # "local" (kvlife's Session) or "openai" (a server at base_url)
    base_url: str | None = None  # the OpenAI-compatible server's URL, for backend "openai"
    dtype: str = "auto"  # the local model's dtype: auto | float32 | bfloat16 (resolved before the run starts)
    context_tokens: int | None = None  # set every task's context length (tokens) instead of its profile's
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The fields that decide what is computed: a run resumes only into the same identity."""
        return {"model": self.model, "tasks": self.tasks, "mode": self.mode, "method": self.method,
                "samples": self.samples, "profile": self.profile, "seed": self.seed,
                "own_answers": self.own_answers, "recompress": self.recompress, "max_turns": self.max_turns,
                "prompt_format": self.prompt_format,
                # only when set, so that runs made before these options keep their identity
                **({"data": self.data} if self.data else {}),
                **({"max_length": self.max_length} if self.max_length else {}),
                # float32 runs keep the identity they had before the option existed
                **({"dtype": self.dtype} if self.dtype != "float32" and self.backend == "local" else {}),
                **({"context_tokens": self.context_tokens} if self.context_tokens else {}),
                **({"backend": self.backend, "base_url": self.base_url} if self.backend != "local" else {})}

    def run_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.method)[:40]
        prefix = f"{self.backend}-" if self.backend != "local" else ""
        return f"{prefix}{Path(self.model).name}-{slug}-{self.mode}-{self.profile}-{digest}"


def versions() -> dict[str, str]:
    return {
        "kvlife": kvlife.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }


def method_params(recipe) -> dict[str, dict[str, Any]]:
    """Each method of the recipe by name, with every parameter (defaults included), JSON-ready."""
    return {method.name: json.loads(json.dumps(method.params(), default=str)) for method in recipe.methods}


def prepare_out(out: Path, config: BenchConfig) -> None:
    """Create the run directory, or check that an existing one belongs to the same run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ResultsError(f"cannot write results to {out}: {exc.strerror or exc}") from None
    config_path = out / "config.json"
    if config_path.exists():
        try:
            existing = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise ResultsError(f"{config_path} is unreadable; use another --out directory") from None
        if existing.get("identity") != config.identity():
            raise ResultsError(
                f"{out} holds a different run (its config.json differs); use another --out directory"
            )
        params = config.extra.get("method_params")
        if "method_params" in existing and params is not None and existing["method_params"] != params:
            raise ResultsError(f"{out} was run with other parameters for {config.method} (a default "
                               "changed since); use another --out directory")
        return
    payload = {
        "identity": config.identity(),
        "run_id": out.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": versions(),
        **({"dtype": config.dtype} if config.backend == "local" else {}),
        **config.extra,
    }
    tmp = config_path.with_name("config.json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(config_path)


def run_sample(
    session: TurnSession, task: Task, sample: Sample, max_turns: int | None
) -> list[dict[str, Any]]:
    turns = sample.turns[:max_turns] if max_turns else sample.turns
    segments = sample.meta.get("segments")  # documents to assemble from (the rag task), for sessions that can
    if segments and getattr(session, "takes_segments", False):
        prefilled = session.prefill(sample.context, segments=segments)
    else:
        prefilled = session.prefill(sample.context)
    rows = []
    for index, turn in enumerate(turns):
        result = session.ask(turn.query, max_new_tokens=sample.max_new_tokens, reference=turn.answer)
        prefill_s = result.prefill_s + (prefilled.prefill_s if prefilled is not None and index == 0 else 0.0)
        rows.append(
            {
                "task": task.name,
                "sample_id": sample.id,
                "turn": index + 1,
                "mode": session.mode,
                "query": turn.query,
                "prediction": result.prediction,
                "reference": turn.answer,
                "score": task.score(result.prediction, turn.answer),
                "prompt_tokens": result.prompt_tokens,
                "context_tokens": session.context_tokens,
                "prefill_s": round(prefill_s, 4),
                "ttft_s": round(
                    result.ttft_s + (prefilled.prefill_s if prefilled is not None and index == 0 else 0.0), 4
                ),
                "decode_tok_s": round(result.decode_tok_s, 3) if result.decode_tok_s else None,
                "new_tokens": result.new_tokens,
                "cache_bytes": result.cache_bytes,
                "cache_tokens": round(result.cache_tokens, 1) if result.cache_tokens is not None else None,
                "reference_nll": round(result.reference_nll, 5) if result.reference_nll is not None else None,
                **({"dtype": session.dtype} if getattr(session, "dtype", None) else {}),
            }
        )
        rows[-1].update(result.stats.get("row", {}))  # a backend's own fields (a server's cached tokens, ...)
        if index == 0 and getattr(session, "store", None) is not None:
            rows[-1]["store"] = dict(session.store.last)  # --store: tokens reused from the store, times
        if index == 0 and prefilled is not None and "assembled_tokens" in prefilled.stats:
            # an assemble method: documents hit, tokens recomputed, times
            rows[-1]["assembly"] = dict(prefilled.stats)
    return rows


def make_backend(config: BenchConfig, model=None, tokenizer=None, store=None, **options) -> TurnBackend:
    """The backend a config names; `options` go to the openai backend (api_key, concurrency, timeout_s,
    retries)."""
    if config.backend == "local":
        return LocalBackend(model, tokenizer, store)
    if config.backend == "openai":
        if not config.base_url:
            raise KvlifeError("--backend openai needs --base-url URL (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIBackend(config.base_url, **options)
    raise KvlifeError(f"unknown backend {config.backend!r}; valid: {', '.join(BACKENDS)}")


def run(config: BenchConfig, out: Path | None = None, model=None, tokenizer=None, progress: bool = True,
        console=None, store=None, backend=None) -> Path:
    """Run (or resume) a benchmark; returns the run directory. `store`: a kvlife.store KVStore (or
    tier URLs) that prefills reuse, across runs and methods sharing the same dense prefill.
    `backend`: what computes the turns (kvlife.backends); default: the one `config.backend` names."""
    recipe = parse(config.method)  # fail on a bad spec, task or model before writing anything
    config.method = recipe.spec
    # every parameter with its default: the spec names only non-default ones, so a run made under
    # another default has the same identity; a resume checks these
    config.extra = {**config.extra, "method_params": method_params(recipe)}
    if config.backend == "local":  # the dtype the run computes in, recorded resolved ("auto" is not a dtype)
        config.dtype = dtype_name(
            next(model.parameters()).dtype if model is not None else resolve_dtype(config.dtype)
        )
    tasks = [get_task(name) for name in config.tasks]
    backend = backend or make_backend(config, model, tokenizer, store)
    if config.data:
        all_samples = [
            (task, sample) for task in tasks for sample in load_samples(task, config.data, config.samples)
        ]
    else:
        all_samples = [
            (task, sample)
            for task in tasks
            for sample in task.samples(config.profile, config.samples, config.seed, config.context_tokens)
        ]
    out = Path(out) if out else RESULTS_ROOT / config.run_id()
    predictions = out / "predictions.jsonl"
    done = sample_done(read_rows(predictions))
    todo = [(task, sample) for task, sample in all_samples if (task.name, sample.id) not in done]
    try:
        backend.check(config, connect=bool(todo))
        config.extra = {**backend.describe(), **config.extra}
        prepare_out(out, config)
        if todo:
            backend.prepare(config)
            if config.max_length:  # SCBench's truncate_input, with the model's own tokenizer
                todo = [
                    (task, truncate_middle(sample, backend.tokenizer, config.max_length))
                    for task, sample in todo
                ]
            _loop(backend, todo, predictions, config, progress, console, len(all_samples) - len(todo),
                  len(all_samples))
    finally:
        backend.close()
    write_summary(out)
    return out


def _loop(backend, todo, predictions, config, progress, console, already, total) -> None:
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        handle = bar.add_task(f"{config.method} {config.mode}", total=total, completed=already)
        if backend.concurrency <= 1:
            session = backend.open_session(config)
            for task, sample in todo:
                bar.update(handle, description=f"{config.method} {config.mode} {task.name}")
                rows = run_sample(session, task, sample, config.max_turns)
                append_rows(predictions, rows)
                bar.advance(handle)
            return
        _loop_concurrent(backend, todo, predictions, config, bar, handle)


def _loop_concurrent(backend, todo, predictions, config, bar, handle) -> None:
    """`backend.concurrency` samples in flight at once, one session per worker thread; rows are
    appended (by this thread only) as each sample completes, so a resume works as in the serial loop."""
    local = threading.local()

    def work(task, sample):
        if getattr(local, "session", None) is None:
            local.session = backend.open_session(config)
        return run_sample(local.session, task, sample, config.max_turns)

    bar.update(handle, description=f"{config.method} {config.mode} x{backend.concurrency}")
    pool = ThreadPoolExecutor(max_workers=backend.concurrency, thread_name_prefix="kvlife-bench")
    pending = {pool.submit(work, task, sample) for task, sample in todo}
    error: BaseException | None = None

    def keep(future) -> None:
        nonlocal error
        if future.cancelled():
            return
        if future.exception() is None:
            append_rows(predictions, future.result())
            bar.advance(handle)
        elif error is None:
            error = future.exception()

    try:
        while pending and error is None:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                keep(future)
    except BaseException as exc:  # Ctrl-C lands in this thread
        error = exc
    # On an error: start nothing new, let the samples in flight end (within the request timeout) and
    # keep their rows, then raise the first error.
    pool.shutdown(wait=True, cancel_futures=error is not None)
    for future in pending:
        keep(future)
    if error is not None:
        raise error
