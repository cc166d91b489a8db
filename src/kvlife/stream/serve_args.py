"""`kvlife stream serve` options, apart from the server so that building the CLI parser imports no aiohttp."""

from __future__ import annotations

import argparse

TOKEN_ENV = "KVLIFE_STREAM_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="directory of streamed contexts (one subdirectory each)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--trace", default=None,
                        help="cap the send rate: constant:40mbit | step:40mbit,4mbit,1.5 | walk:20mbit[,seed=0] | file:PATH")
    parser.add_argument("--token", default=None, help=f"bearer token (default ${TOKEN_ENV}; none: open)")
    parser.add_argument("--piece-bytes", type=int, default=16 << 10, help="bytes per shaped write")
