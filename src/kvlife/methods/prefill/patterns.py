"""MInference pattern configs: which sparse pattern (and sizes) each attention head uses.

A config is JSON, written by `kvlife search-patterns` (kvlife/methods/prefill/search.py):

    {"format": "kvlife-patterns/1", "model": "qwen2.5-coder-0.5b", "n_layers": 24, "q_heads": 14,
     "max_tokens": 32768, "calibration": {...}, "target_recall": 0.95,
     "layers": [[{"pattern": "vertical_slash", "vertical_size": 1000, "slash_size": 2048,
                  "recall": 0.97, "density": 0.21}, ... one entry per query head], ... one list per layer]}

Patterns and their sizes (all in tokens, except `top_k` in 64-token key blocks):
    vertical_slash  vertical_size, slash_size: top columns and diagonals from the last queries
    block_sparse    top_k: key blocks per query block from mean-pooled queries and keys
    a_shape         n_init, n_local: static sinks plus sliding window
    dense           (none): full attention (e.g. sliding-window layers)
`recall` and `density` are what the search measured; they are informative only. A size larger than
`max_tokens` (the longest sequence the config is meant for) is an error; on a shorter sequence sizes
are clamped to it, as budgets are everywhere in kvlife.

Shipped configs live in kvlife/configs/<model>.json and are named by model:
`minference(config=qwen2.5-coder-0.5b)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kvlife.errors import SpecError
from kvlife.methods import config_files

FORMAT = "kvlife-patterns/1"
CONFIG_DIR = config_files.CONFIG_ROOT
PATTERNS: dict[str, tuple[str, ...]] = {
    "vertical_slash": ("vertical_size", "slash_size"),
    "block_sparse": ("top_k",),
    "a_shape": ("n_init", "n_local"),
    "dense": (),
}


@dataclass(frozen=True)
class HeadPattern:
    pattern: str
    sizes: dict[str, int]

    def size(self, name: str) -> int:
        return self.sizes[name]


@dataclass(frozen=True)
class PatternConfig:
    path: str
    model: str
    n_layers: int
    q_heads: int
    max_tokens: int
    layers: tuple[tuple[HeadPattern, ...], ...]

    def heads(self, layer: int, n_layers: int, q_heads: int) -> tuple[HeadPattern, ...]:
        if (n_layers, q_heads) != (self.n_layers, self.q_heads):
            raise SpecError(
                f"minference: pattern config {self.path} is for a model with {self.n_layers} layers x "
                f"{self.q_heads} query heads ({self.model}); this model has {n_layers} x {q_heads}: "
                "run `kvlife search-patterns` for it")
        return self.layers[layer]


def shipped() -> list[str]:
    return config_files.shipped(CONFIG_DIR)


def resolve(name_or_path: str) -> Path:
    return config_files.resolve(name_or_path, CONFIG_DIR, "minference", "pattern config",
                                "write one with `kvlife search-patterns --model M --out FILE`")


def load(name_or_path: str) -> PatternConfig:
    """Read and check a pattern config; any problem is a one-line SpecError."""
    path = resolve(name_or_path)
    return _load(str(path.resolve()), path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> PatternConfig:
    raw = config_files.read_json(path, "minference", "pattern config")
    where = f"pattern config {path}"
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SpecError(f'minference: {where} is not a kvlife pattern config (expected "format": "{FORMAT}")')
    try:
        n_layers, q_heads, max_tokens = int(raw["n_layers"]), int(raw["q_heads"]), int(raw["max_tokens"])
        layers = raw["layers"]
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"minference: {where} lacks a valid {exc} field") from None
    if not isinstance(layers, list) or len(layers) != n_layers:
        raise SpecError(f"minference: {where} must list {n_layers} layers, one list of heads each")
    parsed = []
    for layer, heads in enumerate(layers):
        if not isinstance(heads, list) or len(heads) != q_heads:
            raise SpecError(f"minference: {where}: layer {layer} must list {q_heads} heads")
        parsed.append(tuple(_head(entry, f"{where}: layer {layer} head {head}", max_tokens)
                            for head, entry in enumerate(heads)))
    return PatternConfig(path, str(raw.get("model", "?")), n_layers, q_heads, max_tokens, tuple(parsed))


def _head(entry: object, where: str, max_tokens: int) -> HeadPattern:
    if not isinstance(entry, dict) or "pattern" not in entry:
        raise SpecError(f"minference: {where}: expected an object with a \"pattern\"")
    pattern = entry["pattern"]
    if pattern not in PATTERNS:
        raise SpecError(f"minference: {where}: unknown pattern {pattern!r}; valid: {', '.join(PATTERNS)}")
    sizes = {}
    for name in PATTERNS[pattern]:
        value, least = entry.get(name), 0 if name == "n_init" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise SpecError(
                f"minference: {where}: {pattern} needs an integer {name} >= {least}, got {value!r}"
            )
        tokens = value * 64 if name == "top_k" else value
        if tokens > max_tokens:
            raise SpecError(f"minference: {where}: {name}={value} is larger than the sequence "
                            f"the config is for (max_tokens {max_tokens})")
        sizes[name] = value
    return HeadPattern(pattern, sizes)


def write(path: str | Path, config: dict) -> None:
    """Write a config dict (as `search` builds it) with one head per line, readable in a diff."""
    layers = config["layers"]
    head = {k: v for k, v in config.items() if k != "layers"}
    lines = json.dumps(head, indent=2)[:-2] + ',\n  "layers": [\n'
    lines += ",\n".join("    [\n" + ",\n".join("      " + json.dumps(entry) for entry in heads) + "\n    ]"
                        for heads in layers)
    Path(path).write_text(lines + "\n  ]\n}\n")
