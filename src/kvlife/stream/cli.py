"""`kvlife fetch` and `kvlife stream serve|put|ls|link`: streamed contexts from the command line.

    kvlife stream serve --root /srv/kvstream --trace step:40mbit,4mbit,1.5 [--token T]   # = kvlife serve
    kvlife stream put http://127.0.0.1:8766 --context-id doc-1 --text doc.txt [--levels high,balanced]
    kvlife fetch http://127.0.0.1:8766 --context-id doc-1 --slo 2 [--ask "Who wrote it?"] [--out c.st]
    kvlife stream put URL --context-id doc-2 --text doc.txt --method "kvzip(ratio=0.25)"   # in pieces
    kvlife fetch URL --context-id doc-2 --slo 1 --ask "Who wrote it?"      # [--method "kvzip(ratio=0.25)"]
    kvlife stream link http://127.0.0.1:8766 --trace constant:8mbit      # restart the server's trace
    kvlife stream ls http://127.0.0.1:8766

`kvlife stream serve` is `kvlife serve` (kvlife.store.server) with its directory as --root, port 8766 and,
without a token, open to every request. The main CLI calls `add_parser(subparsers)`; errors a user can
cause are `KvlifeError`s (one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvlife import models
from kvlife.errors import KvlifeError
from kvlife.store.serve_args import add_arguments as add_serve_arguments

# the parser is built for every kvlife command: what imports torch (the client, sessions, the codec) or
# aiohttp (the server) is imported by the command that runs


def add_parser(subparsers) -> None:
    """Register `fetch` and `stream` on the main CLI's subparsers."""
    _add_fetch(subparsers)
    _add_stream(subparsers)


def _add_fetch(subparsers) -> None:
    fetch = subparsers.add_parser("fetch", help="stream a context's KV cache by a deadline (adaptive levels)",
                                  description="Fetch a context's KV from `kvlife serve`, choosing per chunk "
                                              "the best codec level that meets the deadline, or recomputing; "
                                              "a compressed context (`kvlife stream put --method`) piece by "
                                              "piece, into a session of its recipe.")
    fetch.add_argument("url", help="server, e.g. http://127.0.0.1:8766")
    fetch.add_argument("--context-id", required=True)
    fetch.add_argument("--slo", type=float, required=True, help="seconds the whole context may take")
    fetch.add_argument("--policy", default="adaptive",
                       help="adaptive | recompute (a compressed context: recompress it locally) | a level "
                            "name (fixed)")
    fetch.add_argument("--model", default=None, help="model for recomputing chunks (default: the context's)")
    fetch.add_argument("--method", default=None,
                       help="the recipe a compressed context must have been compressed by (default: the "
                            "context's own); another recipe is refused")
    fetch.add_argument(
        "--no-model", action="store_true", help="fetch every chunk; never load a model or recompute"
    )
    fetch.add_argument("--margin", type=float, default=0.05, help="fraction of the deadline kept in reserve")
    fetch.add_argument("--attempts", type=int, default=2, help="fetches of a chunk before it is recomputed")
    fetch.add_argument("--drop-factor", type=float, default=2.0,
                       help="bandwidth drop a fetched chunk must survive (1: plan on the estimate alone)")
    fetch.add_argument(
        "--discount",
        default="wide",
        help="plan a level at the predicted throughput divided by this: a number >= 1 for every "
        "level (1: none), or 'wide' (default): by the level's size step over the next cheaper "
        "level where that is 2x or more (lossless-ish over high)",
    )
    fetch.add_argument(
        "--refine-discount",
        default="1",
        help="the same for refinement (default 1: none, as a refinement that would end late is given up)",
    )
    fetch.add_argument(
        "--no-refine",
        action="store_true",
        help="hand the cache over as soon as every chunk is in; by default the time left before the "
        "deadline goes to fetching the worst chunks again at a better level",
    )
    fetch.add_argument("--out", type=Path, default=None, help="save the cache (Session.load reads it)")
    fetch.add_argument(
        "--ask", action="append", default=[], help="answer a query on the fetched context (repeatable)"
    )
    fetch.add_argument("--max-new-tokens", type=int, default=64)
    fetch.add_argument("--token", default=None, help="bearer token (default $KVLIFE_STREAM_TOKEN)")
    fetch.add_argument("--json", action="store_true", help="print the report as JSON")
    fetch.set_defaults(func=run_fetch)


