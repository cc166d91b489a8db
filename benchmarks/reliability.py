"""Reliability campaign: corrupt and forged codec streams, killed disk-tier writers, and hostile requests
against `kvlife serve`, each input or fault counted by how kvlife came through it (issue 27).

    python benchmarks/reliability.py [--scale 4] [--parts codec,store,server] [--out FILE]

Writes benchmarks/results/reliability.json and prints a table. tests/test_reliability.py runs the same
campaign at --scale 1 in CI (a minute or two) and asserts that nothing crashed, hung or returned wrong data.

Cases (one row each):
    codec_truncate       every stream cut short (at random and at the header and chunk boundaries)
    codec_bitflip        1-3 flipped bits, checksums left as they are
    codec_bitflip_recrc  1-3 flipped bits, then every chunk CRC and the header CRC recomputed
    codec_version        the version field rewritten (1 <-> 2, 0, 3), header CRC recomputed
    codec_forged         headers written to claim what they like (huge shapes, empty or least-size chunks,
                         explicit positions that decompress to hundreds of MB), checksums valid
    codec_random         random bytes, with and without the magic
    store_disk_kill      a writer process SIGKILLed at a random moment of its puts into a disk tier that a
                         long-running backend (opened before, as `kvlife serve` holds one) reads after
                         each kill
    server_auth          requests to every authenticated endpoint of `kvlife serve` with a missing, wrong,
                         malformed or oversized token
    server_tenant        one tenant's reads, existence checks, deletes and context calls aimed at another's
                         chunks and contexts, and 8 threads of two tenants writing and reading one key each
    server_traversal     chunk keys and context ids that try to leave the tenant's directory

Outcomes (counts; they add up to `tried`):
    clean_error  refused with kvlife's own one-line error (CodecError; an HTTP 4xx); for a kill: the store
                 came through clean (every chunk the reader got verifies)
    accepted     taken as valid: a stream that decodes (recomputed checksums make an edited stream valid; a
                 baseline's version does not change its layout); an isolation probe answered "absent"
    crash        any other exception, a multi-line error, a dead process, an HTTP 5xx
    hang         no answer within the case's time limit
    wrong_data   data that is not what was stored: a truncated or flipped stream (checksums intact) or a
                 relabelled one that decodes to other values, decoded shapes that differ from the header's, a
                 chunk that fails its envelope, another tenant's chunk, a request that passed without a token
    max_rss_mb   codec: the most resident memory one input added to the decoding process, which runs under
                 an address-space cap (RLIMIT_AS) of 1 GiB above its imports; server: the server's peak RSS;
                 store: the reading process's growth over the campaign
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "reliability.json"
REPO = Path(__file__).resolve().parents[1]
OUTCOMES = ("clean_error", "accepted", "crash", "hang", "wrong_data")
MEMORY_CAP = 1 << 30  # address space a codec worker may add to what its imports took
CASE_S = 60.0  # one codec input, one HTTP request, one post-kill read
START_S = 600.0  # a worker's or server's start (imports take long on a loaded machine)


@dataclass
class Tally:
    tried: int = 0
    clean_error: int = 0
    accepted: int = 0
    crash: int = 0
    hang: int = 0
    wrong_data: int = 0
    max_rss_mb: float = 0.0
    examples: list[str] = field(default_factory=list)  # the first few notes of crashes, hangs and wrong data

    def add(self, outcome: str, rss_mb: float = 0.0, note: str | None = None) -> None:
        self.tried += 1
        setattr(self, outcome, getattr(self, outcome) + 1)
        self.max_rss_mb = round(max(self.max_rss_mb, rss_mb), 1)
        if note and outcome in ("crash", "hang", "wrong_data") and len(self.examples) < 5:
            self.examples.append(note[:300])

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "examples"}


def _status_kb(field_name: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


# ---- codec -----------------------------------------------------------------------------------------

def _seed_streams() -> dict[str, bytes]:
    """Valid streams of every scheme and format feature the mutations start from."""
    import numpy as np
    import torch

    from kvlife.codec import RopeSpec, encode, encode_baseline

    generator = torch.Generator().manual_seed(0)

    def layers(n_layers, heads, tokens, dim, dtype=torch.float32):
        out = []
        for _ in range(n_layers):
            keys = (torch.randn(1, heads, tokens, dim, generator=generator) * 2
                    + torch.randn(1, heads, 1, dim, generator=generator))
            values = torch.randn(1, heads, tokens, dim, generator=generator)
            out.append((keys.to(dtype), values.to(dtype), None))
        return out

    small = layers(2, 2, 40, 16)
    uneven = layers(1, 2, 50, 8, torch.float16) + layers(1, 2, 20, 8, torch.float16)
    weights = [(np.linspace(0.1, 2, 32).reshape(2, 16), np.ones((2, 16))) for _ in small]
    seeds = {
        "kvlife-balanced-rope": encode(small, "balanced", chunk_tokens=16, rope=RopeSpec(10000.0, 16)),
        "kvlife-extreme-weights": encode(small, "extreme", chunk_tokens=16, weights=weights),
        "kvlife-lossless-uneven-fp16": encode(uneven, "lossless-ish", chunk_tokens=16),
    }
    seeds.update({name: encode_baseline(name, small, chunk_tokens=16)
                  for name in ("fp16", "int8", "int8+zstd", "lmcache")})
    v1 = REPO / "tests" / "codec" / "data" / "v1-balanced.kvc"  # a version-1 stream (constriction's coder)
    if v1.is_file():
        seeds["kvlife-v1"] = v1.read_bytes()
    return seeds


def _small_stream(rng: random.Random) -> bytes:
    import torch

    from kvlife.codec import LEVELS, encode

    generator = torch.Generator().manual_seed(rng.randrange(1 << 30))
    heads, tokens, dim = rng.choice((1, 2)), rng.randint(8, 80), rng.choice((8, 16))
    layers = [tuple(torch.randn(1, heads, tokens, dim, generator=generator) for _ in range(2)) + (None,)
              for _ in range(rng.randint(1, 2))]
    return encode(layers, rng.choice(list(LEVELS)), chunk_tokens=rng.choice((16, 32, 64)))


def _recrc(original: bytes, blob: bytes) -> bytes:
    """`blob` (an edit of `original`) with every chunk CRC and the header CRC recomputed over its bytes,
    at the original's layout."""
    from kvlife.codec.format import chunk_crc, parse_header

    header = parse_header(original)
    out = bytearray(blob)
    table = header.header_bytes - 4 - 8 * header.n_chunks
    offset = header.header_bytes
    for index, length in enumerate(header.chunk_lengths):
        crc = chunk_crc(bytes(out[offset : offset + length]), header.version)
        out[table + 8 * index + 4 : table + 8 * index + 8] = struct.pack("<I", crc)
        offset += length
    end = header.header_bytes - 4
    out[end : end + 4] = struct.pack("<I", zlib.crc32(bytes(out[:end])))
    return bytes(out)


