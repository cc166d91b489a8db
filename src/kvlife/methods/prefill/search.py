"""Offline pattern search for MInference: `kvlife search-patterns --model M --out FILE`.

One dense prefill of a calibration sample (Python standard-library sources: real, long-range text
that tokenizes the same everywhere). At every full-attention layer, each query head's exact
attention is computed for a random sample of query rows; every candidate pattern is estimated
exactly as `minference` would at run time, and scored by the attention mass it keeps on those rows
(recall) and the share of causal query-key pairs it computes (density). Each head gets the cheapest
candidate whose recall reaches the target, or, if none does, the one with the highest recall.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kvlife import models
from kvlife.attention import AttnCall, StepContext, dense_attention, use_kvlife_attention
from kvlife.cache import KVCache, cache_kwarg
from kvlife.errors import SpecError
from kvlife.methods.base import PrefillMethod
from kvlife.methods.prefill import patterns
from kvlife.methods.prefill.kernels import BLOCK, layout_mask, plain_causal
from kvlife.methods.prefill.minference import pattern_layouts
from kvlife.methods.prefill.patterns import HeadPattern

CANDIDATES: tuple[HeadPattern, ...] = (
    *(HeadPattern("vertical_slash", {"vertical_size": v, "slash_size": s})
      for v in (100, 300, 1000, 2000) for s in (128, 256, 512, 1024, 2048, 4096)),
    *(HeadPattern("block_sparse", {"top_k": k}) for k in (4, 8, 16, 32, 64, 128)),
    *(HeadPattern("a_shape", {"n_init": 128, "n_local": w}) for w in (256, 512, 1024, 2048, 4096)),
)


def stdlib_ids(tokenizer: Any, tokens: int, first: str = "a") -> list[int]:
    """`tokens` token ids of the Python standard library's top-level modules, in name order from
    the first module whose name is >= `first` (the benchmark reads other modules than the search)."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.name >= first)
    ids: list[int] = []
    for path in files:
        ids += tokenizer.encode(
            f"# file: {path.name}\n{path.read_text(errors='replace')}\n", add_special_tokens=False
        )
        if len(ids) >= tokens:
            return ids[:tokens]
    raise SpecError(f"the standard library holds fewer than {tokens} tokens from {first!r} on")


