"""SCBench's findings at length: a method grid on 8K-token contexts, both modes, with paired intervals.

    .venv/bin/python benchmarks/long.py [--samples 8] [--tasks kv,qa_eng] [--context-tokens 8192]
        [--specs "dense;snapkv(ratio=0.25);..."] [--collect]

Runs `kvlife bench` in-process for every recipe and mode into results/long/<run-id>/ (resumable:
rerun to continue; rows are written a sample at a time, so partial runs count). After every run,
and with --collect without running anything, it writes benchmarks/results/long.json: one row per
(method, mode, task) with accuracy over all turns, per-turn accuracy, and the paired difference
against dense on the same samples with its 95% bootstrap interval; the findings section tests
three of SCBench's findings with paired intervals; benchmarks/results/long-report.html is
`kvlife report` over all runs. A finding "holds" only where its interval excludes 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from foundation import machine  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.bench.report import write_html  # noqa: E402
from kvlife.bench.runner import BenchConfig, read_rows, run  # noqa: E402
from kvlife.bench.stats import paired_difference  # noqa: E402
from kvlife.bench.summary import by_sample  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SPECS = ["dense", "snapkv(ratio=0.25)", "streamingllm(ratio=0.25)", "kivi(bits=2)", "minference", "a_shape",
         "tri_shape", "quest"]
MODES = ("multi-turn", "multi-request")
BOUNDED_MEMORY = ("streamingllm", "snapkv")  # sub-O(n) memory: they keep a fixed share of the context
QUERY_AWARE = ("snapkv",)
STATIC_PREFILL = ("a_shape", "tri_shape")
DYNAMIC_PREFILL = ("minference",)


def family(spec: str) -> str:
    return spec.split("(")[0]


def load_rows(run_dirs: dict[tuple[str, str], Path]) -> dict[tuple[str, str], list[dict]]:
    return {key: read_rows(path / "predictions.jsonl") for key, path in run_dirs.items()}


def diff(rows_a: list[dict], rows_b: list[dict], turn: int | None = None):
    return paired_difference(by_sample(rows_a, turn), by_sample(rows_b, turn))


def table_rows(rows: dict[tuple[str, str], list[dict]], context_tokens: int) -> list[dict]:
    out = []
    for (spec, mode), method_rows in rows.items():
        dense_rows = rows.get(("dense", mode), [])
        for task in sorted({r["task"] for r in method_rows}):
            mine = [r for r in method_rows if r["task"] == task]
            dense = [r for r in dense_rows if r["task"] == task]
            turns = sorted({r["turn"] for r in mine})
            found = diff(mine, dense)
            per_turn = {}
            for turn in turns:
                scores = [r["score"] for r in mine if r["turn"] == turn]
                turn_diff = diff(mine, dense, turn)
                per_turn[str(turn)] = {"accuracy": round(sum(scores) / len(scores), 4),
                                       **({"vs_dense": turn_diff.to_dict()} if turn_diff else {})}
            held = [r["cache_bytes"] for r in mine if r["turn"] == 1 and r.get("cache_bytes") is not None]
            out.append({
                "method": spec, "mode": mode, "task": task,
                "context_tokens": round(sum(r["context_tokens"] for r in mine if r["turn"] == 1)
                                        / max(1, len([r for r in mine if r["turn"] == 1]))),
                "target_context_tokens": context_tokens,
                "samples": len({r["sample_id"] for r in mine}),
                "accuracy": round(sum(r["score"] for r in mine) / len(mine), 4),
                "diff_vs_dense": round(found.mean, 4) if found else None,
                "ci_low": round(found.low, 4) if found else None,
                "ci_high": round(found.high, 4) if found else None,
                "verdict": found.verdict if found else None,
                "paired_samples": found.n if found else 0,
                "per_turn": per_turn,
                "cache_bytes_turn1": round(sum(held) / len(held)) if held else None,
            })
    return out


def findings(rows: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """SCBench's three findings, each as paired differences with intervals (over tasks' samples)."""
    out = []

    def interval(found):
        return found.to_dict() if found else None

    # 1. Sub-O(n)-memory methods decay across turns (multi-turn): turn 1 against dense, later turns
    # against dense.
    for spec, mode in rows:
        if family(spec) in BOUNDED_MEMORY and mode == "multi-turn" and ("dense", mode) in rows:
            mine, dense = rows[(spec, mode)], rows[("dense", mode)]
            later = [r for r in mine if r["turn"] > 1]
            later_dense = [r for r in dense if r["turn"] > 1]
            first, rest = diff(mine, dense, 1), diff(later, later_dense)
            decay = paired_difference(by_sample(later), by_sample(mine, 1))  # later turns minus turn 1
            dense_decay = paired_difference(by_sample(later_dense), by_sample(dense, 1))
            holds = bool(rest and rest.verdict == "worse" and (first is None or first.verdict != "worse"))
            out.append({"finding": "sub-O(n) memory decays across turns", "method": spec, "mode": mode,
                        "turn1_vs_dense": interval(first), "later_turns_vs_dense": interval(rest),
                        "later_minus_turn1": interval(decay),
                        "dense_later_minus_turn1": interval(dense_decay),
                        "holds": holds,
                        "reads": "holds when later turns are worse than dense beyond noise while turn 1 "
                                 "is not"})
    # 2. Multi-request (compressed before any query) hurts query-aware eviction more than multi-turn.
    for spec in {s for s, _ in rows if family(s) in QUERY_AWARE}:
        if all(key in rows for key in ((spec, "multi-turn"), (spec, "multi-request"),
                                      ("dense", "multi-turn"), ("dense", "multi-request"))):
            per_mode = {mode: by_sample(rows[(spec, mode)]) for mode in MODES}
            dense = {mode: by_sample(rows[("dense", mode)]) for mode in MODES}
            loss = {mode: {k: per_mode[mode][k] - dense[mode][k] for k in per_mode[mode] if k in dense[mode]}
                    for mode in MODES}
            found = paired_difference(loss["multi-request"], loss["multi-turn"])
            out.append({"finding": "multi-request hurts query-aware eviction", "method": spec,
                        "multi_turn_vs_dense": interval(diff(rows[(spec, "multi-turn")],
                                                             rows[("dense", "multi-turn")])),
                        "multi_request_vs_dense": interval(diff(rows[(spec, "multi-request")],
                                                                rows[("dense", "multi-request")])),
                        "request_loss_minus_turn_loss": interval(found),
                        "holds": bool(found and found.verdict == "worse"),
                        "reads": "holds when the loss against dense is larger in multi-request, "
                                 "beyond noise"})
    # 3. Dynamic sparse prefill beats static patterns.
    for mode in MODES:
        for dynamic in [s for s, m in rows if m == mode and family(s) in DYNAMIC_PREFILL]:
            for static in [s for s, m in rows if m == mode and family(s) in STATIC_PREFILL]:
                found = diff(rows[(dynamic, mode)], rows[(static, mode)])
                out.append({"finding": "dynamic sparse prefill beats static patterns", "mode": mode,
                            "dynamic": dynamic, "static": static, "dynamic_minus_static": interval(found),
                            "holds": bool(found and found.verdict == "better"),
                            "reads": "holds when the dynamic method scores higher on the same samples, "
                                     "beyond noise"})
    return out


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip() or "unknown"


def write_outputs(run_dirs: dict[tuple[str, str], Path], settings: dict) -> None:
    rows = load_rows(run_dirs)
    payload = {"machine": machine(), "commit": commit(), "settings": settings,
               "rows": table_rows(rows, settings["context_tokens"]), "findings": findings(rows),
               "notes": "accuracy: mean over every turn of every sample; diff_vs_dense, ci_low, ci_high: the "
                        "paired difference against dense's run of the same mode on the same samples, 95% "
                        "bootstrap interval over samples (a turn's scores stay with their sample). A row "
                        "with fewer samples than settings.samples is a run still in progress."}
    (RESULTS / "long.json").write_text(json.dumps(payload, indent=2))
    write_html(list(run_dirs.values()), RESULTS / "long-report.html")
    print(f"{'method':28} {'mode':13} {'task':8} {'n':>3} {'acc':>5} {'vs dense [95% CI]':>24}")
    for r in payload["rows"]:
        ci = (f"{r['diff_vs_dense']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
              if r["diff_vs_dense"] is not None else "-")
        print(f"{r['method']:28} {r['mode']:13} {r['task']:8} {r['samples']:3d} {r['accuracy']:5.2f} "
              f"{ci:>24}")
    for f in payload["findings"]:
        print(f"finding: {f['finding']} ({f.get('method') or f.get('dynamic') + ' vs ' + f['static']}, "
              f"{f.get('mode', 'both modes')}): {'holds' if f['holds'] else 'not shown'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tasks", default="kv,qa_eng")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--context-tokens", type=int, default=8192)
    parser.add_argument("--specs", default=";".join(SPECS), help="';'-separated recipes (dense first)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="results/long", help="run directories' parent")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: rewrite the results from the runs here")
    args = parser.parse_args()
    specs = [s for s in args.specs.split(";") if s]
    settings = {"model": args.model, "tasks": args.tasks, "samples": args.samples,
                "context_tokens": args.context_tokens, "specs": specs, "modes": args.modes}
    settings["dtype"] = models.dtype_name(models.resolve_dtype(args.dtype))
    model, tokenizer = (None, None) if args.collect else models.load(args.model, dtype=settings["dtype"])
    run_dirs: dict[tuple[str, str], Path] = {}
    for spec in specs:
        for mode in args.modes.split(","):
            config = BenchConfig(model=args.model, tasks=args.tasks.split(","), mode=mode, method=spec,
                                 samples=args.samples, context_tokens=args.context_tokens,
                                 dtype=settings["dtype"])
            run_dir = Path(args.out) / config.run_id()
            if args.collect:
                if (run_dir / "predictions.jsonl").is_file():
                    run_dirs[(spec, mode)] = run_dir
                continue
            started = time.perf_counter()
            run(config, out=run_dir, model=model, tokenizer=tokenizer, progress=False)
            print(f"# {spec} {mode}: {time.perf_counter() - started:.0f} s", flush=True)
            run_dirs[(spec, mode)] = run_dir
            write_outputs(run_dirs, settings)
    if args.collect:
        write_outputs(run_dirs, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
