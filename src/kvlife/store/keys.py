"""Chunk keys: token chunks hashed as a chain, each hash covering the whole prefix and a namespace.

    h_0 = sha256(namespace)          namespace = model fingerprint, dtype, recipe, encoding, chunk size, salt
    h_i = sha256(h_{i-1} || tokens[(i-1)*C : i*C] as int64 LE)

Chunk i's key is h_{i+1}.hex(): equal keys mean the same model, dtype, recipe, encoding, tenant
salt and the same tokens from position 0 to the end of the chunk (as nano-vllm and vLLM hash blocks).
Only whole chunks get keys; a tail shorter than `chunk_size` is always recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

KEY_FORMAT = "kvlife-store/1"


@dataclass(frozen=True)
class Namespace:
    model: str  # model_fingerprint(model)
    dtype: str
    recipe: str  # what shaped the stored cache ("dense-prefill": the only kind stored today)
    encoding: str  # "raw" or a codec scheme, e.g. "kvlife:balanced", "int8+zstd"
    chunk_size: int = 256
    salt: str = ""  # tenant salt: different salts never share a key

    def digest(self) -> bytes:
        return hashlib.sha256(json.dumps({"format": KEY_FORMAT, **asdict(self)}, sort_keys=True).encode()).digest()


def chunk_keys(token_ids: Sequence[int], namespace: Namespace) -> list[str]:
    """One key per whole chunk of `token_ids`, chained from the namespace."""
    size = namespace.chunk_size
    ids = np.asarray(token_ids, dtype="<i8")
    digest = namespace.digest()
    keys = []
    for start in range(0, len(ids) - size + 1, size):
        digest = hashlib.sha256(digest + ids[start:start + size].tobytes()).digest()
        keys.append(digest.hex())
    return keys


def model_fingerprint(model: Any) -> str:
    """A short hash of a model's config and a sample of its weights (cached on the model)."""
    cached = getattr(model, "_kvlife_fingerprint", None)
    if cached:
        return cached
    import torch

    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for tensor in (params[0], params[len(params) // 2], params[-1]):
        sample = tensor.detach().flatten()[:4096].to("cpu", torch.float32).contiguous()
        digest.update(sample.numpy().tobytes())
    fingerprint = digest.hexdigest()[:32]
    try:
        model._kvlife_fingerprint = fingerprint
    except AttributeError:
        pass
    return fingerprint