def _flip(blob: bytes, rng: random.Random) -> bytes:
    out = bytearray(blob)
    for _ in range(rng.randint(1, 3)):
        position = rng.randrange(len(out))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def _relabel(blob: bytes, version: int) -> bytes:
    from kvlife.codec.format import parse_header

    header = parse_header(blob)
    raw = bytearray(blob[: header.header_bytes - 4])
    raw[4:6] = struct.pack("<H", version)
    return bytes(raw) + struct.pack("<I", zlib.crc32(raw)) + blob[header.header_bytes :]


def _forge(scheme: int, dtype: int, chunk_tokens: int, layers: list[tuple[int, int, int]], positions: bytes,
           section: bytes, chunks: list[bytes]) -> bytes:
    """A version-2 stream written from docs/codec-format.md's byte layout (not with the codec's own writer,
    so that the forger does not share what it tests): `layers` as (kv_heads, head_dim, tokens)."""
    n_chunks = -(-max(t for _, _, t in layers) // chunk_tokens)
    out = bytearray(struct.pack("<4sHBBIIHHqdHHI", b"KVLC", 2, scheme, dtype, 0, chunk_tokens, len(layers),
                                0, 0, 0.0, 0, 0, n_chunks))
    for heads, dim, tokens in layers:
        out += struct.pack("<HHHHIi", 1, heads, dim, 0, tokens, -1)
    out += struct.pack("<I", len(positions)) + positions + struct.pack("<I", len(section)) + section
    chunks = (chunks + [b""] * n_chunks)[:n_chunks]
    for chunk in chunks:
        out += struct.pack("<II", len(chunk), zlib.crc32(chunk))
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out) + b"".join(chunks)


