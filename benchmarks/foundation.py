"""Foundation benchmark: per model load time, prefill and decode speed, peak memory; dense accuracy.

    .venv/bin/python benchmarks/foundation.py [--models qwen2.5-coder-0.5b,smollm2-135m]
        [--lengths 1024,4096,8192] [--accuracy-runs results/RUN ...]
        [--dtypes float32,bfloat16] [--suite] [--vllm-decode openai_backend.json]

Each model is measured in its own process (so peak RSS is that model's). Dense accuracy is read
from `kvlife bench` run directories (dense), one per task set and mode, with 95% intervals.
--dtypes measures the default model in each dtype (prefill at every length, decode, and the
reference NLL of task answers) and writes the `bf16` section: speed-ups of bfloat16 over float32
and the NLL change, with whether this CPU computes bfloat16 natively. --suite times the default
suite (12 tasks x 8 samples, multi-turn, dense, the dtype `auto` picks) as a new user runs it and
records `default_suite_minutes`. --vllm-decode copies vLLM's CPU decode speed from the engines
benchmark's JSON. Writes benchmarks/results/foundation.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import machine

RESULTS = Path(__file__).parent / "results" / "foundation.json"



def measure_model(name: str, lengths: list[int], decode_tokens: int, dtype: str = "auto",
                  nll_tasks: tuple[str, ...] = (), nll_samples: int = 2) -> dict:
    """Runs in a child process: load, prefill at each length, decode."""
    import torch

    from kvlife import models
    from kvlife.session import Session

    record = json.loads(models.record_path(name).read_text())
    started = time.perf_counter()
    model, tokenizer = models.load(name, dtype=dtype)
    load_s = time.perf_counter() - started
    session = Session(model, tokenizer, "dense", mode="multi-request", prompt_format="plain")
    text = Path(torch.__file__).read_text() * 20  # real text, long enough for any length here
    ids = tokenizer.encode(text, add_special_tokens=False)
    prefill = {}
    session.cache = session.new_cache()
    session.forward(ids[:64], "prefill")  # warm-up
    for length in lengths:
        session.cache = session.new_cache()
        started = time.perf_counter()
        logits = session.forward(ids[:length], "prefill")
        prefill[str(length)] = round(length / (time.perf_counter() - started), 1)
    # decode after the last prefill
    token = int(logits[-1].argmax())
    started = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(session.forward([token], "decode")[-1].argmax())
    decode = decode_tokens / (time.perf_counter() - started)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"convert_s": record.get("convert_s"), "load_s": round(load_s, 2), "prefill_tok_s": prefill,
            "decode_tok_s": round(decode, 2), "decode_context_tokens": lengths[-1],
            "peak_rss_mb": round(peak_mb),
            "dtype": models.dtype_name(next(model.parameters()).dtype),
            "reference_nll": task_nll(model, tokenizer, nll_tasks, nll_samples) if dtype != "auto" else None,
            "reference_nll_samples": nll_samples if dtype != "auto" else None}


NLL_TASKS = ("kv", "prefix_suffix", "qa_eng", "repoqa", "multihop", "summary")


def task_nll(model, tokenizer, names: tuple[str, ...] = NLL_TASKS, samples: int = 2) -> dict:
    """Mean teacher-forced NLL of the reference answers (turn 1 of the first samples of some tasks)."""
    from kvlife.bench.tasks import get_task
    from kvlife.session import Session

    out = {}
    for name in names or NLL_TASKS:
        session = Session(model, tokenizer, "dense", mode="multi-request")
        values = []
        for sample in get_task(name).samples("default", samples, 0):
            session.prefill(sample.context)
            turn = sample.turns[0]
            values.append(session.ask(turn.query, max_new_tokens=1, reference=turn.answer).reference_nll)
        out[name] = round(sum(values) / len(values), 5)
    return out


def bf16_section(float32: dict, bfloat16: dict, lengths: list[int]) -> dict:
    """bfloat16 against float32 on the default model: speed-ups and the change of reference NLL."""
    import torch

    from kvlife.models import cpu_has_native_bf16

    nll32, nll16 = float32["reference_nll"], bfloat16["reference_nll"]
    changes = {t: round(100 * (nll16[t] - nll32[t]) / nll32[t], 3) for t in nll32 if nll32[t]}
    mean32, mean16 = sum(nll32.values()) / len(nll32), sum(nll16.values()) / len(nll16)
    return {
        "prefill_speedup": {
            str(n): round(bfloat16["prefill_tok_s"][str(n)] / float32["prefill_tok_s"][str(n)], 3)
            for n in lengths},
        "decode_speedup": round(bfloat16["decode_tok_s"] / float32["decode_tok_s"], 3),
        "nll_change_pct": round(100 * (mean16 - mean32) / mean32, 3),
        "nll_change_pct_per_task": changes,
        "float32": float32, "bfloat16": bfloat16,
        "native_bf16": cpu_has_native_bf16(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "auto_picks": "bfloat16" if cpu_has_native_bf16() else "float32",
    }


def time_suite(model_name: str) -> dict:
    """The default suite as a new user runs it: 12 tasks x 8 samples, multi-turn, dense, dtype auto."""
    from kvlife.bench.runner import BenchConfig, run
    from kvlife.bench.summary import write_summary
    from kvlife.bench.tasks import TASKS

    config = BenchConfig(model=model_name, tasks=sorted(TASKS), mode="multi-turn", samples=8)
    out = Path("results/foundation-suite") / config.run_id()
    if out.exists():
        raise SystemExit(f"{out} exists: a resumed run would not time the whole suite; remove it first")
    started = time.perf_counter()
    run(config, out=out, progress=False)
    minutes = (time.perf_counter() - started) / 60
    summary = write_summary(out)
    return {"default_suite_minutes": round(minutes, 1), "default_suite_run": out.name,
            "default_suite_turn1": summary["overall"]["turn1"], "default_suite_dtype": config.dtype}


def dense_accuracy(run_dirs: list[Path]) -> dict:
    from kvlife.bench.summary import write_summary

    out: dict = {}
    for run_dir in run_dirs:
        summary = write_summary(run_dir)  # recomputed: intervals included
        config = summary["config"]
        if config.get("method") != "dense":
            continue
        for task, stats in summary["tasks"].items():
            entry = out.setdefault(config["model"], {}).setdefault(task, {}).setdefault(config["profile"], {})
            entry[config["mode"]] = {
                "turn1": stats["turn1"], "turn1_ci": stats.get("turn1_ci"), "all_turns": stats["all_turns"],
                "all_turns_ci": stats.get("all_turns_ci"), "samples": stats["samples"],
                "context_tokens": stats["context_tokens"], "reference_nll": stats["reference_nll"],
                "run": run_dir.name,
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-coder-0.5b,smollm2-135m,gemma3-270m")
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--accuracy-runs", nargs="*", default=[])
    parser.add_argument("--dtypes", default=None,
                        help="e.g. float32,bfloat16: the bf16 section (default model)")
    parser.add_argument("--suite", action="store_true", help="time the default suite (about an hour)")
    parser.add_argument("--vllm-decode", default=None, metavar="JSON", help="the engines benchmark's results")
    parser.add_argument("--nll-tasks", default=",".join(NLL_TASKS),
                        help="tasks whose reference NLL the --dtypes section compares")
    parser.add_argument("--nll-samples", type=int, default=2, help="samples per task for that NLL")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-dtype", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.child:
        nll_tasks = tuple(t for t in args.nll_tasks.split(",") if t)
        print(json.dumps(measure_model(args.child, lengths, args.decode_tokens, args.child_dtype,
                                       nll_tasks, args.nll_samples)))
        return 0
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    # written by other runs (the bf16 section, the default suite's timing, vLLM's decode)
    kept = ("bf16", "default_suite_minutes", "default_suite_run", "default_suite_turn1",
            "default_suite_dtype", "decode_tok_s", "vllm_cpu_decode_tok_s", "vllm_cpu_decode")
    results = {"machine": machine(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
               "models": existing.get("models", {}),
               "dense_accuracy": existing.get("dense_accuracy", {}), "commit": _commit(),
               **{key: existing[key] for key in kept if key in existing},
               "notes": "prefill/decode: dense kvlife attention, float32, batch 1, plain text from torch's "
                        "sources; decode_tok_s measured after the longest prefill. Accuracy from "
                        "`kvlife bench` dense runs."}
    def child(name: str, dtype: str = "auto") -> dict | None:
        done = subprocess.run([sys.executable, __file__, "--child", name, "--lengths", args.lengths,
                               "--decode-tokens", str(args.decode_tokens), "--child-dtype", dtype,
                               "--nll-tasks", args.nll_tasks, "--nll-samples", str(args.nll_samples)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name} ({dtype}): failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])

    for name in [m for m in args.models.split(",") if m]:
        if (measured := child(name)) is not None:
            results["models"][name] = measured
    if args.dtypes:
        per_dtype = {dtype: child(models_default(), dtype) for dtype in args.dtypes.split(",")}
        if all(per_dtype.values()) and {"float32", "bfloat16"} <= set(per_dtype):
            results["bf16"] = bf16_section(per_dtype["float32"], per_dtype["bfloat16"], lengths)
    default = results["models"].get(models_default())
    if default:
        results["decode_tok_s"] = default["decode_tok_s"]  # the default model, the dtype auto picks
    if args.suite:
        results.update(time_suite(models_default()))
    if args.vllm_decode:
        engines = json.loads(Path(args.vllm_decode).read_text())
        found = _find_key(engines, "decode_tok_s_vllm") or _find_key(engines, "vllm_cpu_decode_tok_s")
        if found is not None:
            results["vllm_cpu_decode_tok_s"] = found
    if args.accuracy_runs:
        for model, tasks in dense_accuracy([Path(p) for p in args.accuracy_runs]).items():
            results["dense_accuracy"].setdefault(model, {}).update(tasks)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"machine: {results['machine']}")
    print(f"{'model':22} {'convert s':>9} {'load s':>7} " + " ".join(f"{'pf@' + str(n):>9}" for n in lengths)
          + f" {'decode':>7} {'RSS MB':>7}")
    for name, row in results["models"].items():
        print(f"{name:22} {row['convert_s'] or 0:9.1f} {row['load_s']:7.2f} "
              + " ".join(f"{row['prefill_tok_s'].get(str(n), 0):9.1f}" for n in lengths)
              + f" {row['decode_tok_s']:7.2f} {row['peak_rss_mb']:7d}")
    for model, tasks in results["dense_accuracy"].items():
        for task, profiles in tasks.items():
            for profile, modes in profiles.items():
                for mode, stats in modes.items():
                    print(f"{model:22} {task:14} {profile:8} {mode:13} turn1={stats['turn1']} "
                          f"all={stats['all_turns']} n={stats['samples']} ctx={stats['context_tokens']}")
    if "bf16" in results:
        b = results["bf16"]
        print(f"bfloat16 / float32 ({b['cpu_capability']}, native bf16: {b['native_bf16']}): prefill "
              + ", ".join(f"{n}: {v}x" for n, v in b["prefill_speedup"].items())
              + f"; decode {b['decode_speedup']}x; reference NLL {b['nll_change_pct']:+.2f}%")
    if "default_suite_minutes" in results:
        print(f"default suite: {results['default_suite_minutes']} min ({results.get('default_suite_dtype')})")
    print(f"wrote {RESULTS}")
    return 0


def models_default() -> str:
    from kvlife.models import DEFAULT_MODEL

    return DEFAULT_MODEL


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    return done.stdout.strip() or "unknown"


def _find_key(tree, key: str):
    """The first value stored under `key` anywhere in a JSON tree."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        values = tree.values()
    elif isinstance(tree, list):
        values = tree
    else:
        return None
    for value in values:
        if (found := _find_key(value, key)) is not None:
            return found
    return None


if __name__ == "__main__":
    sys.exit(main())
