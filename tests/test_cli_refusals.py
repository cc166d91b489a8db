"""Command lines that used to be silently rewritten or run nothing are refused in one line, exit 2."""

import pytest

from kvlife import cli


@pytest.mark.parametrize("argv, message", [
    (["bench", "--method", "snapkv(ratio=0.5,ratio=0.3)"], "given twice"),
    (["bench", "--method", "dense+dense"], "two prefill methods"),
    (["bench", "--method", ""], "empty method spec"),
    (["bench", "--tasks", ","], "names no task"),
    (["bench", "--tasks", " , "], "names no task"),
    (["bench", "--samples", "-1"], "--samples must be at least 1"),
    (["bench", "--samples", "0"], "--samples must be at least 1"),
    (["serve", "--store", "STORE", "--token", ""], "token"),
    (["serve", "--store", "STORE", "--token", "  "], "token"),
])
def test_refused_in_one_line(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "store") if a == "STORE" else a for a in argv]
    if argv[0] == "bench":
        argv += ["--model", "tiny-missing", "--no-progress", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlife: error:") and "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()