def _forged(rng: random.Random) -> bytes:
    """A stream whose header claims a random (legal) shape that its bytes do not back."""
    import zstandard

    from kvlife.codec.format import (
        DEFAULT_MAX_BYTES,
        MAX_CHUNK_ELEMENTS,
        CodecError,
        LayerShape,
        check_shapes,
    )

    scheme, dtype = rng.randrange(5), rng.randrange(3)  # kvlife fp16 int8 int8+zstd lmcache; f32 f16 bf16
    while True:  # a shape within the format's limits (what a forger who read the spec would send)
        n_layers = rng.choice((1, 1, 2, 8, 40))
        heads = rng.choice((1, 8, 64, 512, 2048, 4096))
        dim = rng.choice((1, 2, 16, 64, 128))
        per_token = n_layers * (2 * heads * dim * (4 if dtype == 0 else 2) + 8 * heads)
        tokens = rng.randint(1, max(1, min(1 << 26, DEFAULT_MAX_BYTES // per_token)))
        chunk_tokens = min(rng.choice((16, 256, 4096, 65536)),
                           max(1, MAX_CHUNK_ELEMENTS // (2 * n_layers * heads * dim)))
        try:
            check_shapes([LayerShape(1, heads, dim, tokens)] * n_layers, chunk_tokens)
        except CodecError:
            continue
        if -(-tokens // chunk_tokens) <= 1 << 14:  # the chunk table alone stays small
            break
    section = b""
    if scheme == 0:
        section = bytes(2 * 2 * heads * dim * n_layers)  # channel means: present, as they must be
    elif scheme == 4:
        section = struct.pack("<HH", 16, 16) * n_layers
    compressor = zstandard.ZstdCompressor(level=3)
    if rng.random() < 0.25 and 8 * heads * tokens * n_layers < 400 << 20:
        # explicit positions: zero deltas, a zstd frame of a few KB that decompresses to what the shapes claim
        stream = compressor.compressobj()
        frame = bytearray()
        for _ in range(n_layers):
            frame += stream.compress(b"\x01")
            remaining = 8 * heads * tokens
            while remaining:
                piece = min(remaining, 1 << 22)
                frame += stream.compress(bytes(piece))
                remaining -= piece
        positions = bytes(frame + stream.flush())
    else:  # counting positions: 9 bytes a layer
        positions = compressor.compress(struct.pack("<Bq", 0, rng.randint(0, 1 << 40)) * n_layers)
    kind = rng.choice(("empty", "garbage", "least"))
    n_chunks = -(-tokens // chunk_tokens)
    if kind == "empty":
        chunks = []
    elif kind == "garbage":
        chunks = [rng.randbytes(rng.randint(0, 64)) for _ in range(min(n_chunks, 64))]
    else:  # as many bytes as the shapes need at the least, well formed up to the entropy section (kvlife)
        least = 4 + 2 * heads * (4 + dim) * n_layers + 2 * n_layers + 4
        body = struct.pack("<BBH", 2, 0, 0) + struct.pack("<f", 1.0) * (2 * heads * n_layers) + bytes(least)
        chunks = [body[:least] + rng.randbytes(8)] * min(n_chunks, 64)
    return _forge(scheme, dtype, chunk_tokens, [(heads, dim, tokens)] * n_layers, positions, section, chunks)


def codec_cases(scale: int, seed: int) -> tuple[dict[str, bytes], list[tuple[str, str | None, bytes]]]:
    """(seed streams, [(case, seed name or None, input bytes)]), the same for the same arguments."""
    from kvlife.codec.format import MAGIC, parse_header

    rng = random.Random(seed)
    seeds = _seed_streams()
    cases: list[tuple[str, str | None, bytes]] = []
    for name, blob in seeds.items():
        header = parse_header(blob)
        bounds = [0, 4, 44, header.header_bytes - 4, header.header_bytes, len(blob) - 1]
        offset = header.header_bytes
        for length in header.chunk_lengths:
            bounds += [offset + 1, offset + length - 1]
            offset += length
        cuts = sorted({b for b in bounds if 0 <= b < len(blob)}
                      | {rng.randrange(len(blob)) for _ in range(6 * scale)})
        cases += [("codec_truncate", name, blob[:cut]) for cut in cuts]
        cases += [("codec_bitflip", name, _flip(blob, rng)) for _ in range(12 * scale)]
        cases += [("codec_bitflip_recrc", name, _recrc(blob, _flip(blob, rng))) for _ in range(12 * scale)]
        cases += [("codec_version", name, _relabel(blob, version)) for version in (0, 1, 2, 3)
                  if version != header.version]
    # more kvlife streams, relabelled only: whether a version-1 decoder refuses a version-2 section is a
    # matter of its bytes, so it takes many streams to see
    for index in range(8 * scale):
        name = f"kvlife-small-{index}"
        seeds[name] = _small_stream(rng)
        cases.append(("codec_version", name, _relabel(seeds[name], 1)))
    cases += [("codec_forged", None, _forged(rng)) for _ in range(30 * scale)]
    cases += [("codec_random", None, rng.randbytes(rng.randint(0, 400))) for _ in range(15 * scale)]
    cases += [("codec_random", None, MAGIC + rng.randbytes(rng.randint(0, 400))) for _ in range(15 * scale)]
    return seeds, cases


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and bool((x == y).all())
                                    for la, lb in zip(a, b) for x, y in zip(la, lb))


def _judge(case: str, blob: bytes, reference) -> tuple[str, str | None]:
    from kvlife.codec import CodecError, decode_layers, inspect

    try:
        layers = decode_layers(blob)
        info = inspect(blob)
    except CodecError as exc:
        message = str(exc)
        if message and "\n" not in message:
            return "clean_error", None
        return "crash", f"not a one-line CodecError: {message[:200]!r}"
    except BaseException as exc:  # noqa: BLE001 - MemoryError, numba errors, anything: a crash
        return "crash", f"{type(exc).__name__}: {str(exc)[:200]}"
    claimed = [(s["batch"], s["kv_heads"], s["tokens"], s["head_dim"]) for s in info["shapes"]]
    if [tuple(keys.shape) for keys, _, _ in layers] != claimed:
        return "wrong_data", "decoded shapes differ from the header's"
    if case == "codec_bitflip_recrc" or (reference is not None and _same(layers, reference)):
        return "accepted", None
    return "wrong_data", f"{case}: decoded without error to other values"


def codec_worker(scale: int, seed: int, start: int) -> None:
    """Judge codec cases from `start` on, one JSON line each, under the memory cap."""
    import resource

    from kvlife.codec import decode_layers

    seeds, cases = codec_cases(scale, seed)
    references = {name: decode_layers(blob) for name, blob in seeds.items()}
    size = _status_kb("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_CAP, resource.RLIM_INFINITY))
    print(json.dumps({"cases": [case for case, _, _ in cases]}), flush=True)
    for index in range(start, len(cases)):
        case, name, blob = cases[index]
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # the peak (VmHWM) restarts from the current RSS
        outcome, note = _judge(case, blob, references.get(name) if name else None)
        grew = max(0, _status_kb("VmHWM") - before) / 1024
        print(json.dumps({"i": index, "case": case, "outcome": outcome, "rss_mb": grew, "note": note}),
              flush=True)


def _readline(process: subprocess.Popen, timeout: float) -> str | None:
    """A line of the worker's output, "" at its end, None after `timeout` seconds without one."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline() if ready else None


def run_codec(scale: int, seed: int, tallies: dict[str, Tally]) -> None:
    names: list[str] | None = None
    start = 0
    while names is None or start < len(names):
        worker = [sys.executable, __file__, "--codec-worker", str(scale), str(seed), str(start)]
        process = subprocess.Popen(worker, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   bufsize=1)
        try:
            line = _readline(process, START_S)
            if not line:
                raise RuntimeError(f"the codec worker did not start (exit {process.poll()})")
            names = json.loads(line)["cases"]
            while start < len(names):
                line = _readline(process, CASE_S)
                if line is None or not line:
                    outcome = "hang" if line is None else "crash"
                    why = "no answer in time" if line is None else "the worker died"
                    note = f"{names[start]} input {start}: {why}"
                    tallies.setdefault(names[start], Tally()).add(outcome, note=note)
                    start += 1
                    break
                row = json.loads(line)
                tallies.setdefault(row["case"], Tally()).add(row["outcome"], row["rss_mb"], row["note"])
                start = row["i"] + 1
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


# ---- store: writers killed mid-put -------------------------------------------------------------------

KILL_KEYS = [hashlib.sha256(f"reliability-{i}".encode()).hexdigest() for i in range(24)]
BUDGET = 6_000_000


def _write_forever(root: Path, seed: int) -> None:
    from kvlife.store.disk import DiskBackend
    from kvlife.store.envelope import seal_chunk

    rng = random.Random(seed)
    backend = DiskBackend(root, BUDGET)
    while True:
        key = rng.choice(KILL_KEYS)
        backend.put(key, seal_chunk(key, rng.randbytes(rng.randint(20_000, 400_000))))


def run_store(kills: int, seed: int, root: Path, tallies: dict[str, Tally], extra: dict) -> None:
    from kvlife.store.base import ChunkCorrupt
    from kvlife.store.disk import DiskBackend
    from kvlife.store.envelope import open_chunk, seal_chunk

    rng = random.Random(seed)
    tally = tallies.setdefault("store_disk_kill", Tally())
    reader = DiskBackend(root, BUDGET)  # opened before the kills, as a long-running server holds one
    rss_before = _status_kb("VmRSS")
    tmp_seen = 0
    for kill in range(kills):
        pid = os.fork()
        if pid == 0:  # the writer: no torch here, so a fork costs nothing
            try:
                _write_forever(root, seed * 100_003 + kill)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        tmp_seen = max(tmp_seen, len(list(root.rglob("*.tmp"))))
        started = time.monotonic()
        try:
            blobs = reader.get_many(KILL_KEYS)
            torn = 0
            for key, blob in zip(KILL_KEYS, blobs):
                if blob is None:
                    continue
                try:
                    open_chunk(key, blob)
                except ChunkCorrupt:
                    torn += 1
            key = rng.choice(KILL_KEYS)  # the long-running backend writes too (its budget, its rescans)
            reader.put(key, seal_chunk(key, rng.randbytes(50_000)))
        except Exception as exc:  # noqa: BLE001
            tally.add("crash", note=f"kill {kill}: {type(exc).__name__}: {exc}")
            continue
        if time.monotonic() - started > CASE_S:
            tally.add("hang", note=f"kill {kill}: the read took {time.monotonic() - started:.0f} s")
        elif torn:
            tally.add("wrong_data", note=f"kill {kill}: {torn} chunks fail their envelope")
        else:
            tally.add("clean_error")
    tally.max_rss_mb = round(max(0, _status_kb("VmRSS") - rss_before) / 1024, 1)
    reopened = DiskBackend(root, BUDGET)  # as a restarted server: the dead writers' files go at once
    extra["store_disk_kill"] = {"tmp_files_seen_after_a_kill_max": tmp_seen,
                                "tmp_files_left_after_reopen": len(list(root.rglob("*.tmp"))),
                                "bytes_after_reopen": reopened.stats()["bytes"], "budget": BUDGET}


# ---- server: black-box probes against `kvlife serve` -------------------------------------------------

TOKENS = {"alice": "alice-token-7f3a", "bob": "bob-token-91c2"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`kvlife serve` in a subprocess, and raw HTTP requests to it (no client-side path normalization)."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.root = root
        exe = Path(sys.executable).with_name("kvlife")
        if exe.is_file():
            command = [str(exe)]
        else:
            command = [sys.executable, "-c", "from kvlife.cli import main; main()"]
        command += ["serve", "--store", str(root), "--port", str(self.port), "--max-chunk-bytes", "2000000"]
        for name, token in TOKENS.items():
            command += ["--tenant", f"{name}={token}"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/v1/health")[0] == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"kvlife serve exited with {self.process.returncode}")
            time.sleep(0.2)
        raise RuntimeError("kvlife serve did not answer in time")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                tenant: str | None = None) -> tuple[int, bytes]:
        headers = dict(headers or {})
        if tenant:
            headers["Authorization"] = f"Bearer {TOKENS[tenant]}"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CASE_S)
        try:
            connection.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(body or b"")))
            connection.endheaders(body or b"")
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def peak_rss_mb(self) -> float:
        return round(_status_kb("VmHWM", self.process.pid) / 1024, 1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _probe(
    tally: Tally,
    server: Server,
    method: str,
    path: str,
    ok: set[int],
    *,
    body: bytes | None = None,
    headers: dict | None = None,
    tenant: str | None = None,
    bad: set[int] = frozenset(),
    note: str = "",
) -> int:
    """One request: `ok` statuses are clean refusals, `bad` ones wrong data, 5xx crashes, the rest
    accepted."""
    try:
        status, _ = server.request(method, path, body, headers, tenant)
    except TimeoutError:
        tally.add("hang", note=f"{method} {path[:80]} {note}: no answer in time")
        return -1
    except OSError as exc:
        tally.add("crash", note=f"{method} {path[:80]} {note}: {type(exc).__name__}: {exc}")
        return -1
    if status >= 500:
        tally.add("crash", note=f"{method} {path[:80]} {note}: HTTP {status}")
    elif status in bad:
        tally.add("wrong_data", note=f"{method} {path[:80]} {note}: HTTP {status}")
    elif status in ok:
        tally.add("clean_error")
    else:
        tally.add("accepted")
    return status


def _sealed(key: str, payload: bytes) -> bytes:
    from kvlife.store.envelope import seal_chunk

    return seal_chunk(key, payload)


def run_server(scale: int, seed: int, root: Path, tallies: dict[str, Tally]) -> None:
    rng = random.Random(seed)
    store = root / "served"
    (root / "canary.txt").write_text("outside the store")
    server = Server(store)
    try:
        key = hashlib.sha256(b"alice-chunk").hexdigest()
        chunk = _sealed(key, rng.randbytes(5000))
        assert server.request("PUT", f"/v1/chunks/{key}", chunk, tenant="alice")[0] in (200, 201)
        context = json.dumps({"manifest": {"note": "alice's"}, "chunks": [key]}).encode()
        assert server.request("PUT", "/v1/contexts/alice-ctx", context, tenant="alice")[0] in (200, 201)
        _auth_probes(server, tallies.setdefault("server_auth", Tally()), scale, key, chunk, context)
        _tenant_probes(server, tallies.setdefault("server_tenant", Tally()), scale, seed, key, chunk)
        _traversal_probes(server, tallies.setdefault("server_traversal", Tally()), scale, root, key)
        for name in ("server_auth", "server_tenant", "server_traversal"):
            tallies[name].max_rss_mb = server.peak_rss_mb()
    finally:
        server.stop()


def _check(tally: Tally, ok: bool, note: str) -> None:
    tally.add("clean_error" if ok else "wrong_data", note=note)


def _auth_probes(server: Server, auth: Tally, scale: int, key: str, chunk: bytes, context: bytes) -> None:
    """Every authenticated endpoint, with every way of not holding a token: 401 (or 400), never 2xx."""
    endpoints = [("GET", "/v1/stats", None), ("POST", "/v1/exists", json.dumps({"keys": [key]}).encode()),
                 ("GET", f"/v1/chunks/{key}", None), ("PUT", f"/v1/chunks/{key}", _sealed(key, b"evil")),
                 ("DELETE", f"/v1/chunks/{key}", None), ("GET", "/v1/contexts", None),
                 ("PUT", "/v1/contexts/evil", context), ("GET", "/v1/contexts/alice-ctx/manifest", None),
                 ("DELETE", "/v1/contexts/alice-ctx", None), ("GET", "/v1/link", None),
                 ("POST", "/v1/link", b'{"trace": "constant:1mbit"}')]
    token = TOKENS["alice"]
    headers = [{}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "},
               {"Authorization": "Bearer wrong"},
               {"Authorization": f"Basic {token}"}, {"Authorization": f"Bearer {token[:-1]}"},
               {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Bearer {token} {token}"},
               {"Authorization": "Bearer " + "A" * 6000}, {"Authorization": f"Token {token}"},
               {"Authorization": f"Bearer{token}"}, {"X-Authorization": f"Bearer {token}"}]
    for _ in range(scale):
        for method, path, body in endpoints:
            for header in headers:
                _probe(auth, server, method, path, {400, 401, 431}, body=body, headers=header,
                       bad=set(range(200, 300)), note=f"auth {sorted(header.values())[:1]!s:.40}")
    status, data = server.request("GET", f"/v1/chunks/{key}", tenant="alice")
    _check(auth, status == 200 and data == chunk, f"alice's chunk after the auth probes: HTTP {status}")


def _tenant_probes(server: Server, tenant: Tally, scale: int, seed: int, key: str, chunk: bytes) -> None:
    """Bob aims at Alice's chunk and context; then 8 threads of both write and read one key at once."""
    from kvlife.store.base import ChunkCorrupt
    from kvlife.store.envelope import open_chunk

    _probe(tenant, server, "GET", f"/v1/chunks/{key}", {404}, tenant="bob", bad={200},
           note="bob reads alice's")
    status, data = server.request("POST", "/v1/exists", json.dumps({"keys": [key]}).encode(), tenant="bob")
    _check(tenant, status == 200 and json.loads(data)["exists"] == [False],
           f"bob's exists of alice's key: {status}")
    _probe(tenant, server, "DELETE", f"/v1/chunks/{key}", {200, 404}, tenant="bob",
           note="bob deletes alice's")
    _probe(tenant, server, "GET", "/v1/contexts/alice-ctx/manifest", {404}, tenant="bob", bad={200})
    _probe(tenant, server, "DELETE", "/v1/contexts/alice-ctx", {404}, tenant="bob", bad={200})
    status, data = server.request("GET", "/v1/contexts", tenant="bob")
    _check(tenant, status == 200 and b"alice-ctx" not in data, f"bob's context list: {data[:80]!r}")
    status, data = server.request("GET", "/v1/stats", tenant="bob")
    _check(tenant, status == 200 and not json.loads(data).get("chunks"), f"bob's stats: {data[:120]!r}")
    status, data = server.request("GET", f"/v1/chunks/{key}", tenant="alice")
    _check(tenant, status == 200 and data == chunk, f"alice's chunk after bob's delete: HTTP {status}")
    status, data = server.request("GET", "/v1/contexts/alice-ctx/manifest", tenant="alice")
    _check(tenant, status == 200 and b"alice's" in data, f"alice's context after bob's delete: HTTP {status}")

    shared = hashlib.sha256(b"shared-key").hexdigest()
    lock = threading.Lock()

    def hammer(thread: int) -> None:  # each tenant reads back its own bytes under the key, never the other's
        own = "alice" if thread % 2 else "bob"
        local = random.Random(seed * 31 + thread)
        for _ in range(12 * scale):
            payload = f"{own}:{local.random()}".encode() * 50
            try:
                put = server.request("PUT", f"/v1/chunks/{shared}", _sealed(shared, payload), tenant=own)[0]
                status, data = server.request("GET", f"/v1/chunks/{shared}", tenant=own)
            except OSError as exc:
                with lock:
                    tenant.add("crash", note=f"{own}: {type(exc).__name__}: {exc}")
                continue
            try:
                mine = status == 200 and open_chunk(shared, data).startswith(own.encode())
            except ChunkCorrupt:
                mine = False
            with lock:
                if put >= 500 or status >= 500:
                    tenant.add("crash", note=f"{own}: HTTP {put}/{status}")
                elif status == 200 and not mine:
                    tenant.add("wrong_data", note=f"{own} read another tenant's bytes")
                else:
                    tenant.add("accepted")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _traversal_probes(server: Server, traversal: Tally, scale: int, root: Path, key: str) -> None:
    """Chunk keys and context ids that try to leave Alice's directory: 400/404, nothing read or written."""
    key_b = hashlib.sha256(b"bob-chunk").hexdigest()
    server.request("PUT", f"/v1/chunks/{key_b}", _sealed(key_b, b"bob's secret"), tenant="bob")
    targets = ["../../../canary.txt", "..%2F..%2F..%2Fcanary.txt", "%2e%2e%2f%2e%2e%2fcanary.txt",
               f"../bob/{key_b[:2]}/{key_b}.kvc", f"..%2Fbob%2F{key_b[:2]}%2F{key_b}.kvc", "/etc/passwd",
               "%2Fetc%2Fpasswd", key.upper(), key[:63], key + "0", key + "%00", key + "/..",
               f"{key[:2]}/{key}", "." * 64, "%00" * 10, "%C3%A9" * 32, "~root", "..", "%2e%2e"]
    for _ in range(scale):
        for target in targets:
            path = target if target.startswith("/") else f"/v1/chunks/{target}"
            for method, body in (("GET", None), ("DELETE", None), ("PUT", _sealed(key, b"x"))):
                _probe(traversal, server, method, path, {400, 404, 405}, body=body, tenant="alice",
                       bad={200, 201}, note="chunk")
            if not any(mark in target.lower() for mark in ("..", "/", "%2f", "%2e", "%00")):
                continue  # a context id of its own (contexts are the tenant's to name), not a way out
            context = target.replace(key, "ctx")
            _probe(traversal, server, "GET", f"/v1/contexts/{context}/manifest", {400, 404, 405},
                   tenant="alice", bad={200}, note="context")
            _probe(traversal, server, "PUT", f"/v1/contexts/{context}", {400, 404, 405},
                   body=json.dumps({"manifest": {}, "chunks": []}).encode(), tenant="alice", bad={200, 201},
                   note="context put")
    outside = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                     if p.is_file() and not p.is_relative_to(server.root))
    _check(traversal, outside == ["canary.txt"] and (root / "canary.txt").read_text() == "outside the store",
           f"files outside the store: {outside}")
    status, data = server.request("GET", f"/v1/chunks/{key_b}", tenant="bob")
    _check(traversal, status == 200 and data.endswith(b"bob's secret"),
           f"bob's chunk after the probes: HTTP {status}")


# ---- the campaign -------------------------------------------------------------------------------------

def campaign(scale: int = 1, parts: tuple[str, ...] = ("codec", "store", "server"), seed: int = 0) -> dict:
    """Run the parts at `scale` and return the results (the JSON this script writes, without machine info)."""
    tallies: dict[str, Tally] = {}
    extra: dict = {}
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="kvlife-reliability-"))
    try:
        if "store" in parts:  # first: its writers fork, which wants a process without torch's threads
            (root / "disk").mkdir()
            run_store(20 * scale, seed, root / "disk", tallies, extra)
        if "server" in parts:
            (root / "server").mkdir()
            run_server(scale, seed, root / "server", tallies)
        if "codec" in parts:
            run_codec(scale, seed, tallies)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"scale": scale, "seed": seed, "wall_s": round(time.monotonic() - started, 1),
            "cases": {name: tallies[name].row() for name in sorted(tallies)},
            "examples": {name: t.examples for name, t in sorted(tallies.items()) if t.examples}, **extra}


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--codec-worker"]:
        codec_worker(*(int(a) for a in argv[1:4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=4, help="inputs per case: 1 is what CI runs")
    parser.add_argument("--parts", default="codec,store,server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = campaign(args.scale, tuple(args.parts.split(",")), args.seed)
    results = {"schema": "reliability/1", "commit": _commit(),
               "command": "python benchmarks/reliability.py " + " ".join(argv),
               "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, python "
                          f"{platform.python_version()}, {platform.system()} {platform.release()}",
               "memory_cap_mb": MEMORY_CAP >> 20, **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'case':22} {'tried':>6} {'clean':>6} {'accept':>6} {'crash':>6} {'hang':>5} {'wrong':>6} "
          f"{'rss MB':>7}")
    for name, row in results["cases"].items():
        print(f"{name:22} {row['tried']:6} {row['clean_error']:6} {row['accepted']:6} {row['crash']:6} "
              f"{row['hang']:5} {row['wrong_data']:6} {row['max_rss_mb']:7.1f}")
    print(f"{results['wall_s']} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
