"""Sparse prefill attention: speed, kept attention mass and error against dense, on real Q/K/V.

    flock /tmp/kvlife-cpu.lock .venv/bin/python benchmarks/attention.py
        [--lengths 8192,16384,32768] [--layer 12] [--e2e 8192,16384] [--methods SPEC;SPEC...]

Layer benchmark: one attention layer of the default model (Qwen2.5-Coder-0.5B: 14 query heads,
2 KV heads, head_dim 64, float32) on Q/K/V captured from a real 32K-token prefill of Python
standard-library sources (the model run densely up to `--layer`; a causal model's first n tokens
have the same Q/K/V in any longer run, so shorter lengths are prefixes). Per method and length:
dense `scaled_dot_product_attention(is_causal=True)` time, the method's time including its index
estimation, the speed-up, the share of causal query-key pairs it computes (density; 1.0 where the
method falls back to dense), the attention mass kept (recall: the exact softmax of 256 random query
rows per head, summed over the keys the method computes; rows sampled uniformly) and the max
absolute output error against dense. Times are the best of `--repeats` runs, each method timed
between two timings of dense (the best of both is the reference).

End-to-end: the default model's prefill of 8K and 16K tokens with each method (one run each, after
a warm-up forward; dense timed before and after the methods, the best of both), with the NLL of
the last 255 tokens' next-token predictions against dense.

Writes benchmarks/results/attention.json (with a "machine" field) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from foundation import machine  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.attention import AttnCall, StepContext, dense_attention  # noqa: E402
from kvlife.cache import KVCache, cache_kwarg  # noqa: E402
from kvlife.methods.base import PrefillMethod  # noqa: E402
from kvlife.methods.prefill.search import stdlib_ids  # noqa: E402
from kvlife.methods.prefill.sparse import density  # noqa: E402
from kvlife.recipe import parse  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "attention.json"
MODEL = models.DEFAULT_MODEL
TEXT_FROM = "s"  # standard-library modules from "s" on (the pattern search calibrates on "a" on)
LAYER_METHODS = [
    "a_shape",
    "tri_shape",
    "minference",
    "minference(vertical_size=1000,slash_size=3072)",
    "minference(vertical_size=1000,slash_size=2048)",
    "minference(vertical_size=1000,slash_size=1024)",
    "minference(vertical_size=500,slash_size=1024)",
    "minference(pattern=block_sparse,top_k=32)",
    f"minference(config={MODEL})",
    "flexprefill",
]
E2E_METHODS = ["dense", "a_shape", "tri_shape", "minference", "minference(vertical_size=1000,slash_size=3072)",
               f"minference(config={MODEL})", "flexprefill"]


class _Captured(Exception):
    pass


class Capture(PrefillMethod):
    """Dense attention that keeps one layer's Q/K/V and stops the forward there."""

    name = "capture"

    def __init__(self, layer: int) -> None:
        self.layer, self.qkv = layer, None

    def attend(self, call: AttnCall) -> torch.Tensor:
        if call.layer_idx == self.layer:
            self.qkv = (call.query.clone(), call.key.clone(), call.value.clone(), call.scaling)
            raise _Captured
        return dense_attention(call)


def recipe_of(method: PrefillMethod):
    from types import SimpleNamespace

    return SimpleNamespace(prefill=method, load=None, compress=None)


@torch.no_grad()
def capture(model, ids: list[int], layer: int) -> tuple:
    path = models.kvlife_home() / "cache" / f"attention-qkv-{MODEL}-L{layer}-{len(ids)}.pt"
    if path.is_file():
        return torch.load(path)
    started = time.perf_counter()
    method = Capture(layer)
    cache = KVCache.for_model(model)
    positions = torch.arange(len(ids))
    try:
        model(input_ids=torch.tensor([ids]), position_ids=positions[None], **cache_kwarg(model, cache), use_cache=True,
              logits_to_keep=1, kvlife=StepContext(cache, positions, recipe=recipe_of(method)))
    except _Captured:
        pass
    print(f"captured layer {layer} Q/K/V of {len(ids)} tokens in {time.perf_counter() - started:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(method.qkv, path)
    return method.qkv


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def recall(method, call: AttnCall, rows: torch.Tensor) -> float:
    """Mean over query heads and sampled rows of the exact attention mass on the keys the method keeps."""
    mask = method.mask(call, rows)
    if mask is None:
        return 1.0
    n, groups = call.query.shape[2], call.groups
    causal = torch.arange(n)[None] <= rows[:, None]
    kept = 0.0
    for head in range(call.query.shape[1]):
        scores = call.query[0, head, rows] @ call.key[0, head // groups].T * call.scaling
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        kept += float((probs * mask[head]).sum()) / len(rows)
    return kept / call.query.shape[1]


def layer_bench(qkv: tuple, lengths: list[int], specs: list[str], repeats: int, layer: int, n_layers: int) -> list[dict]:
    query, key, value, scaling = qkv
    rows_out = []
    for n in lengths:
        q, k, v = query[:, :, :n].contiguous(), key[:, :, :n].contiguous(), value[:, :, :n].contiguous()
        pos = torch.arange(n)
        call = AttnCall(layer, q, k, v, pos, pos.expand(k.shape[1], n).clone(), scaling, n_layers=n_layers)
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:256].sort().values

        def dense(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)

        dense_s, want = best_time(dense, repeats)
        rows_n = []
        for spec in specs:
            method = parse(spec).prefill
            sparse_s, got = best_time(lambda m=method, c=call: m.attend(c), repeats)
            layouts = method.plan(call)
            rows_n.append({"length": n, "method": spec, "sparse_s": round(sparse_s, 3),
                           "density": round(density(layouts, n), 4) if layouts is not None else 1.0,
                           "recall": round(recall(method, call, sample), 4),
                           "max_abs_error": float(f"{float((got - want).abs().max()):.3g}"),
                           "mean_abs_error": float(f"{float((got - want).abs().mean()):.3g}")})
            print(f"{n:>6} {spec:<48} sparse {sparse_s:7.2f} s  density {rows_n[-1]['density']:.3f}  "
                  f"recall {rows_n[-1]['recall']:.4f}  "
                  f"max err {rows_n[-1]['max_abs_error']:.3g}", flush=True)
        dense_s = min(dense_s, best_time(dense, repeats)[0])  # dense again after: the best of both
        print(f"{n:>6} dense {dense_s:.2f} s", flush=True)
        for row in rows_n:
            row["dense_s"] = round(dense_s, 3)
            row["speedup"] = round(dense_s / row["sparse_s"], 2)
        rows_out += rows_n
    return rows_out


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, spec: str) -> tuple[float, torch.Tensor]:
    n = prompt.shape[1]
    cache, positions = KVCache.for_model(model), torch.arange(n)
    started = time.perf_counter()
    logits = model(input_ids=prompt, position_ids=positions[None], **cache_kwarg(model, cache), use_cache=True,
                   logits_to_keep=256, kvlife=StepContext(cache, positions, recipe=parse(spec))).logits[0]
    return time.perf_counter() - started, logits