def _add_stream(subparsers) -> None:
    stream = subparsers.add_parser(
        "stream", help="serve, store and inspect streamed contexts (see `kvlife fetch`)"
    )
    actions = stream.add_subparsers(dest="stream_action", required=True)
    serve = actions.add_parser(
        "serve",
        help="`kvlife serve` for streamed contexts: --root DIR, port 8766, open "
        "without a token, optionally throttled by a bandwidth trace",
    )
    add_serve_arguments(serve, stream=True)
    serve.set_defaults(func=run_serve)

    put = actions.add_parser("put", help="prefill a text, encode its KV at several levels, upload it")
    put.add_argument("url")
    put.add_argument("--context-id", required=True)
    put.add_argument("--text", type=Path, required=True, help="the context, a UTF-8 text file")
    put.add_argument("--model", default=None, help="registered model or HF dir (default: the default model)")
    put.add_argument("--levels", default="all",
                     help="comma-separated codec levels (default: all; a compressed context also raw)")
    put.add_argument("--chunk-tokens", type=int, default=256)
    put.add_argument("--method", default="dense",
                     help="recipe: dense (chunks) or one that compresses, e.g. \"kvzip(ratio=0.25)\" (the "
                          "compressed cache, in pieces of --layers-per-piece layers)")
    put.add_argument("--layers-per-piece", type=int, default=1,
                     help="layers per piece of a compressed context")
    put.add_argument(
        "--weights", type=Path, default=None, help="codec channel weights (`kvlife codec calibrate`)"
    )
    put.add_argument(
        "--format", default="chat", choices=["chat", "plain"], help="prompt format of the context"
    )
    put.add_argument("--token", default=None)
    put.set_defaults(func=run_put)

    listing = actions.add_parser("ls", help="list a server's contexts")
    listing.add_argument("url")
    listing.add_argument("--token", default=None)
    listing.set_defaults(func=run_ls)

    link = actions.add_parser("link", help="show a server's link, or restart its trace (--trace / --off)")
    link.add_argument("url")
    link.add_argument("--trace", default=None, help="new trace, started at t = 0")
    link.add_argument("--off", action="store_true", help="stop shaping")
    link.add_argument("--restart", action="store_true", help="restart the current trace at t = 0")
    link.add_argument("--token", default=None)
    link.set_defaults(func=run_link)


def _client(args: argparse.Namespace):
    from kvlife.stream.client import StreamClient

    return StreamClient(args.url, args.token)


def _load_model(name: str | None):
    return models.load(name or models.DEFAULT_MODEL)


def run_serve(args: argparse.Namespace) -> int:
    from kvlife.store.server import serve

    return serve(args)


