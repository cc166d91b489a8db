"""Summaries of a run: accuracy per task and turn, fidelity, cost; and the terminal tables.

Fidelity: because task accuracy says little when the model is weak, every row carries the
teacher-forced NLL of the reference answer, and when a dense run of the same samples exists
beside this one (same model, mode, profile, seed, format), the summary reports how often this
run's answer equals dense's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from kvlife.bench.runner import read_rows

MATCH_FIELDS = ("model", "mode", "profile", "seed", "prompt_format", "own_answers")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(mean(values), 4) if values else None


def find_dense_run(out: Path) -> Path | None:
    """A dense run beside `out` that ran the same samples in the same conditions."""
    try:
        identity = json.loads((out / "config.json").read_text())["identity"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    if identity.get("method") == "dense" or not out.parent.is_dir():
        return None
    for candidate in sorted(out.parent.iterdir()):
        try:
            other = json.loads((candidate / "config.json").read_text())["identity"]
        except (OSError, KeyError, json.JSONDecodeError, NotADirectoryError):
            continue
        if other.get("method") == "dense" and all(other.get(k) == identity.get(k) for k in MATCH_FIELDS):
            return candidate
    return None


def summarize(rows: list[dict[str, Any]], dense_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    dense = {(r["task"], r["sample_id"], r["turn"]): r["prediction"] for r in dense_rows or []}
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    tasks = {}
    for task, task_rows in sorted(by_task.items()):
        turns = sorted({r["turn"] for r in task_rows})
        per_turn = {str(t): _mean([r["score"] for r in task_rows if r["turn"] == t]) for t in turns}
        matches = [1.0 if dense[key] == r["prediction"] else 0.0
                   for r in task_rows if (key := (r["task"], r["sample_id"], r["turn"])) in dense]
        tasks[task] = {
            "turn1": per_turn.get("1"),
            "all_turns": _mean([r["score"] for r in task_rows]),
            "per_turn": per_turn,
            "samples": len({r["sample_id"] for r in task_rows}),
            "context_tokens": _mean([r["context_tokens"] for r in task_rows if r["turn"] == 1]),
            "reference_nll": _mean([r.get("reference_nll") for r in task_rows]),
            "dense_agreement": _mean(matches) if matches else None,
            "cache_bytes": _mean([r["cache_bytes"] for r in task_rows]),
            "turn1_cache_bytes": _mean([r["cache_bytes"] for r in task_rows if r["turn"] == 1]),
            "prefill_s": _mean([r["prefill_s"] for r in task_rows if r["turn"] == 1]),
            "ttft_s": _mean([r["ttft_s"] for r in task_rows]),
            "decode_tok_s": _mean([r.get("decode_tok_s") for r in task_rows]),
        }
        if any("latency_s" in r for r in task_rows):  # a server's run (kvlife.backends.openai)
            tasks[task].update(_served(task_rows, turns))
    overall = {
        "turn1": _mean([t["turn1"] for t in tasks.values()]),
        "all_turns": _mean([t["all_turns"] for t in tasks.values()]),
        "reference_nll": _mean([t["reference_nll"] for t in tasks.values()]),
        "dense_agreement": _mean([t["dense_agreement"] for t in tasks.values()]),
        "cache_bytes": _mean([t["cache_bytes"] for t in tasks.values()]),
    }
    served = [r for r in rows if r.get("started_at") is not None and r.get("finished_at") is not None]
    if served:
        span = max(r["finished_at"] for r in served) - min(r["started_at"] for r in served)
        overall["wall_s"] = round(span, 3)
        overall["requests_per_s"] = round(len(served) / span, 4) if span > 0 else None
        overall["output_tok_s"] = round(sum(r.get("new_tokens") or 0 for r in served) / span, 3) if span > 0 else None
    return {"tasks": tasks, "overall": overall, "rows": len(rows)}


def _served(task_rows: list[dict[str, Any]], turns: list[int]) -> dict[str, Any]:
    """A server's latency and cache reuse, overall and per turn (turns after the first of a
    multi-request run should be served from the engine's prefix cache)."""
    def by_turn(key: str) -> dict[str, float | None]:
        return {str(t): _mean([r.get(key) for r in task_rows if r["turn"] == t]) for t in turns}

    return {"latency_s": _mean([r.get("latency_s") for r in task_rows]),
            "cached_tokens": _mean([r.get("cached_tokens") for r in task_rows]),
            "ttft_s_per_turn": by_turn("ttft_s"), "cached_tokens_per_turn": by_turn("cached_tokens"),
            "prompt_tokens_per_turn": by_turn("prompt_tokens")}


def write_summary(out: Path) -> dict[str, Any]:
    rows = read_rows(out / "predictions.jsonl")
    dense_dir = find_dense_run(out)
    dense_rows = read_rows(dense_dir / "predictions.jsonl") if dense_dir else None
    summary = summarize(rows, dense_rows)
    summary["dense_run"] = dense_dir.name if dense_dir else None
    try:
        config = json.loads((out / "config.json").read_text())
        summary["config"] = config.get("identity", {})
    except (OSError, json.JSONDecodeError):
        summary["config"] = {}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    return summary


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_tables(summary: dict[str, Any], console=None, title: str | None = None) -> None:
    """Scores per task and per turn, with fidelity and cost, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    tasks = summary["tasks"]
    max_turn = max((int(t) for task in tasks.values() for t in task["per_turn"]), default=0)
    config = summary.get("config", {})
    table = Table(title=title or f"{config.get('method', '?')} · {config.get('mode', '?')} · {config.get('model', '?')}")
    table.add_column("task")
    for turn in range(1, max_turn + 1):
        table.add_column(f"turn {turn}", justify="right")
    for name in ("all", "NLL", "=dense", "KV MB", "prefill s", "tok/s"):
        table.add_column(name, justify="right")
    for task, stats in tasks.items():
        cells = [_fmt(stats["per_turn"].get(str(t))) for t in range(1, max_turn + 1)]
        mb = stats["cache_bytes"] / 1e6 if stats["cache_bytes"] is not None else None
        table.add_row(task, *cells, _fmt(stats["all_turns"]), _fmt(stats["reference_nll"]),
                      _fmt(stats["dense_agreement"]), _fmt(mb, 1), _fmt(stats["prefill_s"], 1),
                      _fmt(stats["decode_tok_s"], 1))
    overall = summary["overall"]
    mb = overall["cache_bytes"] / 1e6 if overall["cache_bytes"] is not None else None
    table.add_row("[bold]average", *[""] * max_turn, _fmt(overall["all_turns"]), _fmt(overall["reference_nll"]),
                  _fmt(overall["dense_agreement"]), _fmt(mb, 1), "", "")
    console.print(table)
