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

from rich.console import Console
from rich.table import Table

from kvlife.bench.rows import read_rows
from kvlife.bench.stats import bootstrap_mean, paired_difference

# identity fields a dense run must share with a method's run to be its reference (absent = default)
MATCH_FIELDS = ("model", "mode", "profile", "seed", "prompt_format", "own_answers", "dtype", "context_tokens",
                "data", "max_length")


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


def by_sample(rows: list[dict[str, Any]], turn: int | None = None) -> dict[tuple[str, str], float]:
    """Score per (task, sample): of one turn, or the mean over the sample's turns."""
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        if turn is None or row["turn"] == turn:
            scores[(row["task"], row["sample_id"])].append(row["score"])
    return {key: mean(values) for key, values in scores.items()}


def _interval(values: list[float]) -> list[float] | None:
    found = bootstrap_mean(values)
    return [round(found.low, 4), round(found.high, 4)] if found else None


def _vs_dense(
    rows: list[dict[str, Any]], dense_rows: list[dict[str, Any]], turns: list[int]
) -> dict[str, Any]:
    """Paired differences against dense on the same samples: per turn, turn 1 and all turns."""
    def diff(turn: int | None):
        found = paired_difference(by_sample(rows, turn), by_sample(dense_rows, turn))
        return found.to_dict() if found else None

    return {"per_turn": {str(t): diff(t) for t in turns}, "turn1": diff(1), "all_turns": diff(None)}


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
            # 95% bootstrap intervals over samples
            "turn1_ci": _interval(list(by_sample(task_rows, 1).values())),
            "all_turns_ci": _interval(list(by_sample(task_rows).values())),
        }
        if dense_rows:
            tasks[task]["vs_dense"] = _vs_dense(
                task_rows, [r for r in dense_rows if r["task"] == task], turns
            )
        if any("latency_s" in r for r in task_rows):  # a server's run (kvlife.backends.openai)
            tasks[task].update(_served(task_rows, turns))
    overall = {
        "turn1": _mean([t["turn1"] for t in tasks.values()]),
        "all_turns": _mean([t["all_turns"] for t in tasks.values()]),
        "reference_nll": _mean([t["reference_nll"] for t in tasks.values()]),
        "dense_agreement": _mean([t["dense_agreement"] for t in tasks.values()]),
        "cache_bytes": _mean([t["cache_bytes"] for t in tasks.values()]),
    }
    if dense_rows:  # every task's samples pooled: does the method differ from dense on the whole suite?
        overall["vs_dense"] = {key: (found.to_dict() if found else None) for key, found in (
            ("turn1", paired_difference(by_sample(rows, 1), by_sample(dense_rows, 1))),
            ("all_turns", paired_difference(by_sample(rows), by_sample(dense_rows))))}
    served = [r for r in rows if r.get("started_at") is not None and r.get("finished_at") is not None]
    if served:
        span = max(r["finished_at"] for r in served) - min(r["started_at"] for r in served)
        overall["wall_s"] = round(span, 3)
        overall["requests_per_s"] = round(len(served) / span, 4) if span > 0 else None
        overall["output_tok_s"] = (
            round(sum(r.get("new_tokens") or 0 for r in served) / span, 3) if span > 0 else None
        )
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


# columns a narrow terminal drops first (last in this list goes first); task names and scores stay
_OPTIONAL = (("all", 5), ("NLL", 5), ("KV MB", 6), ("=dense", 6), ("prefill s", 7), ("tok/s", 5))
_VERDICT_STYLE = {"worse": "bold red", "better": "bold green", "same": ""}


def _columns_that_fit(width: int, fixed: int) -> list[str]:
    names, used = [], fixed
    for name, size in _OPTIONAL:
        if used + size + 3 > width:
            break
        names.append(name)
        used += size + 3
    return names


