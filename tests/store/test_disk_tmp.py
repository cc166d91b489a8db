"""Temporary files of killed writers count against the disk tier's budget and go at the next eviction."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kvlife.store import disk
from kvlife.store.disk import DiskBackend

KEYS = [f"{i:02x}" * 32 for i in range(40)]

# a writer that stops inside its put, after its bytes are in the temporary file (before fsync and rename)
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import kvlife.store.disk as disk
    def stall(fd):
        print("writing", flush=True)
        time.sleep(120)
    disk.os.fsync = stall
    root, key, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    disk.write_atomic(root / key[:2] / (key + disk.SUFFIX), [b"x" * size])  # as DiskBackend.put_parts writes
""")


def start_writer(root, key: str, size: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(root), key, str(size)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def tmp_files(root) -> list:
    return sorted(root.rglob("*.tmp"))


def test_a_long_running_backend_removes_killed_writers_files_before_any_chunk(tmp_path, monkeypatch):
    server = DiskBackend(tmp_path, max_bytes=1_000_000)  # opened before the kills, as a long-running server
    for key in KEYS[:5]:
        server.put(key, b"y" * 150_000)
    for key in KEYS[5:8]:
        kill(start_writer(tmp_path, key, 200_000))
    assert len(tmp_files(tmp_path)) == 3 and server.stats()["bytes"] >= 1_350_000  # counted, over the budget
    server.put(KEYS[8], b"y" * 10)
    assert len(tmp_files(tmp_path)) == 3  # within RESCAN_S of its last scan, the backend has not looked
    monkeypatch.setattr(disk, "RESCAN_S", 0.0)
    server.put(KEYS[9], b"y" * 10)
    assert tmp_files(tmp_path) == []  # the rescan removed them: their writers are gone
    assert server.exists_many(KEYS[:5]) == [True] * 5 and server.evictions == 0  # and no chunk had to go
    assert server.stats()["bytes"] == server.bytes_held <= 1_000_000


def test_a_running_writers_file_is_kept_and_counted(tmp_path):
    writer = start_writer(tmp_path, KEYS[0], 400_000)
    try:
        server = DiskBackend(tmp_path, max_bytes=500_000)
        server.put(KEYS[1], b"y" * 150_000)  # over the budget with the write in progress
        assert len(tmp_files(tmp_path)) == 1  # its writer runs: kept
        assert server.stats()["bytes"] >= 400_000
        assert server.exists_many([KEYS[1]]) == [False]  # the chunk went instead, to fit the budget
    finally:
        kill(writer)
    assert DiskBackend(tmp_path).stats()["bytes"] == 0  # reopening removes the dead writer's file


@pytest.mark.parametrize("name", [".abcdef0123456789.1234.deadbeef.tmp",
                                  ".abcdef0123456789.cafe0123.00000000-1.tmp"])
def test_other_writers_files_go_by_age_only(tmp_path, name):
    sub = tmp_path / "ab"
    sub.mkdir()
    leftover = sub / name  # an older name, or another machine's writer
    leftover.write_bytes(b"z" * 100)
    assert DiskBackend(tmp_path).stats()["bytes"] == 100
    old = time.time() - disk.STALE_TMP_S - 5
    os.utime(leftover, (old, old))
    assert DiskBackend(tmp_path).stats()["bytes"] == 0 and not leftover.exists()
