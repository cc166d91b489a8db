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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlife.bench.tasks import Sample, get_task
from kvlife.errors import ResultsError
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
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The fields that decide what is computed: a run resumes only into the same identity."""
        return {"model": self.model, "tasks": self.tasks, "mode": self.mode, "method": self.method,
                "samples": self.samples, "profile": self.profile, "seed": self.seed,
                "own_answers": self.own_answers, "recompress": self.recompress, "max_turns": self.max_turns,
                "prompt_format": self.prompt_format,
                # only when set, so that runs made before these options keep their identity
                **({"data": self.data} if self.data else {}),
                **({"max_length": self.max_length} if self.max_length else {})}

    def run_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.method)[:40]
        return f"{Path(self.model).name}-{slug}-{self.mode}-{self.profile}-{digest}"


def versions() -> dict[str, str]:
    import torch
    import transformers

    import kvlife

    return {"kvlife": kvlife.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()} {os.cpu_count()} cpus"}


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
            raise ResultsError(f"{out} holds a different run (its config.json differs); use another --out directory")
        return
    payload = {"identity": config.identity(), "run_id": out.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "versions": versions(), **config.extra}
    tmp = config_path.with_name("config.json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(config_path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a predictions.jsonl; a torn last line (a killed writer) is ignored."""
    rows = []
    if not path.exists():
        return rows
    with path.open() as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    # Terminate a torn line a killed writer may have left, then append whole lines and fsync.
    with path.open("ab+") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write("".join(json.dumps(row) + "\n" for row in rows).encode())
        handle.flush()
        os.fsync(handle.fileno())


def sample_done(rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(row["task"], row["sample_id"]) for row in rows}


def run_sample(session, task, sample: Sample, max_turns: int | None) -> list[dict[str, Any]]:
    turns = sample.turns[:max_turns] if max_turns else sample.turns
    prefilled = session.prefill(sample.context)
    rows = []
    for index, turn in enumerate(turns):
        result = session.ask(turn.query, max_new_tokens=sample.max_new_tokens, reference=turn.answer)
        prefill_s = result.prefill_s + (prefilled.prefill_s if prefilled is not None and index == 0 else 0.0)
        rows.append({
            "task": task.name, "sample_id": sample.id, "turn": index + 1, "mode": session.mode,
            "query": turn.query, "prediction": result.prediction, "reference": turn.answer,
            "score": task.score(result.prediction, turn.answer),
            "prompt_tokens": result.prompt_tokens,
            "context_tokens": len(session.context_ids),
            "prefill_s": round(prefill_s, 4),
            "ttft_s": round(result.ttft_s + (prefilled.prefill_s if prefilled is not None and index == 0 else 0.0), 4),
            "decode_tok_s": round(result.decode_tok_s, 3) if result.decode_tok_s else None,
            "new_tokens": result.new_tokens,
            "cache_bytes": result.cache_bytes,
            "cache_tokens": round(result.cache_tokens, 1),
            "reference_nll": round(result.reference_nll, 5) if result.reference_nll is not None else None,
        })
        if index == 0 and getattr(session, "store", None) is not None:
            rows[-1]["store"] = dict(session.store.last)  # --store: tokens reused from the store, times
    return rows


def run(config: BenchConfig, out: Path | None = None, model=None, tokenizer=None, progress: bool = True,
        console=None, store=None) -> Path:
    """Run (or resume) a benchmark; returns the run directory. `store`: a kvlife.store KVStore (or
    tier URLs) that prefills reuse, across runs and methods sharing the same dense prefill."""
    from kvlife import models
    from kvlife.session import Session

    recipe = parse(config.method)  # fail on a bad spec, task or model before writing anything
    config.method = recipe.spec
    tasks = [get_task(name) for name in config.tasks]
    if model is None:
        models.resolve(config.model)
    if config.data:
        from kvlife.bench.data import load_samples

        all_samples = [(task, sample) for task in tasks for sample in load_samples(task, config.data, config.samples)]
    else:
        all_samples = [(task, sample) for task in tasks
                       for sample in task.samples(config.profile, config.samples, config.seed)]
    out = Path(out) if out else RESULTS_ROOT / config.run_id()
    prepare_out(out, config)
    predictions = out / "predictions.jsonl"
    done = sample_done(read_rows(predictions))
    todo = [(task, sample) for task, sample in all_samples if (task.name, sample.id) not in done]
    if todo and model is None:
        model, tokenizer = models.load(config.model)
    if todo and config.max_length:
        from kvlife.bench.data import truncate_middle

        todo = [(task, truncate_middle(sample, tokenizer, config.max_length)) for task, sample in todo]
    if todo:
        session = Session(model, tokenizer, recipe, mode=config.mode, own_answers=config.own_answers,
                          recompress=config.recompress, prompt_format=config.prompt_format, store=store)
        _loop(session, todo, predictions, config, progress, console, len(all_samples) - len(todo), len(all_samples))
    from kvlife.bench.summary import write_summary

    write_summary(out)
    return out


def _loop(session, todo, predictions, config, progress, console, already, total) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        handle = bar.add_task(f"{config.method} {config.mode}", total=total, completed=already)
        for task, sample in todo:
            bar.update(handle, description=f"{config.method} {config.mode} {task.name}")
            rows = run_sample(session, task, sample, config.max_turns)
            append_rows(predictions, rows)
            bar.advance(handle)
