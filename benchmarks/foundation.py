"""Foundation benchmark: per model load time, prefill and decode speed, peak memory; dense accuracy.

    .venv/bin/python benchmarks/foundation.py [--models qwen2.5-coder-0.5b,smollm2-135m]
        [--lengths 1024,4096,8192] [--accuracy-runs results/RUN ...]

Each model is measured in its own process (so peak RSS is that model's). Dense accuracy is read
from `kvlife bench` run directories (dense, default profile), one per task set and mode. Writes
benchmarks/results/foundation.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "foundation.json"


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cpus, {mem:.0f} GiB, {platform.system()} (no GPU)"


def measure_model(name: str, lengths: list[int], decode_tokens: int) -> dict:
    """Runs in a child process: load, prefill at each length, decode."""
    import torch

    from kvlife import models
    from kvlife.session import Session

    record = json.loads(models.record_path(name).read_text())
    started = time.perf_counter()
    model, tokenizer = models.load(name)
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
            "decode_tok_s": round(decode, 2), "decode_context_tokens": lengths[-1], "peak_rss_mb": round(peak_mb)}


def dense_accuracy(run_dirs: list[Path]) -> dict:
    out: dict = {}
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        config = summary["config"]
        if config.get("method") != "dense":
            continue
        for task, stats in summary["tasks"].items():
            entry = out.setdefault(config["model"], {}).setdefault(task, {}).setdefault(config["profile"], {})
            entry[config["mode"]] = {
                "turn1": stats["turn1"], "all_turns": stats["all_turns"],
                "samples": stats["samples"], "context_tokens": stats["context_tokens"],
                "reference_nll": stats["reference_nll"], "run": run_dir.name,
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-coder-0.5b,smollm2-135m,gemma3-270m")
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--accuracy-runs", nargs="*", default=[])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.child:
        print(json.dumps(measure_model(args.child, lengths, args.decode_tokens)))
        return 0
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = {"machine": machine(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"), "models": existing.get("models", {}),
               "dense_accuracy": existing.get("dense_accuracy", {}),
               "notes": "prefill/decode: dense kvlife attention, float32, batch 1, plain text from torch's sources; "
                        "decode_tok_s measured after the longest prefill. Accuracy from `kvlife bench` dense runs."}
    for name in [m for m in args.models.split(",") if m]:
        child = subprocess.run([sys.executable, __file__, "--child", name, "--lengths", args.lengths,
                                "--decode-tokens", str(args.decode_tokens)], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{name}: failed: {child.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        results["models"][name] = json.loads(child.stdout.strip().splitlines()[-1])
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
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
