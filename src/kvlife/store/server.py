"""`kvlife serve`: chunks and streamed contexts over HTTP (aiohttp), one directory per tenant, optionally
sent through a link shaped by a bandwidth trace. `kvlife stream serve` is the same server.

Endpoints (all but /v1/health need `Authorization: Bearer TOKEN`; the token names the tenant):

    GET    /v1/health                     {"ok": true}
    GET    /v1/stats                      the tenant's chunks, bytes, budget, evictions
    POST   /v1/exists                     {"keys": [hex, ...]} -> {"exists": [bool, ...]}
    PUT    /v1/chunks/{key}               body: a sealed chunk (envelope checked before it is stored)
    GET    /v1/chunks/{key}               the chunk, streamed from its file; 404 if absent
    DELETE /v1/chunks/{key}
    GET    /v1/contexts                   {"contexts": [id, ...]}
    PUT    /v1/contexts/{id}              {"manifest": {...}, "chunks": [key, ...]}; 409 until they are stored
    GET    /v1/contexts/{id}/manifest     the manifest (JSON)
    DELETE /v1/contexts/{id}              the context, and its chunks that no other context names
    GET    /v1/link                       the link: trace, trace time, bytes sent
    POST   /v1/link {"trace": SPEC|null}  restart the trace at t = 0, switching to SPEC ({}: the same trace)

Tenants never share a directory, so no key, however guessed, reads another tenant's chunk. Chunk uploads
are read in pieces, refused past `max_chunk_bytes` (413), verified (key, length, SHA-256) and only then
renamed into place: a client that dies mid-upload stores nothing. Every GET body of a chunk or manifest
goes through one `Shaper`, the server's link: with a trace the send rate follows it, shared by concurrent
responses. `kvlife stream serve` with no token serves every request as the tenant "default". Logs
never show a bearer token (`logs.RedactTokens`). Errors are JSON `{"error": "..."}`: 400 malformed, 401
token, 404 absent, 409 a context's chunks missing, 413 too large, 507 disk full. Imports no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from kvlife.errors import KvlifeError
from kvlife.store.base import KEY_PATTERN, ChunkCorrupt, StoreError, StoreUnavailable
from kvlife.store.contexts import CONTEXT_ID, ContextEntries
from kvlife.store.disk import DiskBackend
from kvlife.store.envelope import HEADER, check_header
from kvlife.store.logs import log_redacted
from kvlife.store.serve_args import STREAM_TOKEN_ENV, TOKENS_ENV, add_arguments
from kvlife.store.shaper import Shaper
from kvlife.store.trace import parse_trace

MAX_EXISTS_KEYS = 65536
MAX_JSON_BYTES = 16 << 20
MAX_CONTEXT_BYTES = 64 << 20  # a context's manifest and key list (a 128K-token context needs about 2 MB)
READ_PIECE = 1 << 20
DEFAULT_TENANT = "default"


class Refused(Exception):
    """A request the server answers with an error status (turned into a JSON response by `refusals`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@web.middleware
async def refusals(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except Refused as exc:
        return web.json_response({"error": exc.message}, status=exc.status)


@dataclass
class Tenant:
    chunks: DiskBackend
    contexts: ContextEntries


def _path_part(request: web.Request, name: str, pattern: re.Pattern, what: str, hint: str) -> str:
    value = request.match_info[name]
    if not pattern.match(value):
        raise Refused(400, f"invalid {what} {value[:80]!r}{hint}")
    return value


async def read_json(request: web.Request, limit: int, expected: str) -> Any:
    """The request's JSON body, at most `limit` bytes; `Refused` (400, naming `expected`; 413) otherwise.
    Nesting too deep for the parser is malformed JSON too, not a server error."""
    if request.content_length is not None and request.content_length > limit:
        raise Refused(413, f"body of {request.content_length} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for piece in request.content.iter_chunked(READ_PIECE):
        body += piece
        if len(body) > limit:
            raise Refused(413, f"body exceeds the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise Refused(400, f"malformed JSON: expected {expected}") from None


class ChunkServer:
    def __init__(self, root: Path, tokens: dict[str, str], max_bytes: int, max_chunk_bytes: int,
                 link: Shaper | None = None, open_access: bool = False) -> None:
        """`tokens`: token -> tenant; `link`: what paces every response body (default: unshaped).
        `open_access` (`kvlife stream serve` without a token): every request is the tenant "default"."""
        if not tokens and not open_access:
            raise StoreError("kvlife serve needs at least one token: --token TOKEN or --tenant NAME=TOKEN")
        for tenant in tokens.values():
            if not tenant or not all(c.isalnum() or c in "-_." for c in tenant) or tenant.startswith("."):
                raise StoreError(f"invalid tenant name {tenant!r}: use letters, digits, '-', '_' and '.'")
        self.root = root
        self.tokens = tokens
        self.open_access = open_access
        self.max_bytes = max_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.shaper = link or Shaper(None)
        self.tenants: dict[str, Tenant] = {}

    # ---- who is asking -----------------------------------------------------------------------------

    def tenant(self, request: web.Request) -> Tenant:
        name = DEFAULT_TENANT if self.open_access else self._tenant_name(request)
        if name not in self.tenants:
            directory = self.root / "tenants" / name
            self.tenants[name] = Tenant(DiskBackend(directory, self.max_bytes), ContextEntries(directory))
        return self.tenants[name]

    def _tenant_name(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise Refused(401, "missing bearer token: send 'Authorization: Bearer TOKEN'")
        given = header[len("Bearer "):].strip().encode()
        tenant = None
        for token, name in self.tokens.items():
            if hmac.compare_digest(given, token.encode()):
                tenant = name
        if tenant is None:
            raise Refused(401, "wrong token")
        return tenant

    @staticmethod
    def chunk_key(request: web.Request) -> str:
        return _path_part(request, "key", KEY_PATTERN, "chunk key", ": expected 64 lowercase hex digits")

    @staticmethod
    def context_id(request: web.Request) -> str:
        return _path_part(request, "context_id", CONTEXT_ID, "context id", "")

    # ---- chunks ------------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        stats = await asyncio.get_running_loop().run_in_executor(None, tenant.chunks.stats)
        return web.json_response({**stats, "max_chunk_bytes": self.max_chunk_bytes})

    async def exists(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        body = await read_json(request, MAX_JSON_BYTES, '{"keys": ["<64 hex>", ...]}')
        keys = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(keys, list) or len(keys) > MAX_EXISTS_KEYS:
            raise Refused(400, f'expected {{"keys": [...]}} with at most {MAX_EXISTS_KEYS} keys')
        if not all(isinstance(k, str) and KEY_PATTERN.match(k) for k in keys):
            raise Refused(400, "every key must be 64 lowercase hex digits")
        return web.json_response({"exists": tenant.chunks.exists_many(keys)})

    async def get(self, request: web.Request) -> web.StreamResponse:
        tenant = self.tenant(request)
        key = self.chunk_key(request)
        try:
            handle = open(tenant.chunks.path(key), "rb")  # an open handle survives a concurrent replace
        except FileNotFoundError:
            raise Refused(404, "no such chunk") from None
        try:
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = os.fstat(handle.fileno()).st_size
            await response.prepare(request)
            loop, sent = asyncio.get_running_loop(), 0
            while piece := await loop.run_in_executor(None, handle.read, 4 * READ_PIECE):
                await self.shaper.write(response.write, piece, continuing=sent > 0)
                sent += len(piece)
            await response.write_eof()
        except ConnectionError:
            pass  # the client gave up on the chunk (a deadline, an abandoned fetch): nothing more to send
        finally:
            handle.close()
        return response

    async def put(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        key = self.chunk_key(request)
        if request.content_length is not None and request.content_length > self.max_chunk_bytes:
            raise Refused(413, f"chunk of {request.content_length} bytes exceeds the limit of "
                               f"{self.max_chunk_bytes}")
        parts, size, digest, header = [], 0, hashlib.sha256(), b""
        async for piece in request.content.iter_chunked(READ_PIECE):
            size += len(piece)
            if size > self.max_chunk_bytes:
                raise Refused(413, f"chunk exceeds the limit of {self.max_chunk_bytes} bytes")
            if len(header) < HEADER.size:
                take = HEADER.size - len(header)
                header += piece[:take]
                piece = piece[take:]
            digest.update(piece)
            parts.append(piece)
        try:
            length, expected = check_header(key, header)
        except ChunkCorrupt as exc:
            raise Refused(400, f"not a sealed chunk for this key: {exc}") from None
        if size - HEADER.size != length or digest.digest() != expected:
            raise Refused(400, "chunk body is truncated or fails its checksum")
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, tenant.chunks.put_parts, key, [header, *parts])
        except StoreUnavailable as exc:
            raise Refused(507, str(exc)) from None
        return web.json_response({"stored": size}, status=201)

    async def delete(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        key = self.chunk_key(request)
        tenant.chunks.delete(key)
        return web.json_response({"deleted": key})

    # ---- contexts ----------------------------------------------------------------------------------

    async def contexts(self, request: web.Request) -> web.Response:
        return web.json_response({"contexts": self.tenant(request).contexts.ids()})

    async def put_context(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        context_id = self.context_id(request)
        expected = '{"manifest": {...}, "chunks": ["<64 hex>", ...]}'
        body = await read_json(request, MAX_CONTEXT_BYTES, expected)
        if not isinstance(body, dict) or not isinstance(body.get("manifest"), dict):
            raise Refused(400, f"expected {expected}")
        keys = body.get("chunks")
        if not isinstance(keys, list):
            raise Refused(400, f"expected {expected}")
        if not all(isinstance(k, str) and KEY_PATTERN.match(k) for k in keys):
            raise Refused(400, "every chunk key must be 64 lowercase hex digits")
        held = await asyncio.get_running_loop().run_in_executor(None, tenant.chunks.exists_many, keys)
        missing = len(held) - sum(held)
        if missing:
            raise Refused(409, f"{missing} of the context's {len(keys)} chunks are not stored: upload them "
                               "first (PUT /v1/chunks/KEY)")
        try:
            tenant.contexts.put(context_id, body["manifest"], keys)
        except OSError as exc:
            raise Refused(507, f"cannot store context {context_id!r}: {exc.strerror or exc}") from None
        return web.json_response({"context_id": context_id, "chunks": len(keys)}, status=201)

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        tenant = self.tenant(request)
        context_id = self.context_id(request)
        entry = tenant.contexts.get(context_id)
        if entry is None:
            raise Refused(404, f"no context {context_id!r}")
        return await self.send(request, json.dumps(entry["manifest"], separators=(",", ":")).encode())

    async def delete_context(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        context_id = self.context_id(request)
        orphans = tenant.contexts.delete(context_id)
        if orphans is None:
            raise Refused(404, f"no context {context_id!r}")
        for key in orphans:
            tenant.chunks.delete(key)
        return web.json_response({"deleted": context_id, "chunks_deleted": len(orphans)})

    async def send(self, request: web.Request, data: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(data)
        await response.prepare(request)
        try:
            await self.shaper.write(response.write, data)
            await response.write_eof()
        except ConnectionError:
            pass
        return response

    # ---- the link ----------------------------------------------------------------------------------

    async def link(self, request: web.Request) -> web.Response:
        self.tenant(request)
        if request.method == "POST":
            expected = '{"trace": "constant:40mbit"} (or null: unshaped)'
            body = await read_json(request, MAX_JSON_BYTES, expected)
            if not isinstance(body, dict) or not isinstance(body.get("trace"), (str, type(None))):
                raise Refused(400, f"expected {expected}")
            try:
                trace = parse_trace(body["trace"]) if body.get("trace") else None
            except KvlifeError as exc:
                raise Refused(400, str(exc)) from None
            self.shaper.reset(trace, keep_trace="trace" not in body)
        return web.json_response(self.shaper.describe())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[refusals], client_max_size=MAX_JSON_BYTES)
        app.add_routes([
            web.get("/v1/health", self.health),
            web.get("/v1/stats", self.stats),
            web.post("/v1/exists", self.exists),
            web.get("/v1/chunks/{key}", self.get),
            web.put("/v1/chunks/{key}", self.put),
            web.delete("/v1/chunks/{key}", self.delete),
            web.get("/v1/contexts", self.contexts),
            web.put("/v1/contexts/{context_id}", self.put_context),
            web.delete("/v1/contexts/{context_id}", self.delete_context),
            web.get("/v1/contexts/{context_id}/manifest", self.manifest),
            web.get("/v1/link", self.link),
            web.post("/v1/link", self.link),
        ])
        return app


def parse_tokens(tokens: list[str], tenants: list[str], stream_alias: bool = False) -> dict[str, str]:
    """token -> tenant from --token (tenant "default"), --tenant NAME=TOKEN and $KVLIFE_SERVE_TOKENS (and, for
    `kvlife stream serve` without --token, $KVLIFE_STREAM_TOKEN)."""
    if stream_alias and not tokens and os.environ.get(STREAM_TOKEN_ENV):
        tokens = [os.environ[STREAM_TOKEN_ENV]]
    if any(not token.strip() for token in tokens):
        raise StoreError("--token is empty: no request could authenticate with it; give a token or leave "
                         "it out")
    out = {token: DEFAULT_TENANT for token in tokens}
    env = [item for item in os.environ.get(TOKENS_ENV, "").split(",") if item.strip()]
    for item in [*tenants, *env]:
        name, sep, token = item.partition("=")
        if not sep or not name or not token.strip():
            raise StoreError(f"bad tenant {item!r}: expected NAME=TOKEN")
        if token in out and out[token] != name:
            raise StoreError(f"one token is given to two tenants ({out[token]}, {name})")
        out[token] = name
    return out


def serve(args: argparse.Namespace) -> int:
    tokens = parse_tokens(args.token, args.tenant, args.stream_alias)
    if args.piece_bytes < 512:
        raise StoreError("--piece-bytes must be at least 512")
    link = Shaper(parse_trace(args.trace) if args.trace else None, piece_bytes=args.piece_bytes)
    server = ChunkServer(Path(args.store).expanduser(), tokens, int(args.max_bytes),
                         int(args.max_chunk_bytes), link, open_access=args.stream_alias and not tokens)
    log_redacted(list(tokens))
    name = "kvlife stream serve" if args.stream_alias else "kvlife serve"
    access = "open: no token" if server.open_access else f"{len(set(tokens.values()))} tenant(s)"
    print(f"{name}: {args.store} on http://{args.host}:{args.port} ({access}; trace: {args.trace or 'none'})",
          flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def main(argv: list[str] | None = None, stream_alias: bool = False) -> int:
    """`kvlife serve` (or, with `stream_alias`, `kvlife stream serve`) from its own arguments."""
    prog = "kvlife stream serve" if stream_alias else "kvlife serve"
    parser = argparse.ArgumentParser(prog=prog, description="KV chunks and streamed contexts over HTTP.")
    add_arguments(parser, stream=stream_alias)
    try:
        return serve(parser.parse_args(argv))
    except KvlifeError as exc:
        print(f"kvlife: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