def print_tables(summary: dict[str, Any], console=None, title: str | None = None) -> None:
    """Scores per task and per turn, with fidelity and cost; then, when a dense run of the same samples
    exists, the paired difference against it with its 95% interval. Task names are never cut: a
    narrow terminal drops the optional columns first and wraps the intervals."""
    console = console or Console()
    tasks = summary["tasks"]
    max_turn = max((int(t) for task in tasks.values() for t in task["per_turn"]), default=0)
    config = summary.get("config", {})
    name_width = max([len(name) for name in tasks] + [len("average")])
    table = Table(
        title=title or f"{config.get('method', '?')} · {config.get('mode', '?')} · {config.get('model', '?')}"
    )
    table.add_column("task", no_wrap=True, min_width=name_width)
    for turn in range(1, max_turn + 1):
        table.add_column(f"turn {turn}", justify="right", min_width=6)
    optional = _columns_that_fit(console.width, name_width + 4 + max_turn * 9)
    for name in optional:
        table.add_column(name, justify="right")

    def cells(stats: dict[str, Any]) -> list[str]:
        mb = stats["cache_bytes"] / 1e6 if stats.get("cache_bytes") is not None else None
        values = {"all": _fmt(stats.get("all_turns")), "NLL": _fmt(stats.get("reference_nll")),
                  "KV MB": _fmt(mb, 1), "=dense": _fmt(stats.get("dense_agreement")),
                  "prefill s": _fmt(stats.get("prefill_s"), 1), "tok/s": _fmt(stats.get("decode_tok_s"), 1)}
        return [values[name] for name in optional]

    for task, stats in tasks.items():
        verdicts = (stats.get("vs_dense") or {}).get("per_turn", {})
        turn_cells = []
        for turn in range(1, max_turn + 1):
            style = _VERDICT_STYLE[(verdicts.get(str(turn)) or {}).get("verdict", "same")]
            text = _fmt(stats["per_turn"].get(str(turn)))
            turn_cells.append(f"[{style}]{text}[/]" if style else text)
        table.add_row(task, *turn_cells, *cells(stats))
    overall = summary["overall"]
    table.add_row(
        "[bold]average", *[""] * max_turn, *cells({**overall, "prefill_s": None, "decode_tok_s": None})
    )
    console.print(table)
    if any(stats.get("vs_dense") for stats in tasks.values()):
        print_dense_differences(summary, console, max_turn, name_width)


def _signed(value: float) -> str:
    """+.25, -1.00: two decimals without the leading zero, so that an interval fits a narrow column."""
    return f"{value:+.2f}".replace("0.", ".", 1) if abs(value) < 1 else f"{value:+.2f}"


def _diff_cell(found: dict[str, Any] | None) -> str:
    if not found:
        return "-"
    # spaces where a narrow column may wrap: the difference, then the interval's two ends
    text = f"{_signed(found['diff'])} [{_signed(found['ci_low'])}, {_signed(found['ci_high'])}]"
    style = _VERDICT_STYLE[found["verdict"]]
    return f"[{style}]{text}[/]" if style else text


def print_dense_differences(summary: dict[str, Any], console, max_turn: int, name_width: int) -> None:
    """Per task and turn: method minus dense on the same samples, 95% paired bootstrap interval."""
    table = Table(title=f"minus dense ({summary.get('dense_run')}), 95% interval over samples: "
                        "red = worse, green = better, plain = no difference")
    table.add_column("task", no_wrap=True, min_width=name_width)
    for turn in range(1, max_turn + 1):
        table.add_column(f"turn {turn}", justify="right", overflow="fold", min_width=7)
    table.add_column("all", justify="right", overflow="fold", min_width=7)
    for task, stats in summary["tasks"].items():
        found = stats.get("vs_dense") or {}
        per_turn = found.get("per_turn", {})
        table.add_row(task, *[_diff_cell(per_turn.get(str(t))) for t in range(1, max_turn + 1)],
                      _diff_cell(found.get("all_turns")))
    overall = summary["overall"].get("vs_dense") or {}
    turn_cells = [_diff_cell(overall.get("turn1"))] + [""] * (max_turn - 1) if max_turn else []
    table.add_row("[bold]all tasks", *turn_cells, _diff_cell(overall.get("all_turns")))
    console.print(table)
