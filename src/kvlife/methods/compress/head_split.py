"""DuoAttention head splits: how much each KV head needs the whole context (retrieval) or not (streaming).

A split is JSON, written by `kvlife search-heads` (kvlife/methods/compress/duo_search.py):

    {"format": "kvlife-duo-heads/1", "model": "qwen2.5-coder-0.5b", "signature": "3f0c...",
     "n_layers": 24, "kv_heads": 2, "n_sink": 64, "n_local": 256, "calibration": {...},
     "scores": [[0.0123, 0.4012], ... one list of kv_heads scores per layer, null for sliding layers]}

A head's score is how much the answers to passkey questions depend on it seeing more than the
first `n_sink` and last `n_local` context tokens (the gradient of their NLL with respect to
DuoAttention's gate of that head; higher: a retrieval head). `signature` identifies the
model (`model_signature`): `duo_attention` without `config=` uses the shipped split whose signature
matches the running model. Shipped splits live in kvlife/configs/duo_heads/<model>.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvlife.errors import SpecError
from kvlife.methods import config_files
from kvlife.models import model_signature, shipped_for  # splits are matched by it (duo_search records it)

FORMAT = "kvlife-duo-heads/1"
SPLIT_DIR = config_files.CONFIG_ROOT / "duo_heads"


@dataclass(frozen=True)
class HeadSplit:
    path: str
    model: str
    signature: str
    n_sink: int
    n_local: int
    scores: tuple[tuple[float, ...] | None, ...]  # [layer][kv_head], None for a sliding layer

    def check(self, n_layers: int, kv_heads: int) -> None:
        width = next((len(row) for row in self.scores if row is not None), kv_heads)
        if (len(self.scores), width) != (n_layers, kv_heads):
            raise SpecError(
                f"duo_attention: head split {self.path} is for a model with {len(self.scores)} layers x "
                f"{width} KV heads ({self.model}); this model has {n_layers} x {kv_heads}: run "
                "`kvlife search-heads` for it")


def shipped() -> list[str]:
    return config_files.shipped(SPLIT_DIR)


def resolve(name_or_path: str) -> Path:
    return config_files.resolve(name_or_path, SPLIT_DIR, "duo_attention", "head split",
                                "write one with `kvlife search-heads --model M --out FILE`")


def load(name_or_path: str) -> HeadSplit:
    """Read and check a head split; any problem is a one-line SpecError."""
    path = resolve(name_or_path)
    return _load(str(path.resolve()), path.stat().st_mtime_ns)


def for_model(model: Any) -> HeadSplit:
    """The shipped split made for `model` (matched by signature), or a SpecError saying what to do."""
    split = shipped_for(model, SPLIT_DIR, load)
    if split is None:
        raise SpecError(f"duo_attention: no shipped head split for this model (signature "
                        f"{model_signature(model)}; shipped: {', '.join(shipped()) or 'none'}); run "
                        "`kvlife search-heads --model M --out FILE` and give duo_attention(config=FILE)")
    return split


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> HeadSplit:
    raw = config_files.read_json(path, "duo_attention", "head split")
    where = f"duo_attention: head split {path}"
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SpecError(f"{where} is not a kvlife head split (expected \"format\": \"{FORMAT}\")")
    try:
        n_layers, kv_heads = int(raw["n_layers"]), int(raw["kv_heads"])
        n_sink, n_local, rows = int(raw["n_sink"]), int(raw["n_local"]), raw["scores"]
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{where} lacks a valid {exc} field") from None
    if n_sink < 0 or n_local < 1:
        raise SpecError(f"{where}: n_sink must be >= 0 and n_local >= 1")
    if not isinstance(rows, list) or len(rows) != n_layers:
        raise SpecError(f"{where} must list {n_layers} layers of scores")
    scores = []
    for layer, row in enumerate(rows):
        numbers = isinstance(row, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in row)
        if row is not None and (not numbers or len(row) != kv_heads):
            raise SpecError(f"{where}: layer {layer} must list {kv_heads} numbers "
                            "(or null for a sliding layer)")
        scores.append(None if row is None else tuple(float(v) for v in row))
    return HeadSplit(path, str(raw.get("model", "?")), str(raw.get("signature", "")), n_sink, n_local,
                     tuple(scores))


def write(path: str | Path, split: dict) -> None:
    """Write a split dict (as the search builds it) with one layer per line, readable in a diff."""
    head = {key: value for key, value in split.items() if key != "scores"}
    text = json.dumps(head, indent=2)[:-2] + ',\n  "scores": [\n'
    text += ",\n".join("    " + json.dumps(row) for row in split["scores"])
    Path(path).write_text(text + "\n  ]\n}\n")
