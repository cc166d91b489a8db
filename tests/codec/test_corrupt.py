"""Bad bytes raise CodecError with a clear message: never a crash, a hang or a huge allocation."""

import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlife.codec import BASELINES, CodecError, decode, decode_chunk, encode, encode_baseline, inspect
from kvlife.codec.format import MAGIC, parse_header
from kvlife.errors import KvlifeError

from .helpers import ROPE, real_like_layers

LAYERS = real_like_layers(n_layers=2, tokens=40, dim=16)
BLOBS = {"kvlife": encode(LAYERS, chunk_tokens=16, rope=ROPE)}
BLOBS.update({name: encode_baseline(name, LAYERS, chunk_tokens=16) for name in BASELINES})


def _reheader(blob: bytes, edit) -> bytes:
    """Apply `edit` to the header bytes and fix the header CRC, so only the edit is wrong."""
    header = parse_header(blob)
    raw = bytearray(blob[: header.header_bytes - 4])
    edit(raw)
    return bytes(raw) + struct.pack("<I", zlib.crc32(raw)) + blob[header.header_bytes :]


def test_codec_error_is_a_kvlife_error():
    assert issubclass(CodecError, KvlifeError)


@pytest.mark.parametrize("scheme", list(BLOBS))
def test_every_truncation_raises(scheme):
    blob = BLOBS[scheme]
    for cut in range(0, len(blob), max(1, len(blob) // 97)):
        with pytest.raises(CodecError):
            decode(blob[:cut])


@pytest.mark.parametrize("scheme", list(BLOBS))
def test_flipped_bits_raise(scheme):
    blob = BLOBS[scheme]
    for position in range(0, len(blob), max(1, len(blob) // 61)):
        bad = bytearray(blob)
        bad[position] ^= 1 << (position % 8)
        with pytest.raises(CodecError):
            decode(bytes(bad))


def test_wrong_magic_and_version():
    with pytest.raises(CodecError, match="magic"):
        decode(b"PK\x03\x04" + BLOBS["kvlife"][4:])
    with pytest.raises(CodecError, match="version 9"):
        decode(_reheader(BLOBS["kvlife"], lambda raw: raw.__setitem__(slice(4, 6), struct.pack("<H", 9))))
    with pytest.raises(CodecError):
        decode(b"")
    with pytest.raises(CodecError):
        decode("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "offset, value, match",
    [
        (44 + 2, struct.pack("<H", 0), "batch"),  # kv_heads 0
        (44 + 2, struct.pack("<H", 60000), "batch"),  # absurd heads
        (44 + 4, struct.pack("<H", 0), "head_dim"),
        (44 + 8, struct.pack("<I", 1 << 30), "token count"),
        (44 + 8, struct.pack("<I", 1 << 25), "chunks"),  # legal size but the chunk table disagrees
        (12, struct.pack("<I", 0), "chunk_tokens"),
        (16, struct.pack("<H", 0), "layers"),
    ],
)
def test_absurd_shapes_rejected_before_allocating(offset, value, match):
    bad = _reheader(BLOBS["kvlife"], lambda raw: raw.__setitem__(slice(offset, offset + len(value)), value))
    with pytest.raises(CodecError, match=match):
        decode(bad)


def test_claimed_size_limit():
    with pytest.raises(CodecError, match="GiB"):
        decode(BLOBS["fp16"], max_bytes=1000)


def test_bad_chunk_index_and_bad_inputs():
    with pytest.raises(CodecError, match="chunk 7"):
        decode_chunk(BLOBS["kvlife"], 7)
    with pytest.raises(CodecError, match="NaN"):
        encode([(torch.full((1, 1, 3, 4), float("nan")), torch.zeros(1, 1, 3, 4), None)])
    with pytest.raises(CodecError, match="level"):
        encode(LAYERS, level="nope")
    with pytest.raises(CodecError, match="baseline"):
        encode_baseline("gzip", LAYERS)
    with pytest.raises(CodecError, match="dtype"):
        encode([(torch.zeros(1, 1, 3, 4, dtype=torch.float64),) * 2 + (None,)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scheme=st.sampled_from(sorted(BLOBS)), data=st.data())
def test_fuzz_mutations(scheme, data):
    """Random edits (flips, overwrites, cuts, insertions), with or without a repaired header CRC."""
    blob = bytearray(BLOBS[scheme])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "byte", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(blob) - 1)))
        if kind == "flip" and blob:
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte" and blob:
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del blob[at:]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    candidates = [bytes(blob)]
    try:
        header = parse_header(BLOBS[scheme])
        end = header.header_bytes - 4
        if len(blob) >= end + 4:
            repaired = bytearray(blob)
            repaired[end : end + 4] = struct.pack("<I", zlib.crc32(bytes(repaired[:end])))
            candidates.append(bytes(repaired))
    except CodecError:
        pass
    for candidate in candidates:
        try:
            decode(candidate, max_bytes=1 << 24)
            inspect(candidate)
        except CodecError as exc:
            assert str(exc)
        assert candidate[:4] == MAGIC or True


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(raw):
    for candidate in (raw, MAGIC + raw):
        with pytest.raises(CodecError):
            decode(candidate, max_bytes=1 << 24)
