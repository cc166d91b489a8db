"""Task benchmark: context length, dense accuracy and wall time per sample for every task.

    flock /tmp/kvlife-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tasks.py \
        [--tasks kv,repoqa] [--samples 4] [--max-turns N] [--no-write]

For each task's `default` profile: a dense `kvlife bench` run in multi-request mode (the context
prefilled once, each turn answered on it) on the default model, giving turn-1 and all-turn
accuracy, the context length in tokens, and wall time per sample (prefill and every turn). For
the `scbench` profile only the context length of one generated sample is measured (no model run).
Runs go to results/tasks-bench/ (they resume); writes benchmarks/results/tasks.json (merging
tasks measured earlier) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "tasks.json"


def scbench_length(task, tokenizer) -> dict:
    try:
        sample = task.samples("scbench", 1)[0]
    except Exception as exc:  # a profile that cannot generate is a finding to record, not a crash
        return {"error": f"{type(exc).__name__}: {exc}", "samples": task.profiles["scbench"].get("samples")}
    ids = tokenizer.encode(sample.context, add_special_tokens=False)
    return {"context_tokens": len(ids), "turns": len(sample.turns), "samples": task.profiles["scbench"]["samples"]}


def scbench_only(args) -> int:
    """The scbench profiles' context lengths, with the default model's tokenizer (no model run)."""
    from transformers import AutoTokenizer

    from kvlife import models
    from kvlife.bench.tasks import TASKS, get_task

    tokenizer = AutoTokenizer.from_pretrained(str(models.resolve(args.model)))
    for name in [t for t in args.tasks.split(",") if t] or sorted(TASKS):
        task = get_task(name)
        started = time.perf_counter()
        entry = scbench_length(task, tokenizer)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"model": args.model, "tasks": {}}
        results["tasks"].setdefault(name, {"group": task.group})["scbench"] = entry
        print(f"{name:22} scbench ctx={entry.get('context_tokens', entry.get('error'))} turns={entry.get('turns')} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        if not args.no_write:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=None)
    parser.add_argument("--mode", default="multi-request", choices=["multi-request", "multi-turn"])
    parser.add_argument("--root", default="results/tasks-bench")
    parser.add_argument("--no-scbench", action="store_true", help="skip the scbench-profile context lengths")
    parser.add_argument("--no-write", action="store_true", help="print only (calibration)")
    parser.add_argument("--scbench-only", action="store_true", help="only the scbench-profile context lengths")
    args = parser.parse_args()
    if args.scbench_only:
        return scbench_only(args)

    from kvlife import models
    from kvlife.bench.runner import BenchConfig, run, versions
    from kvlife.bench.summary import write_summary
    from kvlife.bench.tasks import TASKS, get_task

    names = [t for t in args.tasks.split(",") if t] or sorted(TASKS)
    model, tokenizer = models.load(args.model)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = {"model": args.model, "versions": versions(), "tasks": existing.get("tasks", {}),
               "notes": (f"dense, {args.mode}, prompt format chat, seed 0, greedy; default profile with "
                         "`samples` samples per task; wall_s_per_sample covers prefill and every turn. "
                         "scbench: one generated sample's context length only (no model run).")}
    for name in names:
        task = get_task(name)
        config = BenchConfig(model=args.model, tasks=[name], mode=args.mode, samples=args.samples,
                             max_turns=args.max_turns, prompt_format="chat")
        out = Path(args.root) / config.run_id()
        started = time.perf_counter()
        run(config, out=out, model=model, tokenizer=tokenizer, progress=False)
        wall = time.perf_counter() - started
        stats = write_summary(out)["tasks"][name]
        row_walls = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line]
        entry = {
            "group": task.group,
            "default": {"context_tokens": stats["context_tokens"], "turn1": stats["turn1"],
                        "all_turns": stats["all_turns"], "per_turn": stats["per_turn"],
                        "samples": stats["samples"], "turns_per_sample": len(row_walls) / max(1, stats["samples"]),
                        "wall_s_per_sample": round(wall / max(1, args.samples), 1) if wall > 5 else
                        results["tasks"].get(name, {}).get("default", {}).get("wall_s_per_sample"),
                        "reference_nll": stats["reference_nll"], "mode": args.mode, "run": out.name},
        }
        if not args.no_scbench:
            entry["scbench"] = scbench_length(task, tokenizer)
        elif name in results["tasks"] and "scbench" in results["tasks"][name]:
            entry["scbench"] = results["tasks"][name]["scbench"]
        results["tasks"][name] = entry
        d = entry["default"]
        print(f"{name:22} ctx={d['context_tokens']} turn1={d['turn1']} all={d['all_turns']} n={d['samples']} "
              f"wall/sample={d['wall_s_per_sample']}s" + (f" scbench_ctx={entry['scbench']['context_tokens']}"
                                                          if "scbench" in entry else ""), flush=True)
        if not args.no_write:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