def score_candidates(
    call: AttnCall, rows: torch.Tensor, candidates=CANDIDATES, last_q: int = 64
) -> list[list[dict]]:
    """Per query head, [{pattern, sizes, recall, density}] for every candidate, on query `rows`."""
    n, q_heads = call.query.shape[2], call.query.shape[1]
    keys = torch.arange(n, device=rows.device)
    causal = keys[None] <= rows[:, None]
    probs = []  # exact attention of the sampled rows, per head [rows, n]
    for head in range(q_heads):
        scores = torch.matmul(call.query[0, head, rows].float(), call.key[0, head // call.groups].float().T)
        scores = scores * call.scaling
        if call.softcap is not None:
            scores = torch.tanh(scores / call.softcap) * call.softcap
        probs.append(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
    results: list[list[dict]] = [[] for _ in range(q_heads)]
    total = float(causal.sum())
    estimates: dict = {}
    for candidate in candidates:
        layouts = pattern_layouts(call, (candidate,) * q_heads, last_q, estimates)
        for head in range(q_heads):
            if layouts is None:
                recall, density = 1.0, 1.0
            else:
                mask = layout_mask(layouts[head], n, rows)
                recall = float((probs[head] * mask).sum()) / len(rows)
                density = float(mask.sum()) / total
            results[head].append({"pattern": candidate.pattern, **candidate.sizes,
                                  "recall": round(recall, 4), "density": round(density, 4)})
    return results


def choose(scored: list[dict], target_recall: float) -> dict:
    """The cheapest candidate reaching the target recall, else the one with the highest recall."""
    good = [entry for entry in scored if entry["recall"] >= target_recall]
    if good:
        return min(good, key=lambda e: (e["density"], -e["recall"]))
    return max(scored, key=lambda e: (e["recall"], -e["density"]))


class PatternSearch(PrefillMethod):
    """Dense attention that, on each full-attention layer, scores every candidate pattern per head."""

    name = "pattern_search"

    def __init__(self, target_recall: float, rows: int, seed: int = 0, candidates=CANDIDATES) -> None:
        self.target_recall, self.rows, self.seed, self.candidates = target_recall, rows, seed, candidates
        self.layers: dict[int, list[dict]] = {}

    def attend(self, call: AttnCall) -> torch.Tensor:
        out = dense_attention(call)
        n = call.query.shape[2]
        if call.is_sliding or n <= BLOCK or not plain_causal(call):
            self.layers[call.layer_idx] = [{"pattern": "dense"}] * call.query.shape[1]
            return out
        generator = torch.Generator().manual_seed(self.seed + call.layer_idx)
        count = min(self.rows, n - BLOCK)
        rows = (
            (torch.randperm(n - BLOCK, generator=generator)[:count] + BLOCK)
            .sort()
            .values.to(call.query.device)
        )
        scored = score_candidates(call, rows, self.candidates)
        self.layers[call.layer_idx] = [choose(head, self.target_recall) for head in scored]
        return out


@torch.no_grad()
def search(model: Any, tokenizer: Any, model_name: str, tokens: int = 16384, target_recall: float = 0.95,
           rows: int = 256, candidates=CANDIDATES, ids: list[int] | None = None, log=print) -> dict:
    """Run the search on one calibration sample; returns the config dict (see patterns.py)."""
    if not 0 < target_recall <= 1:
        raise SpecError(f"search-patterns: --recall must be in (0, 1], got {target_recall}")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_tokens = int(getattr(config, "max_position_embeddings", 0) or tokens)
    tokens = len(ids) if ids is not None else tokens
    if tokens > max_tokens:
        raise SpecError(
            f"search-patterns: --tokens {tokens} is longer than the model's {max_tokens} positions"
        )
    ids = ids if ids is not None else stdlib_ids(tokenizer, tokens)
    device = next(use_kvlife_attention(model).parameters()).device
    searcher = PatternSearch(target_recall, rows, candidates=candidates)
    cache = KVCache.for_model(model)
    positions = torch.arange(len(ids), device=device)
    step = StepContext(cache, positions, phase="prefill",
                       recipe=SimpleNamespace(prefill=searcher, load=None, compress=None))
    started = time.perf_counter()
    model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=positions[None],
        **cache_kwarg(model, cache),
        use_cache=True,
        logits_to_keep=1,
        kvlife=step,
    )
    n_layers, q_heads = config.num_hidden_layers, config.num_attention_heads
    layers = [searcher.layers.get(layer, [{"pattern": "dense"}] * q_heads) for layer in range(n_layers)]
    chosen = [entry for heads in layers for entry in heads if entry["pattern"] != "dense"]
    summary = {
        "mean_recall": round(sum(e["recall"] for e in chosen) / max(1, len(chosen)), 4),
        "mean_density": round(sum(e["density"] for e in chosen) / max(1, len(chosen)), 4),
        "patterns": {p: sum(e["pattern"] == p for heads in layers for e in heads) for p in patterns.PATTERNS},
    }
    log(
        f"searched {n_layers} layers x {q_heads} heads on {len(ids)} tokens in "
        f"{time.perf_counter() - started:.0f} s: mean recall {summary['mean_recall']}, mean density "
        f"{summary['mean_density']}, {summary['patterns']}"
    )
    return {
        "format": patterns.FORMAT, "model": model_name, "n_layers": n_layers, "q_heads": q_heads,
        "max_tokens": max_tokens, "target_recall": target_recall,
        "calibration": {"tokens": len(ids), "text": "Python standard library sources (top-level modules a..)",
                        "rows": rows, "candidates": len(candidates)},
        "summary": summary, "layers": layers,
    }


def cmd_search_patterns(args: argparse.Namespace) -> int:
    model, tokenizer = models.load(args.model)
    config = search(model, tokenizer, models.model_name(args.model), tokens=args.tokens,
                    target_recall=args.recall, rows=args.rows)
    patterns.write(args.out, config)
    patterns.load(args.out)  # what we wrote must read back
    print(f"wrote {args.out}: use it as minference(config={args.out})")
    return 0


def add_parser(sub: Any) -> None:
    """The `kvlife search-patterns` subcommand."""
    parser = sub.add_parser(
        "search-patterns",
        help="search MInference's per-head sparse patterns (writes JSON)",
        description="Pick each attention head's sparse prefill pattern and sizes by the "
        "attention mass it keeps on a calibration sample.",
    )
    parser.add_argument("--model", default=models.DEFAULT_MODEL,
                        help=f"registered model name or HF dir (default {models.DEFAULT_MODEL})")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration sample length (default 16384)")
    parser.add_argument(
        "--recall", type=float, default=0.95, help="attention mass each head must keep (default 0.95)"
    )
    parser.add_argument("--rows", type=int, default=256, help="query rows sampled per layer (default 256)")
    parser.set_defaults(func=cmd_search_patterns)
