"""Task benchmark: dense accuracy of every task on the default model, with 95% intervals over samples.

    .venv/bin/python benchmarks/tasks.py [--tasks kv,repoqa] [--samples 16]
        [--modes multi-request,multi-turn] [--context-tokens 8192] [--max-turns 1] [--ceiling] [--no-write]

Default profile (no --context-tokens): a dense `kvlife bench` run per task and mode; tasks.json's
`tasks[name].default` gets, per mode, turn-1 and all-turn accuracy with bootstrap intervals,
reference NLL, context length and wall time per sample, and overall `turn1` / `samples` (the
lower of the modes: both must reach the calibration bar). With --context-tokens N the task's
default profile is resized to about N tokens (needles spread over the whole context) and the result
lands in `tasks[name].long[str(N)]`. With --ceiling, the tasks whose metric cannot reach 0.75 for a
correct free-form answer (ROUGE-Lsum summaries) get `ceiling`: the score of the model's own answer
when the context is only the part asked about (retrieval made trivial), so that dense is reported
relative to what the model can score at all. Runs go to results/tasks-bench/ (they resume, and a
disk store shares each context's prefill between the two modes); the scbench profiles' context
lengths are measured without a model run. Writes benchmarks/results/tasks.json (merging earlier
entries) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "tasks.json"
MODES = ("multi-request", "multi-turn")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def scbench_length(task, tokenizer) -> dict:
    try:
        sample = task.samples("scbench", 1)[0]
    except Exception as exc:  # a profile that cannot generate is a finding to record, not a crash
        return {"error": f"{type(exc).__name__}: {exc}", "samples": task.profiles["scbench"].get("samples")}
    ids = tokenizer.encode(sample.context, add_special_tokens=False)
    return {
        "context_tokens": len(ids),
        "turns": len(sample.turns),
        "samples": task.profiles["scbench"]["samples"],
    }


def run_mode(name: str, mode: str, args, model, tokenizer, store) -> dict:
    """One dense run of a task in one mode; its summary figures."""
    from kvlife.bench.runner import BenchConfig, read_rows, run
    from kvlife.bench.summary import write_summary

    config = BenchConfig(model=args.model, tasks=[name], mode=mode, samples=args.samples,
                         prompt_format="chat", context_tokens=args.context_tokens, dtype=args.dtype,
                         max_turns=args.max_turns)
    out = Path(args.root) / config.run_id()
    started = time.perf_counter()
    run(config, out=out, model=model, tokenizer=tokenizer, progress=False, store=store)
    wall = time.perf_counter() - started
    stats = write_summary(out)["tasks"][name]
    rows = read_rows(out / "predictions.jsonl")
    # rows carry each turn's prefill and decode; a resumed run's wall clock covers only its new samples
    per_sample = sum(r["prefill_s"] + (r["new_tokens"] / r["decode_tok_s"] if r.get("decode_tok_s") else 0)
                     for r in rows) / max(1, stats["samples"])
    return {"turn1": stats["turn1"], "turn1_ci": stats["turn1_ci"], "all_turns": stats["all_turns"],
            "all_turns_ci": stats["all_turns_ci"], "per_turn": stats["per_turn"], "samples": stats["samples"],
            "context_tokens": stats["context_tokens"], "reference_nll": stats["reference_nll"],
            "compute_s_per_sample": round(per_sample, 1), "wall_s_this_run": round(wall, 1), "run": out.name,
            "max_turns": args.max_turns}


def ceiling(task, args, model, tokenizer) -> dict | None:
    """The model's score when the context is only the part asked about (summary tasks)."""
    from kvlife.session import Session

    if not hasattr(task, "part_only"):
        return None
    session = Session(model, tokenizer, "dense", mode="multi-request")
    scores = []
    for sample in task.samples("default", args.samples, 0):
        for turn in sample.turns[:1]:
            part = task.part_only(sample, turn)
            if part is None:
                continue
            session.prefill(part)
            result = session.ask(turn.query, max_new_tokens=sample.max_new_tokens, score_reference=False)
            scores.append(task.score(result.prediction, turn.answer))
    if not scores:
        return None
    from kvlife.bench.stats import bootstrap_mean

    found = bootstrap_mean(scores)
    return {"turn1": round(found.mean, 4), "turn1_ci": [round(found.low, 4), round(found.high, 4)],
            "samples": found.n, "reference_scores_itself": task.score(turn.answer, turn.answer),
            "how": "the model's answer when the context is only the asked part (retrieval made trivial)"}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--context-tokens", type=int, default=None,
                        help="resize the default profile (long rows)")
    parser.add_argument("--max-turns", type=int, default=None,
                        help="answer only the first N turns of each sample "
                             "(turn-1 calibration: --max-turns 1)")
    parser.add_argument("--ceiling", action="store_true", help="measure the metric ceiling of summary tasks")
    parser.add_argument("--root", default="results/tasks-bench")
    parser.add_argument("--no-write", action="store_true", help="print only (calibration)")
    args = parser.parse_args()

    from kvlife import models
    from kvlife.bench.runner import versions
    from kvlife.bench.tasks import TASKS, get_task
    from kvlife.store import open_store

    names = [t for t in args.tasks.split(",") if t] or sorted(TASKS)
    modes = [m for m in args.modes.split(",") if m]
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    dtype = models.dtype_name(next(model.parameters()).dtype)
    store = open_store(f"disk:{Path(args.root) / 'store'}")
    for name in names:
        task = get_task(name)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results.update({"model": args.model, "dtype": dtype, "versions": versions(), "commit": commit()})
        results.setdefault("tasks", {})
        entry = results["tasks"].setdefault(name, {})
        entry["group"] = task.group
        by_mode = {mode: run_mode(name, mode, args, model, tokenizer, store) for mode in modes}
        worst = min(
            by_mode.values(),
            key=lambda figures: figures["turn1"] if figures["turn1"] is not None else -1,
        )
        summary = {"turn1": worst["turn1"], "turn1_ci": worst["turn1_ci"], "samples": worst["samples"],
                   "context_tokens": worst["context_tokens"], "modes": by_mode, "commit": commit()}
        if args.context_tokens:
            entry.setdefault("long", {})[str(args.context_tokens)] = summary
        else:
            old = entry.get("default", {})
            if "ceiling" in old:
                summary["ceiling"] = old["ceiling"]
            if args.ceiling and (found := ceiling(task, args, model, tokenizer)) is not None:
                summary["ceiling"] = found
            if summary.get("ceiling"):
                summary["relative_to_ceiling"] = round(summary["turn1"] / summary["ceiling"]["turn1"], 3)
            summary["at_least_75"] = summary["turn1"] >= 0.75 or summary.get("relative_to_ceiling", 0) >= 0.75
            entry["default"] = summary
            entry["scbench"] = scbench_length(task, tokenizer)
        where = f"long {args.context_tokens}" if args.context_tokens else "default"
        cells = "  ".join(
            f"{mode}: turn1={f['turn1']} {f['turn1_ci']} n={f['samples']}" for mode, f in by_mode.items()
        )
        print(f"{name:22} {where:10} ctx={summary['context_tokens']}  {cells}"
              + (f"  ceiling={summary['ceiling']['turn1']}" if summary.get("ceiling") else ""), flush=True)
        if not args.no_write:
            RESULTS.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
