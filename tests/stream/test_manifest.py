"""Both manifests' wire format (keys and their order), their JSON round trip, and the StreamError each kind of
bad manifest raises; built by hand, no model."""

import json

import pytest

from kvlife.codec import LEVELS
from kvlife.stream.context import ChunkInfo, Manifest, StreamError
from kvlife.stream.pieces import PieceManifest

DENSE_LEVELS = list(LEVELS)[:2]
PIECE_LEVELS = ["raw", DENSE_LEVELS[0]]


def table(levels, rows):
    return {level: [ChunkInfo(100 + i, f"{i:064x}", 7 * i) for i in range(rows)] for level in levels}


def dense():
    return Manifest(context_id="doc-1", token_ids=list(range(10)), levels=DENSE_LEVELS,
                    chunks=table(DENSE_LEVELS, 3), model_fingerprint="fp", dtype="bfloat16", model="tiny",
                    extra={"a": 1}, chunk_tokens=4, header_sha256="ab" * 32, header_bytes=321)


def pieces():
    return PieceManifest(context_id="doc-2", token_ids=list(range(7)), levels=PIECE_LEVELS,
                         chunks=table(PIECE_LEVELS, 2), model_fingerprint="fp", dtype="float16", model="tiny",
                         extra={"b": [1]}, groups=[(0, 1), (2, 2)], work=[10, 5], recipe="kvzip|id",
                         spec="kvzip(ratio=0.25)", codec_tokens=32)


def test_wire_format_keys_in_order():
    assert list(dense().to_json()) == [
        "format", "context_id", "model", "model_fingerprint", "dtype", "chunk_tokens", "levels",
        "header_sha256", "header_bytes", "chunks", "token_ids", "extra"]
    assert list(pieces().to_json()) == [
        "format", "context_id", "model", "model_fingerprint", "dtype", "recipe", "spec", "codec_tokens",
        "levels", "groups", "work", "chunks", "token_ids", "extra"]
    assert dense().to_json()["format"] == "kvlife-stream/1"
    assert pieces().to_json()["chunks"]["raw"][1] == [101, f"{1:064x}", 7]


@pytest.mark.parametrize("make", [dense, pieces])
def test_json_round_trip(make):
    manifest = make()
    wire = json.dumps(manifest.to_json())
    parsed = type(manifest).from_json(json.loads(wire))
    assert parsed == manifest and json.dumps(parsed.to_json()) == wire
    assert parsed.keys() == manifest.keys() and len(set(manifest.keys())) == len(manifest.keys())


def test_keys_name_every_chunk():
    manifest = dense()
    assert manifest.keys()[0] == manifest.header_sha256 and len(manifest.keys()) == 1 + 2 * manifest.n_chunks
    assert manifest.keys()[1:4] == [manifest.chunk_key(DENSE_LEVELS[0], i) for i in range(3)]
    assert len(pieces().keys()) == 2 * 2


def test_dense_dtype_defaults_to_float32_pieces_need_one():
    data = dense().to_json()
    del data["dtype"]
    assert Manifest.from_json(data).dtype == "float32"
    data = pieces().to_json()
    del data["dtype"]
    with pytest.raises(StreamError, match=r"^malformed manifest: KeyError: 'dtype'$"):
        PieceManifest.from_json(data)


def changed(make, **fields):
    data = json.loads(json.dumps(make().to_json()))
    for key, value in fields.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


BAD = [
    (Manifest, [1], "not a kvlife-stream/1 manifest"),
    (Manifest, changed(pieces), "not a kvlife-stream/1 manifest"),
    (PieceManifest, changed(dense), "not a kvlife-stream-compressed/1 manifest"),
    (Manifest, changed(dense, token_ids=list(range(4))),
     f"manifest level {DENSE_LEVELS[0]}: 3 chunks, the tokens need 1"),
    (PieceManifest, changed(pieces, groups=[[0, 2]]), "manifest level raw: 2 pieces, the groups need 1"),
    (Manifest, changed(dense, header_bytes=None), "malformed manifest: KeyError: 'header_bytes'"),
    (PieceManifest, changed(pieces, work=["x", 1]),
     "malformed manifest: ValueError: invalid literal for int() with base 10: 'x'"),
    (Manifest, changed(dense, context_id=".hidden"), "invalid context id '.hidden'"),
    (PieceManifest, changed(pieces, context_id="a/b"), "invalid context id 'a/b'"),
    (Manifest, changed(dense, chunk_tokens=0, token_ids=[], chunks={level: [] for level in DENSE_LEVELS}),
     f"manifest needs tokens, chunk_tokens >= 1 and known levels (got {DENSE_LEVELS})"),
    (Manifest, changed(dense, levels=["bogus"], chunks={"bogus": [[1, "00", 2]] * 3}),
     "manifest needs tokens, chunk_tokens >= 1 and known levels (got ['bogus'])"),
    (PieceManifest, changed(pieces, groups=[[0, 0], [2, 2]]),
     "manifest layer groups do not cover the layers in order: [(0, 0), (2, 2)]"),
    (PieceManifest, changed(pieces, work=[10]),
     f"manifest needs tokens, layer groups, their work and known levels (got {PIECE_LEVELS})"),
    (PieceManifest, changed(pieces, levels=["bogus"], chunks={"bogus": [[1, "00", 2]] * 2}),
     "manifest needs tokens, layer groups, their work and known levels (got ['bogus'])"),
]


@pytest.mark.parametrize("cls, data, message", BAD)
def test_bad_manifests_raise_stream_error(cls, data, message):
    with pytest.raises(StreamError) as raised:
        cls.from_json(data)
    assert str(raised.value).startswith(message)
