"""Disk tier: one file per chunk, written atomically, with a size budget (LRU by modification time).

A put writes a temporary file in the chunk's directory, fsyncs it, renames it over the final name
and fsyncs the directory, so readers see either no chunk or a whole one, and a writer killed at
any point leaves at most a stray `.tmp` file (never read; removed when old). Reads refresh the
file's mtime, which is the LRU order eviction follows. Several processes may share a directory.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvlife.store.base import Backend, StoreUnavailable, check_key

SUFFIX = ".kvc"
STALE_TMP_S = 600


class DiskBackend(Backend):
    def __init__(self, root: str | Path, max_bytes: int = 64 << 30) -> None:
        self.root = Path(root).expanduser()
        self.name = f"disk({self.root})"
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.evictions = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create store directory {self.root}: {exc.strerror or exc}") from None
        self.bytes_held = self._scan(clean=True)[1]

    def path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / (key + SUFFIX)

    def _scan(self, clean: bool = False) -> tuple[list[tuple[float, int, Path]], int]:
        files, total, now = [], 0, time.time()
        for sub in self.root.iterdir() if self.root.is_dir() else []:
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                try:
                    info = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.endswith(".tmp"):
                    if clean and now - info.st_mtime > STALE_TMP_S:
                        remove_file(Path(entry.path))
                    continue
                if entry.name.endswith(SUFFIX):
                    files.append((info.st_mtime, info.st_size, Path(entry.path)))
                    total += info.st_size
        return files, total

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out = []
        for key in keys:
            path = self.path(key)
            try:
                with open(path, "rb") as handle:
                    out.append(handle.read())
            except FileNotFoundError:
                out.append(None)
                continue
            except OSError as exc:
                raise StoreUnavailable(f"{self.name}: cannot read {path.name}: {exc.strerror or exc}") from None
            try:
                os.utime(path)
            except OSError:
                pass
        return out

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.path(key).is_file() for key in keys]

    def put(self, key: str, blob: bytes) -> None:
        self.put_parts(key, [blob])

    def put_parts(self, key: str, parts: Sequence[bytes]) -> None:
        """Write the concatenation of `parts` as chunk `key`, atomically."""
        path = self.path(key)
        size = sum(len(p) for p in parts)
        try:
            write_atomic(path, parts)
        except OSError as exc:
            full = " (disk full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise StoreUnavailable(f"{self.name}: cannot write a chunk{full}: {exc.strerror or exc}") from None
        with self.lock:
            self.bytes_held += size
            over = self.bytes_held > self.max_bytes
        if over:
            self._evict()

    def _evict(self) -> None:
        with self.lock:
            files, total = self._scan()
            files.sort()
            target = int(self.max_bytes * 0.9)
            for _, size, path in files:
                if total <= target:
                    break
                if remove_file(path):
                    total -= size
                    self.evictions += 1
            self.bytes_held = total

    def delete(self, key: str) -> None:
        remove_file(self.path(key))

    def stats(self) -> dict[str, Any]:
        files, total = self._scan()
        return {"chunks": len(files), "bytes": total, "max_bytes": self.max_bytes, "evictions": self.evictions}


def write_atomic(path: Path, parts: Sequence[bytes]) -> None:
    """Write the concatenation of `parts` to `path` so that readers see no file or the whole one: a temporary
    file in the same directory, fsynced, renamed over `path`, the directory fsynced. Raises OSError (and
    leaves no temporary file) if any step fails."""
    tmp = path.with_name(f".{path.name[:16]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        remove_file(tmp)
        raise
    _fsync_dir(path.parent)


def remove_file(path: Path) -> bool:
    """Remove `path` if it is there; True if it was removed."""
    try:
        path.unlink()
        return True
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
