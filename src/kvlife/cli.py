"""The `kvlife` command. Errors a user can cause print one line and exit non-zero.

Imports: this module's top imports nothing heavy, so that `kvlife --help`, the listings and `kvlife serve`
start in about a second; each `cmd_*` imports the modules it runs (the benchmark, the codec, the methods
load torch and transformers, seconds on a CPU) when it runs. That is the one place kvlife defers imports
on purpose, beside optional dependencies (pyarrow, datasets) and three heavy libraries loaded where used
(torch in models.py, transformers' modeling code in attention.register, faiss in methods/load/ivf.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from kvlife.errors import KvlifeError

EXIT_USER_ERROR = 2


def _console():
    from rich.console import Console

    return Console()


# ---- bench ---------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from kvlife.bench.runner import make_backend, run
    from kvlife.bench.summary import print_tables, write_summary

    tasks = _bench_tasks(args)
    modes = ["multi-turn", "multi-request"] if args.mode == "both" else [args.mode]
    _check_sizes(args, tasks)
    _check_backend(args)
    console = _console()
    store = None
    if args.store:
        from kvlife.store import open_store

        store = open_store(args.store, encoding=args.store_encoding, chunk_size=args.store_chunk)
    for mode in modes:
        config = _bench_config(args, tasks, mode)
        backend = None
        if args.backend == "openai":
            backend = make_backend(config, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
                                   concurrency=args.concurrency, timeout_s=args.timeout, retries=args.retries)
        out = Path(args.out) if args.out else None
        if out is not None and len(modes) > 1:
            out = out / config.run_id()
        run_dir = run(config, out=out, progress=not args.no_progress, console=console, store=store,
                      backend=backend)
        print_tables(write_summary(run_dir), console)
        console.print(f"results: {run_dir}")
    return 0


def _bench_tasks(args: argparse.Namespace) -> list[str]:
    """The tasks --tasks names (default: all, or with --data DIR those it has files for)."""
    from kvlife.bench.tasks import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TASKS)
    if not tasks:
        raise KvlifeError(f"--tasks {args.tasks!r} names no task; give names such as kv,qa_eng "
                          "(see `kvlife tasks`)")
    if args.samples is not None and args.samples < 1:
        raise KvlifeError(f"--samples must be at least 1, got {args.samples}")
    if args.data and not args.tasks and Path(args.data).is_dir():
        from kvlife.bench.data import TASK_FILES, data_files

        tasks = [t for t in tasks if t in TASK_FILES and data_files(Path(args.data), t)] or tasks
    return tasks


def _check_backend(args: argparse.Namespace) -> None:
    """Refuse options that do not go with --backend before anything runs."""
    if args.store and args.backend != "local":
        raise KvlifeError("--store needs the local backend (a server keeps its own cache)")
    if args.backend == "openai":
        if not args.base_url:
            raise KvlifeError("--backend openai needs --base-url URL (e.g. http://127.0.0.1:8000/v1)")
        if not args.model:
            raise KvlifeError("--backend openai needs --model NAME, the name the server serves "
                              "(see its /v1/models)")
        return
    if args.base_url:
        raise KvlifeError("--base-url is for --backend openai")
    if args.concurrency != 1:
        raise KvlifeError("--concurrency is for --backend openai (the local backend runs one sample "
                          "at a time)")


def _bench_config(args: argparse.Namespace, tasks: list[str], mode: str):
    from kvlife.bench.runner import BenchConfig
    from kvlife.models import DEFAULT_MODEL

    return BenchConfig(model=args.model or DEFAULT_MODEL, tasks=tasks, mode=mode, method=args.method,
                       samples=args.samples, profile=args.profile, seed=args.seed,
                       own_answers=args.own_answers, recompress=args.recompress, max_turns=args.max_turns,
                       prompt_format=args.format,
                       data=args.data, max_length=args.max_length, backend=args.backend,
                       base_url=args.base_url if args.backend == "openai" else None, dtype=args.dtype,
                       context_tokens=args.context_tokens)


def _check_sizes(args: argparse.Namespace, tasks: list[str]) -> None:
    """Refuse a bad --dtype or --context-tokens before any model is loaded."""
    from kvlife.models import DTYPES, context_window, resolve_dtype

    if args.dtype not in DTYPES:
        raise KvlifeError(f"unknown --dtype {args.dtype!r}; valid: {', '.join(DTYPES)}")
    if args.backend == "local":
        resolve_dtype(args.dtype)
    if args.context_tokens is None:
        return
    if args.context_tokens <= 0:
        raise KvlifeError(f"--context-tokens must be a positive number of tokens, got {args.context_tokens}")
    if args.data:
        raise KvlifeError("--context-tokens sizes generated tasks; with --data use --max-length")
    window = context_window(args.model) if args.backend == "local" and args.model else None
    if args.backend == "local" and not args.model:
        from kvlife.models import DEFAULT_MODEL

        window = context_window(DEFAULT_MODEL)
    if window is not None:
        from kvlife.bench.tasks import get_task

        room = max(get_task(name).room_tokens() for name in tasks)
        if args.context_tokens + room > window:
            raise KvlifeError(
                f"--context-tokens {args.context_tokens} does not fit the model's {window}-token window "
                f"with {room} tokens left for the queries and answers; use at most {window - room}"
            )


def cmd_serve(args: argparse.Namespace) -> int:
    from kvlife.store.server import serve

    return serve(args)


# ---- listings ------------------------------------------------------------------------------------

def cmd_methods(args: argparse.Namespace) -> int:
    from rich.table import Table

    from kvlife.methods.registry import METHODS

    rows = [cls.describe() for cls in METHODS.values()]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    table = Table(title="kvlife methods")
    # a name is what the user types: never cut or wrapped; the other columns wrap around it
    table.add_column("name", no_wrap=True, min_width=max(len(row["name"]) for row in rows))
    for column in ("stage", "parameters (defaults)", "paper"):
        table.add_column(column, overflow="fold")
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        table.add_row(row["name"], row["stage"], params, row["paper"])
    _console().print(table)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from rich.table import Table

    from kvlife.bench.tasks import TASKS

    table = Table(title="kvlife tasks")
    # a task name is what the user types: never cut or wrapped; the other columns wrap around it
    table.add_column("task", no_wrap=True, min_width=max(len(name) for name in TASKS))
    for column in ("group", "profiles", "what it asks"):
        table.add_column(column, overflow="fold")
    for name, cls in sorted(TASKS.items()):
        table.add_row(name, cls.group, ", ".join(cls.profiles), cls.description)
    _console().print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from kvlife import models

    if args.action == "pull":
        if not args.names:
            raise KvlifeError("name a model to pull, e.g. `kvlife models pull qwen2.5-coder-0.5b`")
        for name in args.names:
            models.pull(name)
        return 0
    from rich.table import Table

    table = Table(title=f"kvlife models (KVLIFE_HOME={models.kvlife_home()})")
    for column in ("name", "pulled", "description"):
        table.add_column(column)
    for row in models.listing():
        name = row["name"] + (" (default)" if row["default"] else "")
        table.add_row(
            name, "yes" if row["pulled"] else f"no: kvlife models pull {row['name']}", row["description"]
        )
    _console().print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kvlife.bench.summary import print_tables, write_summary

    console = _console()
    for run_dir in args.runs:
        path = Path(run_dir)
        if not (path / "predictions.jsonl").is_file():
            raise KvlifeError(f"{path} is not a kvlife run directory (no predictions.jsonl)")
        print_tables(write_summary(path), console, title=str(path))
    if args.out:
        from kvlife.bench.report import write_html

        write_html([Path(r) for r in args.runs], Path(args.out))
        console.print(f"report: {args.out}")
    return 0


# ---- parser --------------------------------------------------------------------------------------

# Commands whose parser lives in a module that loads torch (seconds): `kvlife --help` lists them from
# here; a command's module is imported, and its own parser built, only when the command line names it.
# (module, its help line, the module's function that runs it when add_parser does not set one)
HEAVY_COMMANDS = {
    "codec": ("kvlife.codec.cli", "encode, decode or inspect KV cache files with the codec", "run"),
    "search-patterns": ("kvlife.methods.prefill.search",
                        "search MInference's per-head sparse patterns (writes JSON)", None),
    "search-heads": ("kvlife.methods.compress.duo_search",
                     "find DuoAttention's retrieval and streaming heads (writes JSON)", None),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI's parser; `command`: the subcommand about to run (only its heavy parser is built)."""
    # numpy and rich come with these: imported here, `import kvlife.cli` stays at a tenth of a second
    from kvlife.store.serve_args import add_arguments as add_serve_arguments
    from kvlife.stream.cli import add_parser as add_stream_parsers

    parser = argparse.ArgumentParser(prog="kvlife", description="The life of a long-context LLM's KV cache.")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own progress bars (transformers' weight loading, GGUF "
                             "conversion); accepted anywhere on the command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench(sub)
    serve = sub.add_parser("serve", help="serve KV chunks and streamed contexts over HTTP "
                                         "(--store http://..., fetch)",
                           description="An HTTP chunk store: put/get/exists/stats, streamed contexts, bearer "
                                       "tokens, one directory per tenant, optionally a send rate shaped by a "
                                       "bandwidth trace.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    _add_listings(sub)
    for name, (module_name, help_text, run_name) in HEAVY_COMMANDS.items():
        if command == name:  # the command that runs: its module's own parser
            module = importlib.import_module(module_name)
            command_parser = module.add_parser(sub)
            if run_name:
                command_parser.set_defaults(func=getattr(module, run_name))
        else:  # listed in `kvlife --help` without importing its module
            sub.add_parser(name, help=help_text)
    add_stream_parsers(sub)
    return parser


def _add_bench(sub) -> None:
    from kvlife.models import DEFAULT_MODEL

    bench = sub.add_parser("bench", help="run the shared-context benchmark",
                           description="Run tasks on one shared context per sample, scored per turn.")
    add = bench.add_argument
    add("--model", default=None, help=f"registered model name or HF dir (default {DEFAULT_MODEL}); with "
        "--backend openai, the name the server serves")
    add("--tasks", default="", help="comma-separated task names (default: all; see `kvlife tasks`)")
    add("--mode", default="multi-turn", choices=["multi-turn", "multi-request", "both"])
    add("--method", default="dense", help="recipe spec, e.g. 'dense', 'streamingllm(n_local=256)'")
    add("--samples", type=int, default=None, help="samples per task (default: the profile's)")
    add("--profile", default="default", help="task sizes: default | long | scbench")
    add("--context-tokens", type=int, default=None, metavar="N",
        help="set every task's context length to about N tokens (any profile)")
    add("--dtype", default="auto", metavar="auto|float32|bfloat16",
        help="the local model's dtype; auto: bfloat16 on CUDA or a CPU with native bf16, else float32")
    add("--out", default=None, help="run directory (default results/<run-id>; reruns resume)")
    add("--seed", type=int, default=0)
    add("--own-answers", action="store_true", help="multi-turn: feed back the model's own answers")
    add("--recompress", action="store_true", help="compress at every turn, not only the first prefill")
    add("--max-turns", type=int, default=None)
    add("--format", default="chat", choices=["chat", "plain"], help="prompt format")
    add("--data", default=None, metavar="DIR",
        help="SCBench's released rows (scbench_*.jsonl/.parquet in DIR, or 'hub') instead of generated")
    add("--max-length", type=int, default=None, metavar="TOKENS",
        help="cut longer contexts to TOKENS tokens from the middle (as SCBench)")
    add("--no-progress", action="store_true")
    add("--store", default=None, metavar="URLS",
        help="reuse stored prefills: tiers fastest first, e.g. memory,disk:DIR,redis://H:P,http://H:P")
    add("--store-encoding", default="raw",
        help="raw | fp16 | int8 | int8+zstd | lmcache | kvlife:LEVEL[+profile[=FILE]]")
    add("--store-chunk", type=int, default=256, help="tokens per stored chunk")
    add("--backend", default="local", choices=["local", "openai"],
        help="local: kvlife's Session in this process; openai: an OpenAI-compatible server (vLLM, SGLang, "
             "llama.cpp) at --base-url, see docs/backends.md")
    add("--base-url", default=None, metavar="URL", help="the server, e.g. http://127.0.0.1:8000/v1")
    add("--api-key", default=None, help="bearer token for the server (default: $OPENAI_API_KEY)")
    add("--concurrency", type=int, default=1, metavar="N", help="openai: samples in flight at once")
    add("--timeout", type=float, default=600.0, metavar="S",
        help="openai: seconds to wait for the server (connect, first token, each chunk)")
    add("--retries", type=int, default=3, metavar="N",
        help="openai: retries of a failed request (connection errors, timeouts, 429, 5xx), "
             "backoff 0.5 s x 2^n")
    bench.set_defaults(func=cmd_bench)


def _add_listings(sub) -> None:
    methods = sub.add_parser("methods", help="list methods with stage, parameters, defaults and paper")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(func=cmd_methods)
    models = sub.add_parser("models", help="list or pull the embedded models",
                            description="`kvlife models` lists; `kvlife models pull NAME` installs one.")
    models.add_argument("action", nargs="?", default="list", choices=["list", "pull"])
    models.add_argument("names", nargs="*")
    models.set_defaults(func=cmd_models)
    sub.add_parser("tasks", help="list benchmark tasks and their profiles").set_defaults(func=cmd_tasks)
    report = sub.add_parser("report", help="summarize run directories (tables; --out writes HTML)")
    report.add_argument("runs", nargs="+", help="run directories")
    report.add_argument("--out", default=None, help="write an HTML report here")
    report.set_defaults(func=cmd_report)


LIBRARY_BARS = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")  # transformers' own bars; tqdm's (GGUF)


def quiet_libraries(verbose: bool) -> None:
    """transformers' "Loading weights" bars and the GGUF conversion's bars stay out of normal output.

    Both libraries read these variables when they are imported, which the commands do later."""
    if verbose:
        for name in LIBRARY_BARS:
            os.environ.pop(name, None)
    else:
        for name in LIBRARY_BARS:
            os.environ.setdefault(name, "1")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_libraries("--verbose" in argv)
    argv = [arg for arg in argv if arg != "--verbose"]
    if argv[:1] == ["serve"] or argv[:2] == ["stream", "serve"]:
        # a chunk server needs neither torch nor a model: its own parser, not the whole CLI's imports
        from kvlife.store.server import main as serve_main

        return serve_main(argv[1:] if argv[0] == "serve" else argv[2:], stream_alias=argv[0] == "stream")
    parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), None))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KvlifeError as exc:
        print(f"kvlife: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("kvlife: interrupted (results written so far are kept; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
