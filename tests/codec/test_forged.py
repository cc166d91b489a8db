"""Forged streams: a header that claims gigabytes, or a version field rewritten, is refused cheaply.

The memory tests run in a subprocess under an address-space cap (RLIMIT_AS) of 1 GiB above what the
imports take: a decoder that allocates what a forged header claims dies there with MemoryError.
"""

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from kvlife.codec import CodecError, decode, decode_layers, encode, encode_baseline
from kvlife.codec.format import Header, LayerShape, Positions, assemble, chunk_crc, parse_header

from .helpers import ROPE, real_like_layers

REPO = Path(__file__).resolve().parents[2]


def forge(scheme: str, layers: list[LayerShape], chunk_tokens: int, chunk: bytes = b"",
          section: bytes = b"") -> bytes:
    """A stream whose header claims `layers` (counting positions) and whose every chunk is `chunk`."""
    header = Header(scheme, "float16", chunk_tokens, layers, 0, Positions.counting(layers),
                    scheme_section=section)
    return assemble(header, [chunk] * header.n_chunks)


def forged_streams() -> dict[str, bytes]:
    wide = [LayerShape(1, 2048, 1, 349_525)]  # the 162-byte stream: 5.3 GiB of positions alone
    kvlife_section = b"\0" * (2 * 2 * 2048 * 1)  # channel means, present: they are what makes it 16 KiB
    chunk0 = (struct.pack("<BBH", 2, 0, 0) + np.ones(2 * 2048, "<f4").tobytes() + b"\0\0" + b"\0" * 4096
              + b"\0" * 8)
    return {
        "fp16": forge("fp16", wide, 65536),
        "int8": forge("int8", [LayerShape(1, 4096, 1, 170_000)], 32768),
        "int8+zstd": forge("int8+zstd", wide, 65536, chunk=struct.pack("<BBH", 0, 0, 0)),
        "kvlife": forge("kvlife", wide, 65536, section=kvlife_section),
        # chunks as long as the least the shapes need, chunk 0 well formed up to its entropy section
        "kvlife-least": forge("kvlife", wide, 65536, chunk=chunk0, section=kvlife_section),
        "many-layers": forge("fp16", [LayerShape(1, 64, 64, 12_000)] * 40, 512),
    }


CAPPED = textwrap.dedent("""
    import json, resource, sys
    from kvlife.codec import CodecError, decode, decode_chunk, inspect

    def status(field):
        return int(next(line.split()[1] for line in open("/proc/self/status")
                        if line.startswith(field + ":")))

    size = status("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))
    out = {}
    for path in sys.argv[1:]:
        blob = open(path, "rb").read()
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
        errors = []
        for fn in (decode, inspect, lambda b: decode_chunk(b, 0)):
            try:
                fn(blob)
                errors.append("decoded")
            except CodecError as exc:
                errors.append("CodecError: " + str(exc))
            except BaseException as exc:
                errors.append(type(exc).__name__ + ": " + str(exc))
        out[path] = {"errors": errors, "grew_mb": (status("VmHWM") - before) / 1024}
    print(json.dumps(out))
""")


def test_forged_headers_are_refused_without_allocating_what_they_claim(tmp_path):
    paths = {}
    for name, blob in forged_streams().items():
        paths[name] = tmp_path / f"{name}.kvc"
        paths[name].write_bytes(blob)
    assert len(forged_streams()["fp16"]) < 200
    run = subprocess.run([sys.executable, "-c", CAPPED, *map(str, paths.values())], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout)
    for name, path in paths.items():
        got = results[str(path)]
        decoded, inspected, chunk = got["errors"]
        assert decoded.startswith("CodecError") and chunk.startswith("CodecError"), (name, got)
        # inspect reads no chunk: it may describe a stream whose chunks are bad, but must not allocate either
        assert inspected.startswith("CodecError") or name in ("int8+zstd", "kvlife-least"), (name, got)
        assert got["grew_mb"] < 64, (name, got)


