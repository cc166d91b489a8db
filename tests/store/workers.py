"""Writer and reader processes for the store's concurrency and crash tests (run as a script).

    python workers.py writer TIER_URL SECONDS SEED [CHUNK_BYTES]
    python workers.py reader TIER_URL SECONDS

Writers put sealed chunks under a shared set of keys, each time with new content; readers read
them and check every envelope. A reader prints {"reads": n, "hits": n, "corrupt": n}.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time

KEYS = [hashlib.sha256(f"shared-{i}".encode()).hexdigest() for i in range(8)]


def main(argv: list[str]) -> None:
    from kvlife.store.base import ChunkCorrupt
    from kvlife.store.envelope import open_chunk, seal_chunk
    from kvlife.store.tiers import open_tier

    role, url, seconds = argv[0], argv[1], float(argv[2])
    tier = open_tier(url)
    deadline = time.monotonic() + seconds
    if role == "writer":
        rng = random.Random(int(argv[3]))
        size = int(argv[4]) if len(argv) > 4 else 300_000
        writes = 0
        print("ready", flush=True)
        while time.monotonic() < deadline:
            key = rng.choice(KEYS)
            tier.put(key, seal_chunk(key, os.urandom(rng.randint(size // 2, size))))
            writes += 1
        print(json.dumps({"writes": writes}), flush=True)
        return
    reads = hits = corrupt = 0
    while time.monotonic() < deadline:
        for key, blob in zip(KEYS, tier.get_many(KEYS)):
            reads += 1
            if blob is None:
                continue
            hits += 1
            try:
                open_chunk(key, blob)
            except ChunkCorrupt:
                corrupt += 1
    print(json.dumps({"reads": reads, "hits": hits, "corrupt": corrupt}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
