"""`kvlife stream serve`: streamed contexts over HTTP (aiohttp), every byte sent through a trace-shaped link.

    GET    /v1/health                                 {"ok": true} (no token)
    GET    /v1/contexts                               {"contexts": [ids]}
    PUT    /v1/contexts/{id}                          body: an upload bundle (context.bundle_parts)
    GET    /v1/contexts/{id}/manifest                 the manifest (JSON)
    GET    /v1/contexts/{id}/header                   the codec header shared by every level
    GET    /v1/contexts/{id}/chunks/{level}/{index}   one chunk at one level
    DELETE /v1/contexts/{id}
    GET    /v1/link                                   the shaper: trace, trace time, bytes sent
    POST   /v1/link {"trace": SPEC or null}           restart the trace at t = 0 (and switch traces)

With `--trace`, every GET body goes through one `Shaper`: the send rate really follows the trace
(constant, step drop, random walk, file), shared by concurrent responses as a link would be.
With `--token` (or $KVLIFE_STREAM_TOKEN) every endpoint but health needs `Authorization: Bearer TOKEN`.
Errors are JSON {"error": ...}: 400 malformed, 401 token, 404 absent.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import re
import struct
import sys
from pathlib import Path

from aiohttp import web

from kvlife.errors import KvlifeError
from kvlife.stream.context import CONTEXT_ID, StreamError
from kvlife.stream.serve_args import TOKEN_ENV, add_arguments
from kvlife.stream.shaper import Shaper
from kvlife.stream.store import ContextStore
from kvlife.stream.trace import parse_trace

LEVEL_NAME = re.compile(r"^[a-z][a-z-]{0,31}$")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class StreamServer:
    def __init__(self, root: str | Path, trace: str | None = None, token: str | None = None,
                 piece_bytes: int = 16 << 10) -> None:
        self.store = ContextStore(root)
        self.shaper = Shaper(parse_trace(trace) if trace else None, piece_bytes=piece_bytes)
        self.token = token

    @web.middleware
    async def auth(self, request: web.Request, handler):
        if self.token and request.path != "/v1/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return _error(401, "missing or wrong token: send 'Authorization: Bearer TOKEN'")
        return await handler(request)

    @staticmethod
    def context_id(request: web.Request) -> str | None:
        context_id = request.match_info["context_id"]
        return context_id if CONTEXT_ID.match(context_id) else None

    async def send(self, request: web.Request, data: bytes, content_type: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.content_length = len(data)
        await response.prepare(request)
        try:
            await self.shaper.write(response.write, data)
            await response.write_eof()
        except ConnectionError:
            pass  # the client gave up on this object (a deadline, an abort): nothing more to send
        return response

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def contexts(self, request: web.Request) -> web.Response:
        return web.json_response({"contexts": self.store.contexts()})

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        context_id = self.context_id(request)
        if context_id is None:
            return _error(400, "invalid context id")
        data = self.store.manifest_bytes(context_id)
        if data is None:
            return _error(404, f"no context {context_id!r}")
        return await self.send(request, data, "application/json")

    async def read_object(self, request: web.Request, name: str) -> web.StreamResponse:
        context_id = self.context_id(request)
        if context_id is None:
            return _error(400, "invalid context id")
        path = self.store.object_path(context_id, name)
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
        except (FileNotFoundError, NotADirectoryError):
            return _error(404, f"no {name} in context {context_id!r}")
        return await self.send(request, data, "application/octet-stream")

    async def header(self, request: web.Request) -> web.StreamResponse:
        return await self.read_object(request, "header")

    async def chunk(self, request: web.Request) -> web.StreamResponse:
        level, index = request.match_info["level"], request.match_info["index"]
        if not LEVEL_NAME.match(level) or not index.isdigit() or len(index) > 9:
            return _error(400, "expected /chunks/LEVEL/INDEX")
        return await self.read_object(request, f"{level}/{int(index)}")

    async def put(self, request: web.Request) -> web.Response:
        context_id = self.context_id(request)
        if context_id is None:
            return _error(400, "invalid context id")
        try:
            manifest = await self.store.put_bundle(context_id, request.content.readexactly)
        except asyncio.IncompleteReadError:
            return _error(400, "upload truncated")
        except (KvlifeError, struct.error) as exc:
            return _error(400, str(exc))
        return web.json_response({"context_id": context_id, "chunks": manifest.n_chunks,
                                  "levels": manifest.levels}, status=201)

    async def delete(self, request: web.Request) -> web.Response:
        context_id = self.context_id(request)
        if context_id is None:
            return _error(400, "invalid context id")
        if not self.store.delete(context_id):
            return _error(404, f"no context {context_id!r}")
        return web.json_response({"deleted": context_id})

    async def link(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                body = await request.json()
                spec = body.get("trace") if isinstance(body, dict) else None
                self.shaper.reset(parse_trace(spec) if spec else None, keep_trace="trace" not in body)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError):
                return _error(400, 'expected {"trace": "constant:40mbit"} (or null: unshaped)')
            except KvlifeError as exc:
                return _error(400, str(exc))
        return web.json_response(self.shaper.describe())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth], client_max_size=1 << 20)
        app.add_routes([
            web.get("/v1/health", self.health),
            web.get("/v1/contexts", self.contexts),
            web.put("/v1/contexts/{context_id}", self.put),
            web.delete("/v1/contexts/{context_id}", self.delete),
            web.get("/v1/contexts/{context_id}/manifest", self.manifest),
            web.get("/v1/contexts/{context_id}/header", self.header),
            web.get("/v1/contexts/{context_id}/chunks/{level}/{index}", self.chunk),
            web.get("/v1/link", self.link),
            web.post("/v1/link", self.link),
        ])
        return app


def serve(args: argparse.Namespace) -> int:
    if args.piece_bytes < 512:
        raise StreamError("--piece-bytes must be at least 512")
    server = StreamServer(args.root, args.trace, args.token or os.environ.get(TOKEN_ENV), args.piece_bytes)
    print(f"kvlife stream serve: {args.root} on http://{args.host}:{args.port} (trace: {args.trace or 'none'})",
          flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvlife stream serve", description="Serve streamed KV contexts over HTTP.")
    add_arguments(parser)
    try:
        return serve(parser.parse_args(argv))
    except KvlifeError as exc:
        print(f"kvlife: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
