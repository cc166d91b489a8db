"""LoopbackServer (the engines' process handling) and VllmServer's command, without an engine:
a few lines of Python stand in for the server."""

from __future__ import annotations

import os
import sys
import time

import pytest

from kvlife.backends.loopback import LoopbackServer
from kvlife.backends.vllm_server import VllmServer, find_python, venv_dir
from kvlife.errors import BackendError, ModelError

# answers /health with 200 once started; first starts a grandchild (an engine's worker) that
# would sleep on, and writes its pid where the test can find it
STAND_IN = """
import http.server, subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[2], "w").write(str(worker.pid))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


class StandIn(LoopbackServer):
    name = "stand-in"

    def __init__(self, script: str, pid_file, **kwargs) -> None:
        super().__init__(**kwargs)
        self.script, self.pid_file = script, pid_file

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.port), str(self.pid_file)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of an exited parent may linger as a zombie until init reaps it
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[1].split()[0] != "Z"


def test_a_server_is_up_when_entered_and_its_workers_go_with_it(tmp_path):
    import httpx

    with StandIn(STAND_IN, tmp_path / "worker.pid", log_path=tmp_path / "log") as server:
        assert server.url == f"http://127.0.0.1:{server.port}/v1"
        assert httpx.get(server.url.removesuffix("/v1") + "/health").status_code == 200
        worker = int((tmp_path / "worker.pid").read_text())
        assert _alive(worker)
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)  # the whole process group is stopped, not only the server


def test_a_server_that_dies_at_start_is_one_error_with_its_log(tmp_path):
    script = "import sys; print('no such model'); sys.exit(3)"
    with pytest.raises(BackendError, match="stand-in exited with status 3 at start: no such model"):
        with StandIn(script, tmp_path / "pid", log_path=tmp_path / "log"):
            pass


def test_a_server_that_never_answers_is_stopped_after_the_timeout(tmp_path):
    script = "import time; print('compiling'); time.sleep(600)"
    server = StandIn(script, tmp_path / "pid", log_path=tmp_path / "log", start_timeout_s=1.0)
    with pytest.raises(BackendError, match="did not become healthy within 1 s: compiling"):
        server.__enter__()
    assert server.process.poll() is not None


def test_vllm_command_has_prefix_caching_and_the_cached_token_report(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    on = VllmServer(tmp_path / "python", tmp_path, name="m", dtype="float32")
    on.port = 1234
    command = on.command()
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert {"--enable-prefix-caching", "--enable-prompt-tokens-details"} <= set(command)
    assert (
        command[command.index("--dtype") + 1] == "float32" and command[command.index("--port") + 1] == "1234"
    )
    assert command[command.index("--host") + 1] == "127.0.0.1"
    off = VllmServer(tmp_path / "python", tmp_path, name="m", prefix_caching=False)
    assert "--no-enable-prefix-caching" in off.command() and "--enable-prefix-caching" not in off.command()
    with pytest.raises(BackendError, match="scripts/vllm-server.sh --build"):
        on.check()
    (tmp_path / "python").write_text("")
    with pytest.raises(ModelError, match="no config.json"):
        VllmServer(tmp_path / "python", tmp_path / "nowhere", name="m").check()


def test_find_python_takes_only_a_finished_build(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLIFE_HOME", str(tmp_path))
    monkeypatch.delenv("KVLIFE_VLLM_PYTHON", raising=False)
    python = venv_dir() / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    assert find_python() is None  # no stamp: the build stopped half-way
    (venv_dir() / "kvlife-ready").touch()
    assert find_python() == python
    monkeypatch.setenv("KVLIFE_VLLM_PYTHON", str(tmp_path / "missing"))
    assert find_python() is None
