"""Disk tier: one file per chunk, written atomically, with a size budget (LRU by modification time).

A put writes a temporary file in the chunk's directory, fsyncs it, renames it over the final name
and fsyncs the directory, so readers see either no chunk or a whole one, and a writer killed at
any point leaves at most a stray `.tmp` file, never read. Temporary files count against the byte
budget, and eviction (like opening the directory) removes those whose writer is gone: a process of
this machine that no longer runs (the name holds the writer's host and pid), or older than
`STALE_TMP_S`. A backend rescans its directory at least every `RESCAN_S` while it writes, so a
long-running server also sees what other processes left. Reads refresh the file's mtime, which is
the LRU order eviction follows. Several processes may share a directory.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvlife.store.base import Backend, StoreUnavailable, check_key

SUFFIX = ".kvc"
STALE_TMP_S = 600  # a temporary file this old is removed whoever wrote it (e.g. a writer on another host)
RESCAN_S = 60.0  # a writing backend rescans its directory this often (other processes' files)
HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"  # names this machine in temporary files


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
            raise StoreUnavailable(f"cannot create store directory {self.root}: "
                                   f"{exc.strerror or exc}") from None
        self.scanned_at = 0.0
        self.bytes_held = self._scan(clean=True)[1]

    def path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / (key + SUFFIX)

    def _scan(self, clean: bool = False) -> tuple[list[tuple[float, int, Path]], int]:
        """(chunk files as (mtime, size, path), bytes held by chunks and temporary files); `clean`
        removes the temporary files whose writer is gone first (they are not counted then)."""
        files, total, now = [], 0, time.time()
        self.scanned_at = time.monotonic()
        for sub in self.root.iterdir() if self.root.is_dir() else []:
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                try:
                    info = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.endswith(".tmp"):
                    gone = clean and _writer_gone(entry.name, now - info.st_mtime)
                    if not (gone and remove_file(Path(entry.path))):
                        total += info.st_size  # a write in progress, or a leftover not yet removable
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
                raise StoreUnavailable(f"{self.name}: cannot read {path.name}: "
                                       f"{exc.strerror or exc}") from None
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
            raise StoreUnavailable(f"{self.name}: cannot write a chunk{full}: "
                                   f"{exc.strerror or exc}") from None
        with self.lock:
            self.bytes_held += size
            over = self.bytes_held > self.max_bytes
        if over or time.monotonic() - self.scanned_at > RESCAN_S:
            self._evict(only_if_over=not over)

    def _evict(self, only_if_over: bool = False) -> None:
        """Rescan: remove temporary files whose writer is gone, then the least recently used chunks until
        chunks and temporary files fit in 90% of the budget (`only_if_over`: only if they are over it)."""
        with self.lock:
            files, total = self._scan(clean=True)
            if only_if_over and total <= self.max_bytes:
                self.bytes_held = total
                return
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
        """Chunks, and bytes held by chunks and temporary files (what the budget counts)."""
        files, total = self._scan()
        return {"chunks": len(files), "bytes": total, "max_bytes": self.max_bytes,
                "evictions": self.evictions}


def write_atomic(path: Path, parts: Sequence[bytes]) -> None:
    """Write the concatenation of `parts` to `path` so that readers see no file or the whole one: a temporary
    file in the same directory, fsynced, renamed over `path`, the directory fsynced. Raises OSError (and
    leaves no temporary file) if any step fails."""
    tmp = path.with_name(f".{path.name[:16]}.{uuid.uuid4().hex[:8]}.{HOST}-{os.getpid()}.tmp")
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


def _writer_gone(name: str, age_s: float) -> bool:
    """Whether the temporary file `name` (`.NAME.RANDOM.HOST-PID.tmp`) is a leftover: older than
    `STALE_TMP_S`, or written by a process of this machine that is no longer running."""
    if age_s > STALE_TMP_S:
        return True
    host, _, pid = name[: -len(".tmp")].rpartition(".")[2].partition("-")
    if host != HOST or not pid.isdigit():
        return False  # another machine's writer (or an older name): only its age tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False  # someone else's running process
    return False


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
