"""Options of `kvlife serve` and of its alias `kvlife stream serve`, apart from the server so that building
the CLI parser imports no aiohttp (and `kvlife serve` itself imports no torch)."""

from __future__ import annotations

import argparse

TOKENS_ENV = "KVLIFE_SERVE_TOKENS"  # "tenant=token,tenant=token"
STREAM_TOKEN_ENV = "KVLIFE_STREAM_TOKEN"  # `kvlife stream serve`'s token, as the stream client reads it


def add_arguments(parser: argparse.ArgumentParser, stream: bool = False) -> None:
    """`kvlife serve`'s options; with `stream`, `kvlife stream serve`'s: the same server, its directory given
    as --root, port 8766, its token also from $KVLIFE_STREAM_TOKEN, and open to every request without one."""
    if stream:
        parser.add_argument("--root", dest="store", metavar="DIR", required=True,
                            help="directory of the served chunks and contexts (one subdirectory per tenant)")
    else:
        parser.add_argument("--store", required=True,
                            help="directory that holds the chunks (one subdirectory per tenant)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766 if stream else 8765)
    token_help = "bearer token of the 'default' tenant"
    if stream:
        token_help += f" (default ${STREAM_TOKEN_ENV}; none: open to every request)"
    parser.add_argument("--token", action="append", default=[], help=token_help)
    parser.add_argument("--tenant", action="append", default=[], metavar="NAME=TOKEN",
                        help=f"a tenant and its token (repeatable; also ${TOKENS_ENV}='a=t1,b=t2')")
    parser.add_argument("--max-bytes", type=float, default=64e9, help="disk budget per tenant (bytes)")
    parser.add_argument("--max-chunk-bytes", type=float, default=512e6, help="largest accepted chunk (bytes)")
    parser.add_argument("--trace", default=None,
                        help="shape the send rate of every response body by a bandwidth trace: "
                             "constant:40mbit | step:40mbit,4mbit,1.5 | walk:20mbit[,seed=0] | file:PATH "
                             "(POST /v1/link restarts it)")
    parser.add_argument("--piece-bytes", type=int, default=16 << 10,
                        help="bytes per shaped write (with --trace)")
    parser.set_defaults(stream_alias=stream)
