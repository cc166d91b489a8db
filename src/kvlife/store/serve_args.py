"""`kvlife serve` options, apart from the server so that building the CLI parser imports no aiohttp."""

from __future__ import annotations

import argparse

TOKENS_ENV = "KVLIFE_SERVE_TOKENS"  # "tenant=token,tenant=token"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="directory that holds the chunks (one subdirectory per tenant)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", action="append", default=[], help="bearer token of the 'default' tenant")
    parser.add_argument("--tenant", action="append", default=[], metavar="NAME=TOKEN",
                        help=f"a tenant and its token (repeatable; also ${TOKENS_ENV}='a=t1,b=t2')")
    parser.add_argument("--max-bytes", type=float, default=64e9, help="disk budget per tenant (bytes)")
    parser.add_argument("--max-chunk-bytes", type=float, default=512e6, help="largest accepted chunk (bytes)")
