"""Chunk keys: token chunks hashed as a chain, each hash covering the whole prefix and a namespace.

    h_0 = sha256(namespace)          namespace = model fingerprint, dtype, recipe, encoding, chunk size, salt
    h_i = sha256(h_{i-1} || tokens[(i-1)*C : i*C] as int64 LE)

Chunk i's key is h_{i+1}.hex(): equal keys mean the same model, dtype, recipe, encoding, salt and
the same tokens from position 0 to the end of the chunk (as nano-vllm and vLLM hash blocks). Prefix
reuse keys whole chunks only (a tail shorter than `chunk_size` is recomputed); a streamed context
keys its tail too (`tail=True`), since its chunks are fetched by a manifest, never looked up.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

KEY_FORMAT = "kvlife-store/1"
# the recipe part of a prefix chunk's namespace: a dense, uncompressed prefill
DENSE_PREFILL = "dense-prefill"


@dataclass(frozen=True)
class Namespace:
    model: str  # model_fingerprint(model)
    dtype: str
    recipe: str  # what shaped the stored cache (DENSE_PREFILL: the only kind stored today)
    encoding: str  # "raw" or a codec scheme, e.g. "kvlife:balanced", "int8+zstd"
    chunk_size: int = 256
    # keeps key spaces apart (a tenant's; a streamed context's codec header): never share a key
    salt: str = ""

    def digest(self) -> bytes:
        described = json.dumps({"format": KEY_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(described.encode()).digest()


def chunk_keys(token_ids: Sequence[int], namespace: Namespace, tail: bool = False) -> list[str]:
    """One key per whole chunk of `token_ids`, chained from the namespace; with `tail`, one more for the last
    partial chunk, if any."""
    size = namespace.chunk_size
    ids = np.asarray(token_ids, dtype="<i8")
    digest = namespace.digest()
    keys = []
    stop = len(ids) if tail else len(ids) - size + 1
    for start in range(0, max(stop, 0), size):
        digest = hashlib.sha256(digest + ids[start:start + size].tobytes()).digest()
        keys.append(digest.hex())
    return keys
