"""Streaming compressed contexts: a multi-request cache compressed once is put on `kvlife serve` as pieces
(layer groups, each at several levels) and fetched piece by piece into a session of the same recipe, model
and dtype only; raw pieces give exactly the local cache, a corrupt piece is never used."""

import json

import pytest
import torch
from tests.store.test_compressed_store import held
from tests.stream.test_fetch import FaultyLink
from tests.tiny import ByteTokenizer, tiny_model, tiny_tokenizer

from kvlife.cli import main
from kvlife.errors import KvlifeError
from kvlife.methods.compress.adakv import PAD_POSITION
from kvlife.session import Session
from kvlife.stream import FetchConfig, StreamClient, StreamError, fetch_into, publish
from kvlife.stream.pieces import PieceManifest

TEXT = "The lighthouse keeper counted 41 boats; the baker sold 17 loaves at dawn. " * 4 + "End."
QUERY = "How many boats?"
LEVELS = ["raw", "high", "balanced", "extreme"]
CASES = [("qwen2", "kvzip(ratio=0.25,level=uniform)"), ("qwen2", "kvzip(ratio=0.25,level=head)"),
         ("qwen2", "adakv(ratio=0.25)"), ("qwen2", "kivi(bits=2)"),
         ("gemma3", "kvzip(ratio=0.25,level=head)")]


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_model(kind) for kind in ("qwen2", "gemma3")}


def session(model, spec):
    return Session(model, ByteTokenizer(), spec, mode="multi-request", prompt_format="plain")


def context_id(kind, spec):
    return "cmp-" + kind + "-" + "".join(c if c.isalnum() else "_" for c in spec)


@pytest.fixture(scope="module")
def compressed(models, stream_url):
    """(kind, spec) -> (the publishing session, its manifest): every case at LEVELS, one layer per piece."""
    out = {}
    for kind, spec in CASES:
        local = session(models[kind], spec)
        local.prefill(TEXT)
        manifest = publish(local, stream_url, context_id(kind, spec), levels=LEVELS, chunk_tokens=32)
        out[kind, spec] = local, manifest
    return out


def assert_same_cache(a: Session, b: Session) -> None:
    assert [type(layer) for layer in a.cache.layers] == [type(layer) for layer in b.cache.layers]
    assert a.cache.next_position == b.cache.next_position and a.cache.bytes() == b.cache.bytes()
    for layer_a, layer_b in zip(held(a), held(b)):
        for (k1, v1, p1), (k2, v2, p2) in zip(layer_a, layer_b):
            assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(p1, p2)


@pytest.mark.parametrize("kind,spec", CASES)
def test_raw_pieces_stream_bit_exact_and_answer_as_a_local_cache(models, stream_url, compressed, kind, spec):
    local, manifest = compressed[kind, spec]
    assert isinstance(manifest, PieceManifest) and manifest.n_chunks == len(local.cache.layers)
    expected = local.ask(QUERY, max_new_tokens=6).output_ids
    streamed = session(models[kind], spec)
    StreamClient(stream_url).set_trace(None)
    report = fetch_into(streamed, stream_url, manifest.context_id, slo=30.0)
    assert report.met and not report.recompressed and streamed.loaded
    assert report.options() == ["raw"] * manifest.n_chunks  # a fast link: the exact level throughout
    assert_same_cache(streamed, local)
    assert streamed.ask(QUERY, max_new_tokens=6).output_ids == expected
    assert streamed.ask(QUERY, max_new_tokens=6).output_ids == expected  # cut back to the streamed context


@pytest.mark.parametrize("kind,spec", [("qwen2", "kvzip(ratio=0.25,level=head)"), ("qwen2", "kivi(bits=2)")])
def test_a_lossy_level_decodes_with_every_position_kept(models, stream_url, compressed, kind, spec):
    local, manifest = compressed[kind, spec]
    streamed = session(models[kind], spec)
    report = fetch_into(streamed, stream_url, manifest.context_id, slo=30.0, policy="balanced")
    assert report.options() == ["balanced"] * manifest.n_chunks and not report.recompressed
    errors = []
    for (k1, v1, p1), (k2, v2, p2), layer in zip(streamed.cache.to_tensors(), local.cache.to_tensors(),
                                                 local.cache.layers):
        assert torch.equal(p1, p2)  # positions (and padding slots) exactly
        if type(layer).__name__ == "KiviLayer":
            assert torch.equal(k1, k2) and torch.equal(v1, v2)  # packed codes are exact at every level
        else:
            real = p2 != PAD_POSITION  # padding slots: zero when rebuilt, whatever they held before
            errors.append(float((k1 - k2).abs()[0][real].max()) / float(k2.abs().max()))
    assert all(0 < e < 0.25 for e in errors), errors
    assert sum(manifest.size("balanced", i) for i in range(manifest.n_chunks)) < \
        sum(manifest.size("raw", i) for i in range(manifest.n_chunks)) / 2 or spec.startswith("kivi")
    assert len(streamed.ask(QUERY, max_new_tokens=4).output_ids) > 0


