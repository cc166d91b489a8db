"""Store benchmark: time to first token from a full prefill against a stored-prefix hit, per tier.

    flock /tmp/kvlife-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/store.py

For each context length (2K, 4K, 8K tokens of the default model) it prefills context + query once
(timed: the full-prefill TTFT), writes the resulting chunks into every tier, raw and codec-encoded,
then answers the same prompt from a fresh Session whose store is one tier alone (memory, disk,
a local redis-server, a `kvlife serve` process on loopback): that TTFT covers the lookup, the
transfer, the checksum, the decoding and the prefill of the uncached tail. It also measures bytes
stored per encoding and put/get throughput of each tier under 8 concurrent client threads.
Writes benchmarks/results/store.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from kvlife import models
from kvlife.backends.loopback import free_port
from kvlife.session import Session
from kvlife.store import KVStore
from kvlife.store.disk import DiskBackend
from kvlife.store.envelope import seal_chunk
from kvlife.store.keys import chunk_keys
from kvlife.store.memory import MemoryBackend
from kvlife.store.prefix import PrefixStore
from kvlife.store.redis_backend import RedisBackend
from kvlife.store.remote import RemoteBackend

TOKEN = "bench-token"
NOTES = (
    "ttft_s: median of the repeats, from the start of the turn's prefill to the first token; a hit covers "
    "lookup, transfer, checksum, decoding and the prefill of the uncached tail (tokens past the last whole "
    "chunk plus the query). Memory-tier throughput passes references in one process (no copy), so it is "
    "an upper bound, not a transfer rate. Other jobs shared the 2 CPUs while this ran."
)
QUERY = "Which key has the value that appears first in the document?"


def wait_for(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


def start_services(root: Path) -> tuple[list[subprocess.Popen], str, str]:
    import httpx
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (scripts/setup.sh installs it)")
    redis_port, http_port = free_port(), free_port()
    redis_proc = subprocess.Popen([binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL)
    server = subprocess.Popen([sys.executable, "-m", "kvlife.store.server", "--store", str(root / "served"),
                               "--port", str(http_port), "--token", TOKEN], stdout=subprocess.DEVNULL)
    redis_url, http_url = f"redis://127.0.0.1:{redis_port}/0", f"http://127.0.0.1:{http_port}"
    wait_for(lambda: redis.Redis.from_url(redis_url).ping(), "redis-server")
    wait_for(lambda: httpx.get(http_url + "/v1/health").status_code == 200, "kvlife serve")
    return [redis_proc, server], redis_url, http_url


def make_context(tokenizer, n_tokens: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["alpha", "river", "stone", "copper", "lantern", "meadow", "signal", "harbor", "velvet", "ember"]
    lines = []
    while True:
        lines.append(f"Record {len(lines)}: the key {rng.choice(words)}_{rng.randint(100, 999)} holds "
                     f"{rng.randint(1000, 9999)}, filed near the {rng.choice(words)} {rng.choice(words)}.")
        if len(lines) % 50 == 0 and len(tokenizer.encode("\n".join(lines))) >= n_tokens:
            break
    ids = tokenizer.encode("\n".join(lines))[:n_tokens]
    return tokenizer.decode(ids)


def ttft(model, tokenizer, context: str, store=None) -> tuple[float, int, dict]:
    session = Session(model, tokenizer, "dense", mode="multi-turn", store=store)
    session.prefill(context)
    result = session.ask(QUERY, max_new_tokens=1, score_reference=False)
    first = result.output_ids[0] if result.output_ids else -1
    return result.ttft_s, first, {**(session.store.last if session.store else {}),
                                  "prompt_tokens": result.prompt_tokens}, session


def throughput(backend, blob_size: int, clients: int = 8, per_client: int = 4) -> dict:
    """Aggregate put then get rate of `clients` threads, each with `per_client` distinct chunks."""
    payload = os.urandom(blob_size)
    tag = os.urandom(8).hex()
    keys = [[f"{tag}{c:04d}{i:04d}".ljust(64, "0") for i in range(per_client)] for c in range(clients)]
    blobs = {k: seal_chunk(k, payload) for row in keys for k in row}
    total = sum(len(b) for b in blobs.values())

    def run(fn) -> float:
        threads = [threading.Thread(target=fn, args=(row,)) for row in keys]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - started

    errors = []

    def put(row):
        for k in row:
            backend.put(k, blobs[k])

    def get(row):
        for k, blob in zip(row, backend.get_many(row)):
            if blob != blobs[k]:
                errors.append(k)

    put_s, get_s = run(put), run(get)
    for row in keys:
        for k in row:
            backend.delete(k)
    return {
        "clients": clients,
        "chunks": clients * per_client,
        "chunk_bytes": len(next(iter(blobs.values()))),
        "put_MBps": round(total / put_s / 1e6, 1),
        "get_MBps": round(total / get_s / 1e6, 1),
        "put_chunks_per_s": round(clients * per_client / put_s, 1),
        "get_chunks_per_s": round(clients * per_client / get_s, 1),
        "get_errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--lengths", default="8192,4096,2048")  # longest first: the 10x target
    parser.add_argument("--encodings", default="raw,kvlife:balanced")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "store.json"))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    encodings = args.encodings.split(",")

    model, tokenizer = models.load(args.model)
    root = Path(tempfile.mkdtemp(prefix="kvlife-store-bench-"))
    procs, redis_url, http_url = start_services(root)
    results = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, "
        f"torch threads {torch.get_num_threads()}, {platform.system()} {platform.release()}".strip(),
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype),
        "chunk_tokens": args.chunk,
        "query": QUERY,
        "repeats": args.repeats,
        "notes": NOTES,
        "contexts": [],
        "throughput": {},
    }
    try:
        tiers = {
            "memory": lambda enc: MemoryBackend(16 << 30),
            "disk": lambda enc: DiskBackend(root / "disk" / enc.replace(":", "_")),
            "redis": lambda enc: RedisBackend(redis_url, ttl_s=3600),
            "remote": lambda enc: RemoteBackend(http_url, token=TOKEN),
        }
        backends = {(name, enc): make(enc) for enc in encodings for name, make in tiers.items()}
        sample_blob = None
        ttft(model, tokenizer, make_context(tokenizer, 64))  # warm-up: first-call allocations are not timed
        for length in lengths:
            context = make_context(tokenizer, length)
            full_s, full_first, _, session = ttft(model, tokenizer, context)
            row = {"context_tokens": len(session.context_ids), "prompt_tokens": len(session.context_ids)
                   + len(session.format.query_ids(QUERY)), "full_prefill_ttft_s": round(full_s, 3),
                   "kv_bytes": session.cache.bytes(), "encodings": {}}
            print(f"{length}: full prefill TTFT {full_s:.2f}s", flush=True)
            ids = session.context_ids + session.format.query_ids(QUERY)
            for enc in encodings:
                writer = PrefixStore(KVStore([backends[(name, enc)] for name in tiers], encoding=enc,
                                             chunk_size=args.chunk))
                keys = chunk_keys(ids, writer._namespace(model))
                started = time.perf_counter()
                stored = writer._put_new(session.cache, keys, 0, len(ids))
                entry = {
                    "chunks": len(keys),
                    "bytes_stored": stored,
                    "bytes_per_token": round(stored / (len(keys) * args.chunk), 1),
                    "encode_and_put_all_tiers_s": round(time.perf_counter() - started, 3),
                    "tiers": {},
                }
                if sample_blob is None and enc == "raw":
                    sample_blob = len(backends[("memory", enc)].get(keys[0]))
                for name in tiers:
                    times, firsts, last = [], [], {}
                    for _ in range(args.repeats):
                        store = KVStore([backends[(name, enc)]], encoding=enc, chunk_size=args.chunk)
                        seconds, first, last, _ = ttft(model, tokenizer, context, store=store)
                        times.append(seconds)
                        firsts.append(first)
                    median = statistics.median(times)
                    entry["tiers"][name] = {
                        "ttft_s": round(median, 4), "ttft_runs_s": [round(t, 4) for t in times],
                        "speedup": round(full_s / median, 1), "hit_tokens": last.get("store_hit_tokens"),
                        "fetch_s": last.get("store_fetch_s"), "decode_s": last.get("store_load_s"),
                        "tail_prefill_s": last.get("store_prefill_s"),
                        "same_first_token": all(f == full_first for f in firsts)}
                    print(f"  {enc:16s} {name:7s} TTFT {median:.3f}s  x{full_s / median:.1f}", flush=True)
                row["encodings"][enc] = entry
            results["contexts"].append(row)
            results["contexts"].sort(key=lambda r: r["context_tokens"])
            write(args.out, results)  # after each length, so that a cut-short run keeps what it measured
        for name, make in tiers.items():
            results["throughput"][name] = throughput(make("throughput"), sample_blob or (6 << 20))
            print(f"throughput {name}: {results['throughput'][name]}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
    write(args.out, results)
    print_table(results)


def write(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"time to first token, {results['model']} ({results['machine']})")
    for column in ("context", "full prefill", "encoding", "bytes/token", "memory", "disk", "redis", "remote"):
        table.add_column(column)
    for row in results["contexts"]:
        for enc, entry in row["encodings"].items():
            cells = [f"{t['ttft_s']:.3f}s x{t['speedup']}" + ("" if t["same_first_token"] else " *")
                     for t in entry["tiers"].values()]
            table.add_row(str(row["context_tokens"]), f"{row['full_prefill_ttft_s']:.2f}s", enc,
                          str(entry["bytes_per_token"]), *cells)
    console = Console()
    console.print(table)
    console.print("* first token differs from the full prefill's (lossy encoding)")
    tp = Table(title="throughput, 8 client threads")
    for column in ("tier", "chunk bytes", "put MB/s", "get MB/s", "put chunks/s", "get chunks/s"):
        tp.add_column(column)
    for name, t in results["throughput"].items():
        tp.add_row(
            name,
            str(t["chunk_bytes"]),
            str(t["put_MBps"]),
            str(t["get_MBps"]),
            str(t["put_chunks_per_s"]),
            str(t["get_chunks_per_s"]),
        )
    console.print(tp)


if __name__ == "__main__":
    main()
