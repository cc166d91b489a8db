"""A serving engine as a child process on 127.0.0.1: start it on a free port, wait until its
/health answers 200, stop it on exit. llama_server.py and vllm_server.py say which command.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from kvlife.errors import BackendError


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackServer:
    """Base of the engines kvlife starts for its tests and benchmarks (a context manager).

    A subclass gives `name` (for messages), `command()` (run with `self.port` set) and, when it
    must, `check()` (raises before anything starts) and `env()` (variables added to the child's).
    The child's output goes to `log_path` (a temporary file by default).
    """

    name = "server"

    def __init__(self, log_path: Path | None = None, start_timeout_s: float = 180.0) -> None:
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        raise NotImplementedError

    def check(self) -> None:
        """Raise a kvlife error when the server cannot start (a missing file), before it is tried."""

    def env(self) -> dict[str, str]:
        return {}

    def __enter__(self):
        self.check()
        self.port = free_port()
        if self.log_path is None:
            self.log_path = Path(tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")[1])
        log = self.log_path.open("wb")
        # its own session: stop() signals the whole group, so an engine's worker processes go too
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **self.env()},
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise BackendError(f"{self.name} exited with status {self.process.returncode} at start: "
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise BackendError(
            f"{self.name} did not become healthy within {self.start_timeout_s:.0f} s: {self.log_tail()}"
        )

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        group = self.process.pid  # start_new_session made the child its group's leader
        try:
            os.killpg(group, signal.SIGTERM)
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            self.process.wait(5)
        try:  # whatever of the group outlived the leader's shutdown (an engine's worker processes)
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(5)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])