def run_put(args: argparse.Namespace) -> int:
    from kvlife.recipe import parse
    from kvlife.session import Session
    from kvlife.stream.sessions import context_of

    if not args.text.is_file():
        raise KvlifeError(f"no text file at {args.text}")
    if args.chunk_tokens < 1 or args.layers_per_piece < 1:
        raise KvlifeError("--chunk-tokens and --layers-per-piece must be >= 1")
    recipe = parse(args.method)  # a bad recipe or level fails before a model is loaded
    spec = recipe.spec
    levels = None if args.levels == "all" else [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    if recipe.compress is not None:
        from kvlife.stream.pieces import check_levels

        check_levels(levels)
    weights = None
    if args.weights is not None:
        from kvlife.codec.calibrate import load_weights

        weights = load_weights(args.weights)
    client = _client(args)
    model, tokenizer = _load_model(args.model)
    session = Session(model, tokenizer, spec, mode="multi-request", prompt_format=args.format)
    session.prefill(args.text.read_text(encoding="utf-8", errors="replace"))
    name = models.model_name(args.model or models.DEFAULT_MODEL)
    context = context_of(session, args.context_id, levels, args.chunk_tokens, weights, name,
                         args.layers_per_piece)
    client.put(context)
    manifest = context.manifest
    sizes = {lv: sum(c.bytes for c in manifest.chunks[lv]) for lv in manifest.levels}
    what = f"pieces of {spec}" if session.recipe.compress is not None else "chunks"
    print(
        f"stored {args.context_id}: {len(manifest.token_ids)} tokens, {manifest.n_chunks} {what}; bytes per "
        "level: "
        + ", ".join(f"{lv} {size / 1e6:.2f} MB" for lv, size in sizes.items())
    )
    return 0


def run_ls(args: argparse.Namespace) -> int:
    print("\n".join(_client(args).contexts()))
    return 0


def run_link(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.trace or args.off:
        state = client.set_trace(None if args.off else args.trace)
    elif args.restart:
        state = client.transport.request_json("POST", "/v1/link", {})
    else:
        state = client.transport.request_json("GET", "/v1/link")
    print(json.dumps(state))
    return 0


def _discount(text: str, flag: str = "--discount") -> float | str:
    from kvlife.stream.config import parse_discount

    try:
        return parse_discount(text)
    except ValueError as exc:
        raise KvlifeError(f"{flag} {exc}") from None


def _config(args: argparse.Namespace) -> Any:
    from kvlife.stream.config import FetchConfig

    if args.attempts < 1 or not 0 <= args.margin < 1 or not args.drop_factor >= 1:
        raise KvlifeError("--attempts must be >= 1, --margin in [0, 1) and --drop-factor >= 1")
    return FetchConfig(margin=args.margin, max_attempts=args.attempts, drop_factor=args.drop_factor,
                       discount=_discount(args.discount), refine=not args.no_refine,
                       refine_discount=_discount(args.refine_discount, "--refine-discount"))


def run_fetch(args: argparse.Namespace) -> int:
    if not args.slo > 0:
        raise KvlifeError(f"--slo must be > 0 seconds, not {args.slo}")
    config = _config(args)
    if args.no_model and (args.ask or args.policy == "recompute"):
        raise KvlifeError("--ask and --policy recompute need the model; drop --no-model")
    client = _client(args)
    manifest = client.manifest(args.context_id)
    if args.policy not in ("adaptive", "recompute", *manifest.levels):
        raise KvlifeError(
            f"unknown policy {args.policy!r}: adaptive, recompute or one of the context's levels "
            f"({', '.join(manifest.levels)})"
        )
    spec = _fetch_recipe(args, manifest)
    model = tokenizer = None
    if not args.no_model:
        model, tokenizer = _load_model(args.model or manifest.model or None)
    if spec != "dense" and args.no_model:  # a compressed context's pieces, with nothing to answer on
        _, report = client.fetch_pieces(args.context_id, args.slo, args.policy, config)
        cache = None
    elif args.ask or spec != "dense":
        from kvlife.session import Session
        from kvlife.stream.sessions import fetch_into

        prompt_format = manifest.extra.get("prompt_format", "chat") if spec != "dense" else "chat"
        session = Session(model, tokenizer, spec, mode="multi-request", prompt_format=prompt_format)
        report = fetch_into(session, client, args.context_id, args.slo, args.policy, config=config)
        cache = session.cache
    else:
        cache, report = client.fetch(
            args.context_id, args.slo, model=model, policy=args.policy, config=config
        )
    if args.out is not None:
        _save(cache, args.out, manifest, report, model)
    answers = []
    for query in args.ask:
        turn = session.ask(query, max_new_tokens=args.max_new_tokens)
        answers.append(
            {"query": query, "answer": turn.prediction, "ttft_s": round(report.ready_s + turn.ttft_s, 4)}
        )
    if args.json:
        print(json.dumps({**report.to_dict(), "answers": answers}, indent=2))
    else:
        _print_report(report, answers)
    return 0


def _fetch_recipe(args: argparse.Namespace, manifest: Any) -> str:
    """The recipe of the session a fetched context goes to: "dense" for a dense prefill, the recipe a
    compressed context was compressed by (`--method` must name it, if given)."""
    from kvlife.recipe import parse
    from kvlife.stream.pieces import PieceManifest

    spec = parse(args.method).spec if args.method is not None else None
    if not isinstance(manifest, PieceManifest):
        if spec is not None and spec != "dense":
            raise KvlifeError(f"context {manifest.context_id!r} is a dense prefill, not a cache compressed "
                              f"by {spec}")
        return "dense"
    if spec is not None and spec != manifest.spec:
        raise KvlifeError(f"context {manifest.context_id!r} holds a cache compressed by {manifest.spec}, "
                          f"not by {spec}: a compressed cache is never served to another recipe")
    if args.out is not None:
        raise KvlifeError("--out saves a dense prefill's cache; a compressed context is answered on with "
                          "--ask")
    return manifest.spec


def _save(cache: Any, out: Path, manifest: Any, report: Any, model: Any) -> None:
    """The fetched cache as `Session.load` reads it."""
    meta = {"recipe": "dense", "context_ids": manifest.token_ids, "stream": report.options()}
    if model is not None:
        meta["model_fingerprint"] = models.model_fingerprint(model)
    try:
        cache.save(out, meta)
    except OSError as exc:
        raise KvlifeError(f"cannot write {out}: {exc.strerror or exc}") from None


def _print_report(report: Any, answers: list[dict]) -> None:
    table = Table(
        title=f"{report.context_id}: {report.tokens} tokens, policy {report.policy}, slo {report.slo:g} s"
    )
    for column in ("chunk", "option", "bytes", "fetch s", "MB/s", "work s", "ready at s", "failures"):
        table.add_column(column, justify="left" if column in ("option", "failures") else "right")
    for c in report.chunks:
        rate = f"{c.throughput / 1e6:.2f}" if c.throughput else "-"
        option = f"{c.option} (was {c.planned[-1]})" if c.refined else c.option
        table.add_row(str(c.index), option, f"{c.bytes:,}", f"{c.fetch_s:.3f}", rate, f"{c.work_s:.3f}",
                      f"{c.ready_at_s:.3f}", str(len(c.failures)) if c.failures else "")
    console = Console()
    console.print(table)
    verdict = "met" if report.met else "MISSED"
    console.print(
        f"ready in {report.ready_s:.3f} s ({verdict} the {report.slo:g} s deadline), {report.bytes:,} bytes"
    )
    refined = sum(len(c.refined) for c in report.chunks)
    if refined:
        console.print(
            f"every chunk was in at {report.complete_s:.3f} s; {refined} fetched again at a better level "
            "before the deadline (--no-refine: hand over at once)"
        )
    if report.refine_stopped:
        console.print(f"refining stopped: {report.refine_stopped}")
    if report.recompressed:
        console.print(f"recompressed locally ({report.recompressed})")
    for answer in answers:
        console.print(
            f"{answer['query']!r} -> {answer['answer']!r} (time to first token {answer['ttft_s']:.3f} s)"
        )
