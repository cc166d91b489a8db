"""`kvlife serve`: an HTTP chunk store (aiohttp) over disk tiers, one directory per tenant.

Endpoints (all but /v1/health need `Authorization: Bearer TOKEN`; the token names the tenant):

    GET    /v1/health               {"ok": true}
    GET    /v1/stats                the tenant's chunks, bytes, budget, evictions
    POST   /v1/exists               {"keys": [hex, ...]} -> {"exists": [bool, ...]}
    PUT    /v1/chunks/{key}         body: a sealed chunk (envelope checked before it is stored)
    GET    /v1/chunks/{key}         the chunk, streamed from its file; 404 if absent
    DELETE /v1/chunks/{key}

Tenants never share a directory, so no key, however guessed, reads another tenant's chunk.
Uploads are read in pieces, refused past `max_chunk_bytes` (413), verified (key, length,
SHA-256) and only then renamed into place: a client that dies mid-upload stores nothing.
Errors are JSON `{"error": "..."}` with 400 (malformed), 401 (token), 404, 413.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import sys
from pathlib import Path

from aiohttp import web

from kvlife.store.base import KEY_PATTERN, ChunkCorrupt, StoreError, StoreUnavailable
from kvlife.store.disk import DiskBackend
from kvlife.store.envelope import HEADER, check_header
from kvlife.store.serve_args import TOKENS_ENV, add_arguments

MAX_EXISTS_KEYS = 65536
READ_PIECE = 1 << 20


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class ChunkServer:
    def __init__(self, root: Path, tokens: dict[str, str], max_bytes: int, max_chunk_bytes: int) -> None:
        if not tokens:
            raise StoreError("kvlife serve needs at least one token: --token TOKEN or --tenant NAME=TOKEN")
        for tenant in tokens.values():
            if not tenant or not all(c.isalnum() or c in "-_." for c in tenant) or tenant.startswith("."):
                raise StoreError(f"invalid tenant name {tenant!r}: use letters, digits, '-', '_' and '.'")
        self.root = root
        self.tokens = tokens  # token -> tenant
        self.max_bytes = max_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.tenants: dict[str, DiskBackend] = {}

    def tenant_store(self, request: web.Request) -> DiskBackend | web.Response:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return _error(401, "missing bearer token: send 'Authorization: Bearer TOKEN'")
        given = header[len("Bearer "):].strip().encode()
        tenant = None
        for token, name in self.tokens.items():
            if hmac.compare_digest(given, token.encode()):
                tenant = name
        if tenant is None:
            return _error(401, "wrong token")
        if tenant not in self.tenants:
            self.tenants[tenant] = DiskBackend(self.root / "tenants" / tenant, self.max_bytes)
        return self.tenants[tenant]

    @staticmethod
    def chunk_key(request: web.Request) -> str | web.Response:
        key = request.match_info["key"]
        if not KEY_PATTERN.match(key):
            return _error(400, f"invalid chunk key {key[:80]!r}: expected 64 lowercase hex digits")
        return key

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        store = self.tenant_store(request)
        if isinstance(store, web.Response):
            return store
        stats = await asyncio.get_running_loop().run_in_executor(None, store.stats)
        return web.json_response({**stats, "max_chunk_bytes": self.max_chunk_bytes})

    async def exists(self, request: web.Request) -> web.Response:
        store = self.tenant_store(request)
        if isinstance(store, web.Response):
            return store
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, web.HTTPRequestEntityTooLarge):
            return _error(400, 'malformed JSON: expected {"keys": ["<64 hex>", ...]}')
        keys = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(keys, list) or len(keys) > MAX_EXISTS_KEYS:
            return _error(400, f'expected {{"keys": [...]}} with at most {MAX_EXISTS_KEYS} keys')
        if not all(isinstance(k, str) and KEY_PATTERN.match(k) for k in keys):
            return _error(400, "every key must be 64 lowercase hex digits")
        return web.json_response({"exists": store.exists_many(keys)})

    async def get(self, request: web.Request) -> web.StreamResponse:
        store = self.tenant_store(request)
        if isinstance(store, web.Response):
            return store
        key = self.chunk_key(request)
        if isinstance(key, web.Response):
            return key
        try:
            handle = open(store.path(key), "rb")  # an open handle survives a concurrent replace
        except FileNotFoundError:
            return _error(404, "no such chunk")
        try:
            size = os.fstat(handle.fileno()).st_size
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = size
            await response.prepare(request)
            loop = asyncio.get_running_loop()
            while True:
                piece = await loop.run_in_executor(None, handle.read, 4 * READ_PIECE)
                if not piece:
                    break
                await response.write(piece)
            await response.write_eof()
            return response
        finally:
            handle.close()

    async def put(self, request: web.Request) -> web.Response:
        store = self.tenant_store(request)
        if isinstance(store, web.Response):
            return store
        key = self.chunk_key(request)
        if isinstance(key, web.Response):
            return key
        if request.content_length is not None and request.content_length > self.max_chunk_bytes:
            return _error(413, f"chunk of {request.content_length} bytes exceeds the limit of {self.max_chunk_bytes}")
        parts, size, digest, header = [], 0, hashlib.sha256(), b""
        async for piece in request.content.iter_chunked(READ_PIECE):
            size += len(piece)
            if size > self.max_chunk_bytes:
                return _error(413, f"chunk exceeds the limit of {self.max_chunk_bytes} bytes")
            if len(header) < HEADER.size:
                take = HEADER.size - len(header)
                header += piece[:take]
                piece = piece[take:]
            digest.update(piece)
            parts.append(piece)
        try:
            length, expected = check_header(key, header)
        except ChunkCorrupt as exc:
            return _error(400, f"not a sealed chunk for this key: {exc}")
        if size - HEADER.size != length or digest.digest() != expected:
            return _error(400, "chunk body is truncated or fails its checksum")
        try:
            await asyncio.get_running_loop().run_in_executor(None, store.put_parts, key, [header, *parts])
        except StoreUnavailable as exc:
            return _error(507, str(exc))
        return web.json_response({"stored": size}, status=201)

    async def delete(self, request: web.Request) -> web.Response:
        store = self.tenant_store(request)
        if isinstance(store, web.Response):
            return store
        key = self.chunk_key(request)
        if isinstance(key, web.Response):
            return key
        store.delete(key)
        return web.json_response({"deleted": key})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)  # JSON bodies; chunk uploads are read in pieces
        app.add_routes([
            web.get("/v1/health", self.health),
            web.get("/v1/stats", self.stats),
            web.post("/v1/exists", self.exists),
            web.get("/v1/chunks/{key}", self.get),
            web.put("/v1/chunks/{key}", self.put),
            web.delete("/v1/chunks/{key}", self.delete),
        ])
        return app


def parse_tokens(tokens: list[str], tenants: list[str]) -> dict[str, str]:
    """token -> tenant from --token (tenant "default"), --tenant NAME=TOKEN and $KVLIFE_SERVE_TOKENS."""
    out = {token: "default" for token in tokens}
    env = [item for item in os.environ.get(TOKENS_ENV, "").split(",") if item.strip()]
    for item in [*tenants, *env]:
        name, sep, token = item.partition("=")
        if not sep or not name or not token:
            raise StoreError(f"bad tenant {item!r}: expected NAME=TOKEN")
        if token in out and out[token] != name:
            raise StoreError(f"one token is given to two tenants ({out[token]}, {name})")
        out[token] = name
    return out


def serve(args: argparse.Namespace) -> int:
    server = ChunkServer(Path(args.store).expanduser(), parse_tokens(args.token, args.tenant), int(args.max_bytes),
                         int(args.max_chunk_bytes))
    print(f"kvlife serve: {args.store} on http://{args.host}:{args.port} "
          f"({len(set(server.tokens.values()))} tenant(s))", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvlife serve", description="Serve a kvlife chunk store over HTTP.")
    add_arguments(parser)
    try:
        return serve(parser.parse_args(argv))
    except StoreError as exc:
        print(f"kvlife: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
