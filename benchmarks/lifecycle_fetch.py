"""benchmarks/lifecycle.py --fetch: the saved rows' stored bytes timed over `kvlife serve`'s shaped link (no
model is run)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from kvlife import models

RAW = "raw"


def fetch_rows(lifecycle, keys: list[tuple]) -> None:
    """Time one context of each row through `kvlife serve --trace constant:100mbit`: a compressed row's
    stored entry (read from the disk tier) streamed in pieces (`stream_entry`), or a blob of the stored
    chunks' size (dense)."""
    import hashlib
    import os
    import socket
    import tempfile

    from kvlife.store.envelope import open_chunk, seal_chunk
    from kvlife.store.remote import RemoteBackend
    from kvlife.stream import StreamClient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tempfile.mkdtemp(prefix="lifecycle-serve-")
    server_command = [sys.executable, "-m", "kvlife.store.server", "--store", root, "--port", str(port),
                      "--token", "lifecycle", "--trace", "constant:100mbit", "--max-chunk-bytes", "4e9"]
    server = subprocess.Popen(server_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        remote = RemoteBackend(f"http://127.0.0.1:{port}", token="lifecycle", timeout_s=600)
        for _ in range(100):
            try:
                remote.stats()
                break
            except Exception:
                time.sleep(0.2)
        for key in keys:
            path = lifecycle.row_path(key)
            if not path.exists():
                continue
            row = json.loads(path.read_text())
            payload = None
            if row.get("stored_key"):
                blob = lifecycle.store(row["encoding"]).tiers[0].get(row["stored_key"])
                payload = open_chunk(row["stored_key"], blob) if blob else None
            if payload is not None and row["recipe"] != "dense" and streamed_level(row) is not None:
                if row.get("fetch_path") != "stream-pieces":  # rows timed as one blob are timed again
                    client = StreamClient(f"http://127.0.0.1:{port}", "lifecycle", timeout_s=600)
                    stream_entry(lifecycle, client, row, payload)
                    path.write_text(json.dumps(row, indent=2))
                continue
            if row.get("fetch_100mbit_s") is not None:
                continue
            if payload is None:
                payload = os.urandom(int(row["bytes_per_token"] * row["context_tokens"]))
            name = hashlib.sha256(payload).hexdigest()
            remote.put(name, seal_chunk(name, payload))
            started = time.perf_counter()
            fetched = remote.get_many([name])[0]
            row["fetch_100mbit_s"] = round(time.perf_counter() - started, 3)
            row["fetch_bytes"] = len(fetched or b"")
            path.write_text(json.dumps(row, indent=2))
            print(f"# fetch {path.stem}: {row['fetch_bytes']:,} bytes in {row['fetch_100mbit_s']} s",
                  flush=True)
    finally:
        server.terminate()
        server.wait(10)

def streamed_level(row: dict) -> str | None:
    """The level a row's entry streams at (raw or a codec level of the streaming ladder), None for a level
    off the ladder (`sparse`: its entry is timed as one blob of its bytes)."""
    from kvlife.store.profiles import split_encoding
    from kvlife.stream.pieces import PIECE_LEVELS

    base = split_encoding(row["encoding"])[0]
    level = RAW if base == RAW else base.split(":", 1)[1]
    return level if level in PIECE_LEVELS else None


def stream_entry(lifecycle, client, row: dict, payload: bytes) -> None:
    """A compressed context's stored entry put on the server as `kvlife stream put --method` puts it
    (pieces of one layer, at the row's encoding) and fetched as `kvlife fetch` fetches it, timed. No model
    is loaded: the entry's key stands in for the model fingerprint and the token ids are placeholders of
    the context's length (their bytes are in the manifest, as real ids would be)."""
    from transformers import AutoConfig

    from kvlife.codec import rope_from_config
    from kvlife.store import profiles
    from kvlife.store.entries import decode_entry
    from kvlife.stream.pieces import build_pieces

    layers = decode_entry(payload)
    level = streamed_level(row)
    rope = (None if level == "raw"
            else rope_from_config(AutoConfig.from_pretrained(models.resolve(lifecycle.args.model))))
    source = profiles.split_encoding(row["encoding"])[1]  # a +profile encoding: the same profile
    shipped = profiles.PROFILE_DIR / f"{lifecycle.args.model}.json"
    weights = None if source is None else list(profiles.load(source or shipped).weights)
    context_id = "lifecycle-" + row["stored_key"][:16]
    context = build_pieces(layers, list(range(row["context_tokens"])), context_id, row["stored_key"],
                           lifecycle.args.dtype, row["recipe"], row["recipe"], [level], 1, rope,
                           weights=weights)
    client.put(context)
    fetched, report = client.fetch_pieces(context_id, slo=600.0, policy=level)
    assert len(fetched) == len(layers) and report.options() == [level] * len(layers)
    row["fetch_100mbit_s"], row["fetch_bytes"] = round(report.ready_s, 3), report.bytes
    row["fetch_pieces"], row["fetch_path"] = len(layers), "stream-pieces"
    print(f"# fetch {row['recipe']} {row['encoding']} {row['task']}: {len(layers)} pieces, "
          f"{report.bytes:,} bytes in {row['fetch_100mbit_s']} s", flush=True)

