"""Chunk keys (chain hash over the whole prefix and the namespace) and checksummed envelopes."""

import pytest

from kvlife.store.base import ChunkCorrupt
from kvlife.store.envelope import open_chunk, seal_chunk
from kvlife.store.keys import Namespace, chunk_keys

NS = Namespace("model", "float32", "dense-prefill", "raw", chunk_size=4)


def test_keys_chain_over_the_whole_prefix():
    ids = list(range(10))
    keys = chunk_keys(ids, NS)
    assert len(keys) == 2  # the 2-token tail gets no key
    assert chunk_keys(ids[:8], NS) == keys
    changed = chunk_keys([99] + ids[1:], NS)
    assert changed[0] != keys[0] and changed[1] != keys[1]  # chunk 1's key covers chunk 0's tokens too
    assert chunk_keys([0, 1, 2, 3, 9, 9, 9, 9], NS)[0] == keys[0]


@pytest.mark.parametrize("field,value", [("model", "other"), ("dtype", "bfloat16"), ("recipe", "x"),
                                         ("encoding", "int8"), ("salt", "tenant-b")])
def test_every_namespace_field_changes_the_keys(field, value):
    other = Namespace(**{**NS.__dict__, field: value})
    assert chunk_keys(range(8), other) != chunk_keys(range(8), NS)


def test_envelope_refuses_corruption_truncation_and_wrong_key():
    key, other = chunk_keys(range(8), NS)
    blob = seal_chunk(key, b"payload" * 100)
    assert open_chunk(key, blob) == b"payload" * 100
    flipped = bytearray(blob)
    flipped[-3] ^= 1
    for bad_key, bad_blob in [(key, bytes(flipped)), (key, blob[:-1]), (key, blob[:20]), (other, blob),
                              (key, b"x" * len(blob))]:
        with pytest.raises(ChunkCorrupt):
            open_chunk(bad_key, bad_blob)