def test_never_served_to_another_recipe_model_or_dtype(models, stream_url, compressed):
    _, manifest = compressed["qwen2", "kvzip(ratio=0.25,level=uniform)"]
    others = [session(models["qwen2"], "kvzip(ratio=0.5)"),
              session(models["qwen2"], "kvzip(ratio=0.25,level=head)"),
              session(models["qwen2"], "snapkv(ratio=0.25)"),
              session(tiny_model("qwen2", seed=1), "kvzip(ratio=0.25)"),  # other weights
              session(tiny_model("qwen2").to(torch.bfloat16), "kvzip(ratio=0.25)")]  # another dtype
    for other in others:
        with pytest.raises(KvlifeError, match="another recipe|another model"):
            fetch_into(other, stream_url, manifest.context_id, slo=30.0)
        assert other.cache is None  # nothing attached
    with pytest.raises(StreamError, match="compressed by kvzip"):  # a dense session
        fetch_into(session(models["qwen2"], "dense"), stream_url, manifest.context_id, slo=30.0)
    with pytest.raises(StreamError, match="compressed from another model"):
        StreamClient(stream_url).fetch_pieces(manifest.context_id, 30.0, model=tiny_model("qwen2", seed=1))


def test_another_tenant_does_not_see_a_compressed_context(models, compressed, tmp_path):
    from tests.store.conftest import _stop, free_port, start_server

    local, _ = compressed["qwen2", "adakv(ratio=0.25)"]
    port = free_port()
    server = start_server(tmp_path, port)  # tenants alice and bob
    url = f"http://127.0.0.1:{port}"
    try:
        publish(local, StreamClient(url, "token-alice"), "alice-doc", levels=["raw"])
        with pytest.raises(StreamError, match="no context 'alice-doc'"):
            fetch_into(session(models["qwen2"], "adakv(ratio=0.25)"), StreamClient(url, "token-bob"),
                       "alice-doc", 30.0)
        alice = session(models["qwen2"], "adakv(ratio=0.25)")
        fetch_into(alice, StreamClient(url, "token-alice"), "alice-doc", 30.0)
        assert_same_cache(alice, local)
    finally:
        _stop(server)


def test_a_corrupt_or_lost_piece_is_fetched_again_never_used(models, stream_url, compressed):
    local, manifest = compressed["qwen2", "kvzip(ratio=0.25,level=head)"]
    link = FaultyLink(StreamClient(stream_url).transport, {1: ["corrupt"], 2: ["lose"]}, manifest)
    streamed = session(models["qwen2"], "kvzip(ratio=0.25,level=head)")
    report = fetch_into(streamed, StreamClient(link), manifest.context_id, slo=30.0, policy="raw")
    assert not report.recompressed and report.chunks[1].failures and report.chunks[2].failures
    assert [fault for _, fault in link.served].count("corrupt") == 1
    assert_same_cache(streamed, local)


def test_a_piece_bad_every_time_makes_the_session_recompress(models, stream_url, compressed):
    local, manifest = compressed["qwen2", "kvzip(ratio=0.25,level=uniform)"]
    faults = {0: ["corrupt", "corrupt"]}
    with pytest.raises(StreamError, match="no per-piece recompute"):
        StreamClient(FaultyLink(StreamClient(stream_url).transport, dict(faults), manifest)).fetch_pieces(
            manifest.context_id, 30.0, "raw", FetchConfig(max_attempts=2))
    streamed = session(models["qwen2"], "kvzip(ratio=0.25,level=uniform)")
    link = FaultyLink(StreamClient(stream_url).transport, faults, manifest)
    report = fetch_into(streamed, StreamClient(link), manifest.context_id, slo=30.0, policy="raw",
                        config=FetchConfig(max_attempts=2))
    assert "failed 2 times" in report.recompressed
    assert_same_cache(streamed, local)  # recompressed from the manifest's tokens: the same cache
    again = session(models["qwen2"], "kvzip(ratio=0.25,level=uniform)")
    assert fetch_into(again, stream_url, manifest.context_id, 30.0, policy="recompute").recompressed
    assert_same_cache(again, local)
    for policy, slo in (("fastest", 30.0), ("raw", 0.0)):  # the caller's mistakes are errors, not a fallback
        with pytest.raises(StreamError, match="not valid"):
            fetch_into(session(models["qwen2"], "kvzip(ratio=0.25,level=uniform)"), stream_url,
                       manifest.context_id, slo, policy=policy)


