"""The CLI: one-line errors with a non-zero exit; listings work."""

import subprocess
import sys

import pytest

from kvlife.cli import main


@pytest.mark.parametrize("argv,message", [
    (["bench", "--method", "snapkv(ratio=0.5"], "unbalanced"),
    (["bench", "--method", "nope"], "unknown method 'nope'"),
    (["bench", "--tasks", "kv,nope"], "unknown task 'nope'"),
    (["bench", "--model", "nope"], "unknown model 'nope'"),
    (["bench", "--model", "smollm2-135m"], "kvlife models pull smollm2-135m"),
    (["report", "/nonexistent/run"], "not a kvlife run directory"),
    (["models", "pull"], "name a model"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("kvlife: error:")


def test_unwritable_out_is_one_line_error(tmp_path, capsys, monkeypatch):
    from kvlife import models

    monkeypatch.setattr(models, "resolve", lambda name: tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["bench", "--tasks", "kv", "--out", str(blocker / "run")]) == 2
    assert "cannot write results" in capsys.readouterr().err


def test_listings(capsys):
    assert main(["methods"]) == 0
    assert "streamingllm" in capsys.readouterr().out
    assert main(["tasks"]) == 0
    assert "prefix_suffix" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "qwen2.5-coder-0.5b" in capsys.readouterr().out


def test_console_script_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "kvlife.cli", "bench", "--method", "bogus(x=1)"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("verbose", [False, True])
def test_library_progress_bars_only_with_verbose(verbose):
    """transformers' "Loading weights" bar and the GGUF conversion's tqdm bars: hidden unless --verbose."""
    argv = ["--verbose", "tasks"] if verbose else ["tasks"]
    probe = (
        "import os, sys\n"
        "for name in ('HF_HUB_DISABLE_PROGRESS_BARS', 'TQDM_DISABLE'): os.environ.pop(name, None)\n"
        "from kvlife import cli\n"
        f"assert cli.main({argv!r}) == 0\n"
        "from tqdm.auto import tqdm\n"
        "from transformers.utils import logging\n"
        "print('bars', logging.is_progress_bar_enabled(), not tqdm(range(1)).disable, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"bars {verbose} {verbose}" in done.stderr


def test_help_lists_every_command_without_loading_torch():
    probe = ("import sys\nfrom kvlife.cli import main\nsys.argv = ['kvlife', '--help']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.stderr.strip().endswith("False"), done.stderr
    for command in ("bench", "serve", "codec", "search-patterns", "search-heads", "fetch", "stream", "tasks"):
        assert command in done.stdout


@pytest.mark.parametrize("command", ["codec", "search-patterns", "search-heads"])
def test_a_heavy_command_is_listed_with_its_own_help_line(command):
    """`kvlife --help` lists it from cli.HEAVY_COMMANDS: the line must be the one its module gives."""
    from kvlife import cli

    listed = {a.dest: a.help for a in cli.build_parser()._subparsers._group_actions[0]._choices_actions}
    built = {a.dest: a.help for a in cli.build_parser(command)._subparsers._group_actions[0]._choices_actions}
    assert listed[command] == built[command]
    argv = [command, "inspect", "x.kvc"] if command == "codec" else [command, "--out", "x.json"]
    assert callable(cli.build_parser(command).parse_args(argv).func)  # the module's own parser, runnable

