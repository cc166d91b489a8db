"""Compression sweep: every compress method at several budgets, both modes, on the default tasks.

    .venv/bin/python benchmarks/compress.py [--samples 2] [--max-turns 3] [--ratios 0.25,0.125,0.5]
    .venv/bin/python benchmarks/compress.py --name prefill --specs "dense;a_shape(n_local=256)"

Loads the model once and runs `kvlife bench` runs in-process into results/compress/<run-id>/
(resumable: rerun to continue where it stopped). After every run it rewrites
benchmarks/results/compress.json (one row per run: method, budget, mode, accuracy per turn,
achieved cache bytes, prefill and decode time, NLL, agreement with dense) and
benchmarks/results/compress-report.html (`kvlife report` over all runs), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.bench.report import write_html  # noqa: E402
from kvlife.bench.runner import BenchConfig, read_rows, run, sample_done  # noqa: E402
from kvlife.bench.summary import write_summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EVICTION = ["streamingllm", "snapkv", "pyramidkv", "h2o", "tova", "adakv"]


def grid(ratios: list[float]) -> list[str]:
    specs = ["dense"]
    for ratio in ratios:  # in priority order: the first ratio for every method before the next
        specs += [f"{name}(ratio={ratio})" for name in EVICTION]
        if ratio == ratios[0]:
            specs += ["kivi(bits=2)", "kivi(bits=4)"]
    return specs


def row(run_dir: Path) -> dict:
    summary = write_summary(run_dir)
    config = summary["config"]
    tasks = summary["tasks"]
    per_turn: dict[str, list[float]] = {}
    for stats in tasks.values():
        for turn, value in stats["per_turn"].items():
            if value is not None:
                per_turn.setdefault(turn, []).append(value)
    return {
        "method": config["method"], "mode": config["mode"], "run": run_dir.name,
        "accuracy_per_turn": {t: round(sum(v) / len(v), 3) for t, v in sorted(per_turn.items())},
        "accuracy_all_turns": summary["overall"]["all_turns"],
        "accuracy_turn1": summary["overall"]["turn1"],
        "per_task_all_turns": {name: stats["all_turns"] for name, stats in tasks.items()},
        "reference_nll": summary["overall"]["reference_nll"],
        "dense_agreement": summary["overall"]["dense_agreement"],
        "cache_bytes_turn1": _mean([s["turn1_cache_bytes"] for s in tasks.values()]),
        "cache_bytes_mean": summary["overall"]["cache_bytes"],
        "prefill_s": _mean([s["prefill_s"] for s in tasks.values()]),
        "decode_tok_s": _mean([s["decode_tok_s"] for s in tasks.values()]),
        "samples_per_task": max((s["samples"] for s in tasks.values()), default=0),
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def write_outputs(run_dirs: list[Path], settings: dict, name: str = "compress") -> None:
    rows = [row(d) for d in run_dirs]
    dense = {r["mode"]: r["cache_bytes_turn1"] for r in rows if r["method"] == "dense"}
    for r in rows:
        base = dense.get(r["mode"])
        r["bytes_vs_dense"] = (
            round(r["cache_bytes_turn1"] / base, 4) if base and r["cache_bytes_turn1"] else None
        )
    payload = {
        "machine": machine(),
        "settings": settings,
        "rows": rows,
        "notes": "Small samples per task: read accuracy as indicative; NLL and dense agreement are the "
        "finer fidelity signals. cache bytes: K/V held at turn 1 after compression (float32). "
        + settings.get("note", ""),
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    write_html(run_dirs, RESULTS / f"{name}-report.html")
    print(f"{'method':28} {'mode':13} {'turns':24} {'all':>5} {'NLL':>6} {'=dense':>6} {'bytes':>6}")
    for r in rows:
        turns = " ".join(f"{v:.2f}" for v in r["accuracy_per_turn"].values())
        print(
            f"{r['method']:28} {r['mode']:13} {turns:24} {r['accuracy_all_turns'] or 0:5.2f} "
            f"{r['reference_nll'] or 0:6.3f} "
            f"{r['dense_agreement'] if r['dense_agreement'] is not None else '-':>6} "
            f"{r['bytes_vs_dense'] or 0:6.3f}",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--tasks", default="kv,prefix_suffix,multihop,math_find")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--ratios", default="0.25,0.125,0.5")
    parser.add_argument("--modes", default="multi-turn,multi-request")
    parser.add_argument("--specs", default=None,
                        help="';'-separated recipes to run instead of the compression grid (dense first)")
    parser.add_argument("--name", default="compress", help="results file stem: benchmarks/results/NAME.json")
    parser.add_argument("--out", default=None, help="run directories' parent (default results/NAME)")
    parser.add_argument("--note", default="", help="a sentence added to the results' notes")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: rewrite the results from the runs already complete (others are listed as missing)",
    )
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    specs = args.specs.split(";") if args.specs else grid(ratios)
    out = Path(args.out or f"results/{args.name}")
    settings = {
        "model": args.model,
        "tasks": args.tasks,
        "samples": args.samples,
        "max_turns": args.max_turns,
        "ratios": ratios if not args.specs else None,
        "specs": specs,
        "profile": "default",
        "note": args.note,
    }
    model, tokenizer = (None, None) if args.collect else models.load(args.model)
    run_dirs: list[Path] = []
    missing: list[str] = []
    for spec in specs:
        for mode in args.modes.split(","):
            config = BenchConfig(model=args.model, tasks=args.tasks.split(","), mode=mode, method=spec,
                                 samples=args.samples, max_turns=args.max_turns)
            if args.collect:
                run_dir = out / config.run_id()
                if _complete(run_dir, len(config.tasks) * args.samples):
                    run_dirs.append(run_dir)
                else:
                    missing.append(f"{spec} {mode}")
                continue
            started = time.perf_counter()
            run_dir = run(config, out=out / config.run_id(), model=model, tokenizer=tokenizer,
                          progress=False)
            print(f"# {spec} {mode}: {time.perf_counter() - started:.0f} s", flush=True)
            run_dirs.append(run_dir)
            write_outputs(run_dirs, settings, args.name)
    if args.collect:
        settings["not_run"] = missing
        write_outputs(run_dirs, settings, args.name)
        print(f"not run: {', '.join(missing) or 'none'}")
    return 0


def _complete(run_dir: Path, expected_samples: int) -> bool:
    """Whether a run directory holds every sample (rows are appended a sample at a time)."""
    return len(sample_done(read_rows(run_dir / "predictions.jsonl"))) >= expected_samples


if __name__ == "__main__":
    sys.exit(main())
