"""`kvlife fetch` and `kvlife stream`: a real fetch, and one-line errors with exit status 2."""

import json

import pytest

from kvlife.cache import KVCache
from kvlife.cli import main


def test_fetch_writes_a_loadable_cache_and_a_json_report(stream_url, published, tmp_path, capsys):
    _, manifest = published
    out = tmp_path / "ctx.safetensors"
    argv = [
        "fetch",
        stream_url,
        "--context-id",
        "tiny-doc",
        "--slo",
        "20",
        "--no-model",
        "--policy",
        "balanced",
        "--json",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["met"] and [c["option"] for c in report["chunks"]] == ["balanced"] * manifest.n_chunks
    cache, meta = KVCache.load(out)
    assert cache.tokens_held()[0] == len(manifest.token_ids) and meta["context_ids"] == manifest.token_ids
    assert main(["stream", "ls", stream_url]) == 0 and "tiny-doc" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["fetch", "{url}", "--context-id", "tiny-doc", "--slo", "0"], "--slo must be > 0"),
    (["fetch", "{url}", "--context-id", "absent", "--slo", "1", "--no-model"], "no context 'absent'"),
    (["fetch", "{url}", "--context-id", "../etc", "--slo", "1", "--no-model"], "invalid context id"),
    (["fetch", "{url}", "--context-id", "tiny-doc", "--slo", "1", "--no-model", "--policy", "fastest"],
     "unknown policy 'fastest'"),
    (["fetch", "http://127.0.0.1:9", "--context-id", "x", "--slo", "1", "--no-model"], "cannot reach"),
    (["fetch", "ftp://host", "--context-id", "x", "--slo", "1"], "bad server URL"),
    (["fetch", "{url}", "--context-id", "x", "--slo", "1", "--no-model", "--ask", "q"], "need the model"),
    (["fetch", "{url}", "--context-id", "tiny-doc", "--slo", "1", "--no-model", "--discount", "0.5"],
     "--discount must be a number >= 1 or 'wide'"),
    (["fetch", "{url}", "--context-id", "tiny-doc", "--slo", "1", "--no-model", "--discount", "levels"],
     "--discount must be a number >= 1 or 'wide'"),
    (["fetch", "{url}", "--context-id", "tiny-doc", "--slo", "1", "--no-model", "--refine-discount", "0.9"],
     "--refine-discount must be a number >= 1 or 'wide'"),
    (["stream", "link", "{url}", "--trace", "warp:9"], "bad trace"),
    (["stream", "serve", "--root", "{tmp}", "--trace", "constant:-3mbit"], "must be > 0"),
    (["stream", "put", "{url}", "--context-id", "x", "--text", "/nonexistent.txt"], "no text file"),
])
def test_user_errors_are_one_line(argv, message, stream_url, published, tmp_path, capsys):
    argv = [a.format(url=stream_url, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("kvlife: error:"), err


def test_streaming_over_kvlife_serve_with_tenants(published, tmp_path, capsys):
    """The one server: `kvlife serve` with tokens serves streamed contexts per tenant."""
    from tests.store.conftest import _stop, free_port, start_server

    from kvlife.stream import StreamClient, publish

    session, manifest = published
    port = free_port()
    server = start_server(tmp_path, port)  # tenants alice and bob
    url = f"http://127.0.0.1:{port}"
    try:
        publish(session, StreamClient(url, "token-alice"), "tenant-doc", chunk_tokens=manifest.chunk_tokens)
        assert main(["stream", "ls", url, "--token", "token-alice"]) == 0
        assert capsys.readouterr().out.split() == ["tenant-doc"]
        assert (
            main(["stream", "ls", url, "--token", "token-bob"]) == 0 and capsys.readouterr().out.strip() == ""
        )
        assert main(["stream", "ls", url]) == 2
        assert "401" in capsys.readouterr().err
        argv = [
            "fetch",
            url,
            "--context-id",
            "tenant-doc",
            "--slo",
            "30",
            "--no-model",
            "--policy",
            "high",
            "--json",
        ]
        assert main([*argv, "--token", "token-alice"]) == 0
        assert json.loads(capsys.readouterr().out)["chunks"][0]["option"] == "high"
        assert main([*argv, "--token", "token-bob"]) == 2
        assert "no context 'tenant-doc'" in capsys.readouterr().err
    finally:
        _stop(server)
