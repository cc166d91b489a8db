"""Real services on loopback for the store tests: a redis-server and a `kvlife serve` process."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvlife.backends.loopback import free_port
from kvlife.store.disk import DiskBackend
from kvlife.store.memory import MemoryBackend
from kvlife.store.redis_backend import RedisBackend
from kvlife.store.remote import RemoteBackend

TOKENS = {"alice": "token-alice", "bob": "token-bob"}


def _wait(check, process: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited early with {process.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {timeout}s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def redis_url():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it with apt-get)")
    import redis

    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "yes"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait(lambda: redis.Redis.from_url(url).ping(), process, "redis-server")
        yield url
    finally:
        _stop(process)


def start_server(root: Path, port: int, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "kvlife.store.server", "--store", str(root), "--port", str(port)]
    for tenant, token in TOKENS.items():
        args += ["--tenant", f"{tenant}={token}"]
    process = subprocess.Popen(args + list(extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    _wait(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200, process,
          "kvlife serve")
    return process


@pytest.fixture(scope="session")
def server_url(tmp_path_factory):
    port = free_port()
    process = start_server(tmp_path_factory.mktemp("served"), port, "--max-chunk-bytes", "8e6")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)


@pytest.fixture(params=["memory", "disk", "redis", "remote"])
def tier(request, tmp_path):
    """One backend of each kind (redis and remote on the loopback services above)."""
    if request.param == "memory":
        backend = MemoryBackend(1 << 30)
    elif request.param == "disk":
        backend = DiskBackend(tmp_path / "disk")
    elif request.param == "redis":
        backend = RedisBackend(request.getfixturevalue("redis_url"), ttl_s=60,
                               prefix=f"test:{tmp_path.name}:")
    else:
        backend = RemoteBackend(request.getfixturevalue("server_url"), token=TOKENS["alice"])
    yield backend
    backend.close()