def test_pieces_are_store_chunks_under_the_recipe_namespace(compressed):
    _, first = compressed["qwen2", "kvzip(ratio=0.25,level=uniform)"]
    _, other = compressed["qwen2", "kvzip(ratio=0.25,level=head)"]
    keys = first.keys()
    assert len(set(keys)) == len(LEVELS) * first.n_chunks
    assert not set(keys) & set(other.keys())  # another recipe: other keys
    assert first.namespace("raw", 0).recipe.startswith("compressed:kvzip(ratio=0.25,level=uniform)|kvlife=")
    assert PieceManifest.from_json(json.loads(json.dumps(first.to_json()))).keys() == keys


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model("qwen2", attn="sdpa").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_cli_puts_and_fetches_a_compressed_context(stream_url, tiny_dir, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text(TEXT)
    put = ["stream", "put", stream_url, "--context-id", "cli-kvzip", "--text", str(text), "--model",
           str(tiny_dir), "--method", "kvzip(ratio=0.25)", "--levels", "raw,balanced",
           "--layers-per-piece", "2", "--format", "plain"]
    assert main(put) == 0
    assert "pieces of kvzip(ratio=0.25)" in capsys.readouterr().out
    fetch = ["fetch", stream_url, "--context-id", "cli-kvzip", "--slo", "30", "--model", str(tiny_dir),
             "--json"]
    assert main([*fetch, "--ask", QUERY, "--max-new-tokens", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["chunks"]) == 2 and all(c["option"] in ("raw", "balanced") for c in report["chunks"])
    assert len(report["answers"]) == 1 and not report["recompressed"]
    assert main([*fetch, "--method", "kvzip(ratio=0.25)", "--policy", "balanced"]) == 0
    assert [c["option"] for c in json.loads(capsys.readouterr().out)["chunks"]] == ["balanced"] * 2
    assert main(["fetch", stream_url, "--context-id", "cli-kvzip", "--slo", "30", "--no-model",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["met"]


@pytest.mark.parametrize("argv,message", [
    (["stream", "put", "{url}", "--context-id", "x", "--text", "{text}", "--method", "kvzip(ratio=0)"],
     "ratio"),
    (["stream", "put", "{url}", "--context-id", "x", "--text", "{text}", "--method", "kvzip(ratio=0.25)",
      "--levels", "raw,best"], "unknown level(s) best"),
    (["stream", "put", "{url}", "--context-id", "x", "--text", "{text}", "--method", "kvzip(ratio=0.25)",
      "--layers-per-piece", "0"], "--layers-per-piece must be >= 1"),
    (["fetch", "{url}", "--context-id", "{cmp}", "--slo", "1", "--method", "snapkv(ratio=0.25)"],
     "never served to another recipe"),
    (["fetch", "{url}", "--context-id", "{cmp}", "--slo", "1", "--method", "kvzip(ratio="],
     "unbalanced"),
    (["fetch", "{url}", "--context-id", "{cmp}", "--slo", "1", "--out", "{tmp}/c.st"],
     "--out saves a dense"),
    (["fetch", "{url}", "--context-id", "{cmp}", "--slo", "1", "--policy", "compact"],
     "unknown policy 'compact'"),
    (["fetch", "{url}", "--context-id", "tiny-doc", "--slo", "1", "--method", "kvzip(ratio=0.25)"],
     "is a dense prefill"),
])
def test_cli_errors_are_one_line(argv, message, stream_url, published, compressed, tmp_path, capsys):
    """`published` puts the dense context tiny-doc; `compressed` the compressed contexts (CMP below)."""
    text = tmp_path / "doc.txt"
    text.write_text(TEXT)
    cmp = context_id("qwen2", "kvzip(ratio=0.25,level=uniform)")
    argv = [a.format(url=stream_url, text=text, tmp=tmp_path, cmp=cmp) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("kvlife: error:"), err


def test_when_nothing_meets_the_deadline_every_piece_comes_at_the_cheapest_level(stream_url, compressed):
    _, manifest = compressed["qwen2", "adakv(ratio=0.25)"]
    layers, report = StreamClient(stream_url).fetch_pieces(manifest.context_id, slo=1e-4)
    assert report.options() == [manifest.levels[-1]] * manifest.n_chunks and not report.met
    assert len(layers) == manifest.n_chunks