@torch.no_grad()
def e2e_bench(model, ids: list[int], lengths: list[int], specs: list[str]) -> list[dict]:
    prefill(model, torch.tensor([ids[:1024]]), "dense")  # warm-up: the first forward pays one-off costs
    rows_out = []
    for n in lengths:
        prompt = torch.tensor([ids[:n]])
        targets = prompt[0, n - 255:]
        dense_s, dense_logits = prefill(model, prompt, "dense")
        dense_nll = float(F.cross_entropy(dense_logits[:-1].float(), targets))
        rows_n = []
        for spec in specs:
            if spec == "dense":
                continue
            elapsed, logits = prefill(model, prompt, spec)
            nll = float(F.cross_entropy(logits[:-1].float(), targets))
            rows_n.append({"length": n, "method": spec, "prefill_s": round(elapsed, 2), "nll_last_255": round(nll, 4),
                           "nll_delta": round(nll - dense_nll, 4),
                           "last_top1_same": bool(logits[-1].argmax() == dense_logits[-1].argmax())})
            print(f"{n:>6} {spec:<48} prefill {elapsed:7.1f} s  nll {nll:.4f} (dense {dense_nll:.4f})", flush=True)
        dense_s = min(dense_s, prefill(model, prompt, "dense")[0])  # dense again after: the best of both
        print(f"{n:>6} dense prefill {dense_s:.1f} s", flush=True)
        rows_out.append({"length": n, "method": "dense", "prefill_s": round(dense_s, 2),
                         "nll_last_255": round(dense_nll, 4), "speedup": 1.0})
        for row in rows_n:
            row["speedup"] = round(dense_s / row["prefill_s"], 2)
        rows_out += rows_n
    return rows_out


def print_tables(result: dict) -> None:
    layer = result.get("layer", {}).get("rows", [])
    if layer:
        print(f"\n{'tokens':>6}  {'method':<48} {'dense s':>8} {'sparse s':>9} {'speed-up':>8} {'density':>8} "
              f"{'recall':>7} {'max err':>8}")
        for r in layer:
            print(f"{r['length']:>6}  {r['method']:<48} {r['dense_s']:>8.2f} {r['sparse_s']:>9.2f} {r['speedup']:>8.2f} "
                  f"{r['density']:>8.3f} {r['recall']:>7.4f} {r['max_abs_error']:>8.3g}")
    e2e = result.get("end_to_end", [])
    if e2e:
        print(f"\n{'tokens':>6}  {'method':<48} {'prefill s':>9} {'speed-up':>8} {'NLL':>7} {'dNLL':>7}")
        for r in e2e:
            print(f"{r['length']:>6}  {r['method']:<48} {r['prefill_s']:>9.1f} {r['speedup']:>8.2f} "
                  f"{r['nll_last_255']:>7.4f} {r.get('nll_delta', 0.0):>7.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default=";".join(LAYER_METHODS), help="';'-separated recipe specs")
    parser.add_argument("--e2e", default="8192,16384", help="end-to-end prefill lengths ('' to skip)")
    parser.add_argument("--e2e-methods", default=";".join(E2E_METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only print the tables of the last results")
    args = parser.parse_args()
    if args.table:
        print_tables(json.loads(RESULTS.read_text()))
        return
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    e2e_lengths = [int(x) for x in args.e2e.split(",") if x]
    model, tokenizer = models.load(MODEL)
    ids = stdlib_ids(tokenizer, max(lengths + e2e_lengths), first=TEXT_FROM)
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    result.update({"machine": machine(), "threads": args.threads, "model": MODEL,
                   "text": f"Python {sys.version.split()[0]} standard library modules from {TEXT_FROM!r} on",
                   "torch": torch.__version__})
    if lengths:
        qkv = capture(model, ids[:max(lengths)], args.layer)
        result["layer"] = {"layer": args.layer, "shape": {"q_heads": qkv[0].shape[1], "kv_heads": qkv[1].shape[1],
                                                         "head_dim": qkv[0].shape[-1], "dtype": "float32"},
                           "recall_rows": 256, "repeats": args.repeats,
                           "rows": layer_bench(qkv, lengths, args.methods.split(";"), args.repeats, args.layer,
                                               model.config.num_hidden_layers)}
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if e2e_lengths:
        result["end_to_end"] = e2e_bench(model, ids, e2e_lengths, args.e2e_methods.split(";"))
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
