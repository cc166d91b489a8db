"""The server's side of streamed contexts: one directory per context, every level's chunks as files.

    ROOT/CONTEXT_ID/manifest.json
    ROOT/CONTEXT_ID/header
    ROOT/CONTEXT_ID/LEVEL/I

An upload (`put_bundle`) is read piece by piece, each piece checked against the manifest's size and
SHA-256 as it arrives, written into a fresh temporary directory and renamed into place only when
complete: readers see the old context or the new one, never half of one, and a client that dies
mid-upload leaves at most a `.tmp-*` directory (removed when the store opens). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from kvlife.stream.context import MAX_MANIFEST_BYTES, Manifest, StreamError, check_context_id

ReadExactly = Callable[[int], Awaitable[bytes]]


class ContextStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StreamError(f"cannot create {self.root}: {exc.strerror or exc}") from None
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def path(self, context_id: str) -> Path:
        return self.root / check_context_id(context_id)

    def contexts(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "manifest.json").is_file())

    def manifest_bytes(self, context_id: str) -> bytes | None:
        try:
            return (self.path(context_id) / "manifest.json").read_bytes()
        except FileNotFoundError:
            return None

    def object_path(self, context_id: str, name: str) -> Path:
        """`header` or `LEVEL/I` of a context (the caller checks the names against the manifest)."""
        return self.path(context_id) / name

    async def put_bundle(self, context_id: str, read_exactly: ReadExactly) -> Manifest:
        """Store an upload made of `context.bundle_parts`; raises StreamError if any piece is wrong."""
        check_context_id(context_id)
        (length,) = struct.unpack("<I", await read_exactly(4))
        if length > MAX_MANIFEST_BYTES:
            raise StreamError(f"manifest of {length} bytes is too large")
        try:
            manifest = Manifest.from_json(json.loads(await read_exactly(length)))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StreamError(f"manifest is not JSON: {exc}") from None
        if manifest.context_id != context_id:
            raise StreamError(f"the manifest names context {manifest.context_id!r}, uploaded as {context_id!r}")
        tmp = self.root / f".tmp-{context_id}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            header = await read_exactly(manifest.header_bytes)
            if hashlib.sha256(header).hexdigest() != manifest.header_sha256:
                raise StreamError("the header does not match the manifest's SHA-256")
            (tmp / "header").write_bytes(header)
            for level in manifest.levels:
                (tmp / level).mkdir()
                for index, info in enumerate(manifest.chunks[level]):
                    part = await read_exactly(info.bytes)
                    if hashlib.sha256(part).hexdigest() != info.sha256:
                        raise StreamError(f"chunk {level}/{index} does not match the manifest's SHA-256")
                    (tmp / level / str(index)).write_bytes(part)
            (tmp / "manifest.json").write_text(json.dumps(manifest.to_json(), separators=(",", ":")))
            target = self.path(context_id)
            old = None
            if target.exists():
                old = self.root / f".tmp-old-{context_id}-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def delete(self, context_id: str) -> bool:
        target = self.path(context_id)
        if not target.exists():
            return False
        trash = self.root / f".tmp-del-{context_id}-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True
