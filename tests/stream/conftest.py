"""A real `kvlife stream serve` process (the one server, `kvlife serve`) on loopback, and a tiny model's
context published to it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tests.store.conftest import _stop, _wait, free_port

CHUNK = 64


def start_stream_server(root, port: int, *extra: str) -> subprocess.Popen:
    import httpx

    args = [
        sys.executable,
        "-m",
        "kvlife.cli",
        "stream",
        "serve",
        "--root",
        str(root),
        "--port",
        str(port),
        *extra,
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200, process,
          "kvlife stream serve")
    return process


@pytest.fixture(scope="session")
def stream_url(tmp_path_factory):
    port = free_port()
    process = start_stream_server(tmp_path_factory.mktemp("streamed"), port, "--piece-bytes", "2048")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def tiny():
    from tests.tiny import ByteTokenizer, tiny_model

    return tiny_model("qwen2"), ByteTokenizer()


@pytest.fixture(scope="session")
def published(stream_url, tiny):
    """(session with the dense context cache, manifest): ~630 tokens in 10 chunks of 64, every level."""
    from kvlife.session import Session
    from kvlife.stream import publish

    model, tokenizer = tiny
    session = Session(model, tokenizer, mode="multi-request")
    session.prefill("The lighthouse keeper counted 41 boats; the baker sold 17 loaves at dawn. " * 8 + "End.")
    manifest = publish(session, stream_url, "tiny-doc", chunk_tokens=CHUNK)
    return session, manifest