def test_codec_inspect_of_a_forged_stream_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "forged.kvc"
    path.write_bytes(forged_streams()["fp16"])
    script = textwrap.dedent(f"""
        import resource, sys
        import kvlife.codec.cli  # what the command imports, measured apart from what it allocates
        from kvlife.cli import main

        def status(field):
            return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field + ":")))

        resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") * 1024 + (1 << 30), resource.RLIM_INFINITY))
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
        code = main(["codec", "inspect", {str(path)!r}])
        print((status("VmHWM") - before) // 1024)
        sys.exit(code)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith("kvlife: error:") and run.stderr.count("\n") == 1, run.stderr
    assert "forged" in run.stderr
    assert int(run.stdout.split()[-1]) < 128  # MB the command's peak RSS grew by: nothing the header claims


def test_header_claims_are_checked_against_the_bytes_present():
    shapes = [LayerShape(1, 2, 8, 100)]
    with pytest.raises(CodecError, match="fewer than"):
        decode(forge("fp16", shapes, 64, chunk=b"\0" * 4))
    with pytest.raises(CodecError, match="fewer than"):
        decode(forge("kvlife", shapes, 64, section=b"\0" * 64))
    # exactly enough bytes: refused later, by the chunk's own checks
    fp16 = forge("fp16", shapes, 64, chunk=b"\0" * (4 + 2 * 2 * 2 * 64 * 8))
    with pytest.raises(CodecError, match="chunk 1"):
        decode(fp16)


def test_positions_stay_compact_until_used():
    shapes = [LayerShape(1, 2048, 1, 349_525)]
    header = parse_header(forge("fp16", shapes, 65536))
    rows = header.positions[0]
    assert rows.shape == (2048, 349_525) and rows.strides[0] == 0  # one row of arange, broadcast
    assert int(rows[7, 123]) == 123


def _revision(blob: bytes, version: int, chunk_crcs: bool = False) -> bytes:
    """`blob` with its version field rewritten and the header checksum recomputed (with `chunk_crcs`,
    the chunk table's checksums too, as that version computes them: the stream a writer of that version
    would have made from the same bytes)."""
    header = parse_header(blob)
    raw = bytearray(blob[: header.header_bytes - 4])
    raw[4:6] = struct.pack("<H", version)
    if chunk_crcs:
        table = header.header_bytes - 4 - 8 * header.n_chunks
        offset = header.header_bytes
        for index, length in enumerate(header.chunk_lengths):
            crc = chunk_crc(blob[offset : offset + length], version)
            raw[table + 8 * index + 4 : table + 8 * index + 8] = struct.pack("<I", crc)
            offset += length
    return bytes(raw) + struct.pack("<I", zlib.crc32(raw)) + blob[header.header_bytes :]


@pytest.mark.parametrize("level", ["lossless-ish", "high", "balanced", "extreme"])
def test_a_version_3_stream_relabelled_is_refused_by_its_chunk_checksums(level):
    """Version 3 seeds its chunk checksums by the version: any relabelling fails, whatever the bytes."""
    for seed in range(16):
        layers = real_like_layers(n_layers=2, tokens=50 + 7 * seed, dim=16, seed=seed)
        blob = encode(layers, level=level, chunk_tokens=32, rope=ROPE)
        assert parse_header(blob).version == 3
        for version in (1, 2):
            with pytest.raises(CodecError, match="checksum"):
                decode_layers(_revision(blob, version))
        with pytest.raises(CodecError, match="version 0"):
            decode_layers(_revision(blob, 0))


@pytest.mark.parametrize("level", ["lossless-ish", "high", "balanced", "extreme"])
def test_a_version_2_stream_relabelled_version_1_is_refused(level):
    for seed in range(8):
        layers = real_like_layers(n_layers=2, tokens=50 + 7 * seed, dim=16, seed=seed)
        blob = encode(layers, level=level, chunk_tokens=32, rope=ROPE)
        blob_v2 = _revision(blob, 2, chunk_crcs=True)  # version 2 differs only in its chunk checksums
        assert all(x.equal(y) for a, b in zip(decode_layers(blob_v2), decode_layers(blob))
                   for x, y in zip(a, b))
        with pytest.raises(CodecError, match="entropy"):
            decode_layers(_revision(blob_v2, 1))


def test_a_version_1_stream_relabelled_version_2_is_refused():
    for name in ("balanced", "extreme", "lossless-ish"):
        blob = (Path(__file__).parent / "data" / f"v1-{name}.kvc").read_bytes()
        with pytest.raises(CodecError, match="entropy"):
            decode_layers(_revision(blob, 2))
        with pytest.raises(CodecError, match="checksum"):
            decode_layers(_revision(blob, 3))


def test_baselines_read_the_same_in_every_version():
    layers = real_like_layers(n_layers=1, tokens=40, dim=8)
    for name in ("fp16", "int8", "lmcache"):
        blob = encode_baseline(name, layers, chunk_tokens=16)
        for version in (1, 2):
            older = decode_layers(_revision(blob, version, True))
            for (k, v, p), (k1, v1, p1) in zip(decode_layers(blob), older):
                assert k.equal(k1) and v.equal(v1) and p.equal(p1)
