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
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from common import commit, machine  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.attention import AttnCall, StepContext, dense_attention, use_kvlife_attention  # noqa: E402
from kvlife.cache import KVCache, cache_kwarg  # noqa: E402
from kvlife.methods.base import PrefillMethod  # noqa: E402
from kvlife.methods.prefill.flex import TILE, flex_inputs, flex_mask, flex_sparse_attention  # noqa: E402
from kvlife.methods.prefill.kernels import layout_mask, sparse_attention  # noqa: E402
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
E2E_METHODS = [
    "dense",
    "a_shape",
    "tri_shape",
    "minference",
    "minference(vertical_size=1000,slash_size=3072)",
    f"minference(config={MODEL})",
    "flexprefill",
]
# flex_attention against the hand-written kernel: pattern -> the method whose layouts are timed
FLEX_PATTERNS = {"a_shape": "a_shape", "tri_shape": "tri_shape", "vertical_slash": "minference",
                 "block_sparse": "minference(pattern=block_sparse,top_k=32)"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
        model(
            input_ids=torch.tensor([ids]),
            position_ids=positions[None],
            **cache_kwarg(model, cache),
            use_cache=True,
            logits_to_keep=1,
            kvlife=StepContext(cache, positions, recipe=recipe_of(method)),
        )
    except _Captured:
        pass
    print(
        f"captured layer {layer} Q/K/V of {len(ids)} tokens in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
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


def layer_call(qkv: tuple, n: int, layer: int, n_layers: int) -> tuple[AttnCall, torch.Tensor]:
    """The captured layer's first n tokens as a first-prefill call, and 256 sampled query rows."""
    query, key, value, scaling = qkv
    q, k, v = query[:, :, :n].contiguous(), key[:, :, :n].contiguous(), value[:, :, :n].contiguous()
    pos = torch.arange(n)
    call = AttnCall(layer, q, k, v, pos, pos.expand(k.shape[1], n).clone(), scaling, n_layers=n_layers)
    return call, torch.randperm(n, generator=torch.Generator().manual_seed(n))[:256].sort().values


def layer_bench(
    qkv: tuple, lengths: list[int], specs: list[str], repeats: int, layer: int, n_layers: int
) -> list[dict]:
    scaling = qkv[3]
    rows_out = []
    for n in lengths:
        call, sample = layer_call(qkv, n, layer, n_layers)
        q, k, v = call.query, call.key, call.value

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


def masked_reference(query, key, value, layouts, rows: torch.Tensor, scaling: float) -> torch.Tensor:
    """Float32 masked softmax of query rows `rows` under the layouts' own masks (`layout_mask`):
    [q_heads, len(rows), d], what a kernel computing exactly that pattern must give."""
    q_heads, groups = query.shape[0], query.shape[0] // key.shape[0]
    n = key.shape[1]
    out = []
    for head in range(q_heads):
        mask = layout_mask(layouts[0 if len(layouts) == 1 else head], n, rows)
        scores = query[head, rows].float() @ key[head // groups].float().T * scaling
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        out.append(probs @ value[head // groups].float())
    return torch.stack(out)


def flex_row(call: AttnCall, spec: str, dtype: torch.dtype, want: torch.Tensor, sample: torch.Tensor,
             repeats: int, tile: int) -> dict:
    """One pattern at one length and dtype: the hand-written kernel and flex_attention on the same layouts."""
    method = parse(spec).prefill
    n = call.query.shape[2]
    started = time.perf_counter()
    layouts = method.layouts(call)  # the pattern itself, even where the method would attend densely
    estimate_s = time.perf_counter() - started
    m = n - method.dense_rows(n)
    query, key, value = (x[0].to(dtype) for x in (call.query, call.key, call.value))
    query = query[:, :m]
    rows = sample[sample < m]
    exact = masked_reference(query, key, value, layouts, rows, call.scaling)

    def hand():
        return sparse_attention(query, key, value, layouts, call.scaling)

    def flex():
        return flex_sparse_attention(query, key, value, layouts, call.scaling, tile=tile)

    hand_s, hand_out = best_time(hand, repeats)
    # torch.compile's first call for this shape compiles, then runs (0 s of compiling: a bucketed
    # shape compiled before, e.g. Tri-shape's rows after A-shape's)
    first_s, _ = best_time(flex, 1)
    flex_s, flex_out = best_time(flex, repeats)
    build_s, _ = best_time(lambda: flex_inputs(key, value, layouts, m, query.shape[0], tile), 1)
    mask_exact = bool((flex_mask(layouts, n, query.shape[0], rows, tile)
                       == torch.stack([layout_mask(lay, n, rows) for lay in layouts])).all())
    row = {
        "length": n,
        "pattern": next(k for k, v in FLEX_PATTERNS.items() if v == spec),
        "method": spec,
        "dtype": str(dtype).removeprefix("torch."),
        "query_rows": m,
        "density": round(density(layouts, m), 4),
        "estimate_s": round(estimate_s, 3),
        "kernel_s": round(hand_s, 3),
        "flex_s": round(flex_s, 3),
        "flex_compile_s": round(max(0.0, first_s - flex_s), 1),
        "flex_block_mask_s": round(build_s, 3),
        "flex_mask_exact": mask_exact,
    }
    for name, out in (("kernel", hand_out), ("flex", flex_out)):
        row[f"{name}_max_abs_error"] = float(f"{float((out.float() - want[:, :m]).abs().max()):.3g}")
        row[f"{name}_vs_reference"] = float(f"{float((out[:, rows].float() - exact).abs().max()):.3g}")
    print(
        f"{n:>6} {row['pattern']:<15} {row['dtype']:<9} kernel {hand_s:7.2f} s  flex {flex_s:7.2f} s "
        f"(compile {row['flex_compile_s']:5.1f} s, block mask {build_s:.2f} s)  density {row['density']:.3f} "
        f" exact {mask_exact} err {row['kernel_vs_reference']:.2g}/{row['flex_vs_reference']:.2g}",
        flush=True,
    )
    return row


def flex_bench(qkv: tuple, lengths: list[int], dtypes: dict[str, list[int]], repeats: int, tile: int,
               layer: int, n_layers: int) -> list[dict]:
    """flex_attention (compiled) against kvlife's kernel on each pattern's layouts of the real layer."""
    scaling = qkv[3]
    rows_out = []
    for n in lengths:
        call, sample = layer_call(qkv, n, layer, n_layers)
        q, k, v = call.query, call.key, call.value
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)[0]
        for name, dtype_lengths in dtypes.items():
            if n not in dtype_lengths:
                continue
            dtype = DTYPES[name]
            qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)

            def dense(qd=qd, kd=kd, vd=vd):
                return F.scaled_dot_product_attention(
                    qd, kd, vd, is_causal=True, scale=scaling, enable_gqa=True
                )

            dense_s = best_time(dense, repeats)[0]
            rows_n = [
                flex_row(call, spec, dtype, want, sample, repeats, tile) for spec in FLEX_PATTERNS.values()
            ]
            dense_s = min(dense_s, best_time(dense, repeats)[0])
            print(f"{n:>6} dense {name} {dense_s:.2f} s", flush=True)
            for row in rows_n:
                row["dense_s"] = round(dense_s, 3)
                row["kernel_speedup"] = round(dense_s / row["kernel_s"], 2)
                row["flex_speedup"] = round(dense_s / row["flex_s"], 2)
                row["faster"] = "flex" if row["flex_s"] < row["kernel_s"] else "kernel"
            rows_out += rows_n
    return rows_out


class Profiled(PrefillMethod):
    """A recipe's prefill method (dense attention when it has none) that times its attention calls."""

    name = "profiled"

    def __init__(self, inner: PrefillMethod | None) -> None:
        self.inner, self.seconds = inner, 0.0

    def attend(self, call: AttnCall) -> torch.Tensor:
        started = time.perf_counter()
        out = self.inner.attend(call) if self.inner is not None else dense_attention(call)
        self.seconds += time.perf_counter() - started
        return out


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, spec: str) -> tuple[float, torch.Tensor, dict]:
    """One prefill of `prompt` with `spec`: (seconds, logits of the last 256 tokens, where the time went)."""
    n = prompt.shape[1]
    cache, positions = KVCache.for_model(model), torch.arange(n)
    recipe = parse(spec)
    profiled = Profiled(recipe.prefill)
    step = StepContext(cache, positions, recipe=SimpleNamespace(prefill=profiled, load=recipe.load,
                                                                compress=recipe.compress))
    started = time.perf_counter()
    logits = model(
        input_ids=prompt,
        position_ids=positions[None],
        **cache_kwarg(model, cache),
        use_cache=True,
        logits_to_keep=256,
        kvlife=step,
    ).logits[0]
    elapsed = time.perf_counter() - started
    # attention_s: every layer's attention, the sparse methods' estimation included; other_s: the rest
    # (projections, MLPs, norms); estimate_s: the sparse methods' pattern estimation alone.
    profile = {"attention_s": round(profiled.seconds, 2), "other_s": round(elapsed - profiled.seconds, 2)}
    sparse = step.stats.get("sparse_prefill")
    if sparse:
        profile.update(estimate_s=round(sparse["estimate_s"], 2), sparse_layers=sparse["sparse_layers"],
                       dense_layers=sparse["dense_layers"])
    return elapsed, logits, profile


@torch.no_grad()
def e2e_bench(model, ids: list[int], lengths: list[int], specs: list[str]) -> list[dict]:
    """Per length: dense, each method, dense again (the best of both dense runs is the reference)."""
    prefill(model, torch.tensor([ids[:1024]]), "dense")  # warm-up: the first forward pays one-off costs
    rows_out = []
    for n in lengths:
        prompt = torch.tensor([ids[:n]])
        targets = prompt[0, n - 255:]
        dense_s, dense_logits, dense_profile = prefill(model, prompt, "dense")
        dense_nll = float(F.cross_entropy(dense_logits[:-1].float(), targets))
        print(f"{n:>6} dense prefill {dense_s:.1f} s  {dense_profile}", flush=True)
        rows_n = []
        for spec in specs:
            if spec == "dense":
                continue
            elapsed, logits, profile = prefill(model, prompt, spec)
            nll = float(F.cross_entropy(logits[:-1].float(), targets))
            rows_n.append(
                {
                    "length": n,
                    "method": spec,
                    "prefill_s": round(elapsed, 2),
                    "nll_last_255": round(nll, 4),
                    "nll_delta": round(nll - dense_nll, 4),
                    "nll_change_pct": round(100 * (nll - dense_nll) / dense_nll, 2),
                    "last_top1_same": bool(logits[-1].argmax() == dense_logits[-1].argmax()),
                    **profile,
                }
            )
            print(
                f"{n:>6} {spec:<48} prefill {elapsed:7.1f} s  nll {nll:.4f} (dense {dense_nll:.4f})  "
                f"{profile}",
                flush=True,
            )
        again_s, _, again_profile = prefill(model, prompt, "dense")  # dense again after: the best of both
        print(f"{n:>6} dense prefill again {again_s:.1f} s  {again_profile}", flush=True)
        if again_s < dense_s:
            dense_s, dense_profile = again_s, again_profile
        rows_out.append({"length": n, "method": "dense", "prefill_s": round(dense_s, 2),
                         "nll_last_255": round(dense_nll, 4), "speedup": 1.0, **dense_profile})
        for row in rows_n:
            row["speedup"] = round(dense_s / row["prefill_s"], 2)
        rows_out += rows_n
    return rows_out


def print_tables(result: dict) -> None:
    layer = result.get("layer", {}).get("rows", [])
    if layer:
        print(
            f"\n{'tokens':>6}  {'method':<48} {'dense s':>8} {'sparse s':>9} {'speed-up':>8} {'density':>8} "
            f"{'recall':>7} {'max err':>8}"
        )
        for r in layer:
            print(
                f"{r['length']:>6}  {r['method']:<48} {r['dense_s']:>8.2f} {r['sparse_s']:>9.2f} "
                f"{r['speedup']:>8.2f} {r['density']:>8.3f} {r['recall']:>7.4f} {r['max_abs_error']:>8.3g}"
            )
    flex = result.get("flex_attention", {}).get("rows", [])
    if flex:
        print(f"\n{'tokens':>6}  {'pattern':<15} {'dtype':<9} {'density':>7} {'dense s':>8} {'kernel s':>9} "
              f"{'flex s':>7} {'compile s':>9} {'faster':>7} {'exact':>6} {'err kernel/flex vs ref':>23}")
        for r in flex:
            errors = f"{r['kernel_vs_reference']:.2g}/{r['flex_vs_reference']:.2g}"
            print(
                f"{r['length']:>6}  {r['pattern']:<15} {r['dtype']:<9} {r['density']:>7.3f} "
                f"{r['dense_s']:>8.2f} {r['kernel_s']:>9.2f} {r['flex_s']:>7.2f} {r['flex_compile_s']:>9.1f} "
                f"{r['faster']:>7} {str(r['flex_mask_exact']):>6} {errors:>23}"
            )
    runs = result.get("end_to_end", {}).get("runs", [])
    if runs:
        print(f"\n{'tokens':>6}  {'method':<48} {'prefill s':>9} {'speed-up':>8} {'NLL':>7} {'dNLL %':>7} "
              f"{'attn s':>7} {'est. s':>7} {'commit':>10}")
        rows = sorted(((row, run) for run in runs for row in run["rows"]), key=lambda item: item[0]["length"])
        for r, run in rows:
            attention = f"{r['attention_s']:7.1f}" if "attention_s" in r else f"{'':7}"
            estimate = f"{r['estimate_s']:7.1f}" if "estimate_s" in r else f"{'':7}"
            change = 100 * r.get("nll_delta", 0.0) / (r["nll_last_255"] - r.get("nll_delta", 0.0))
            print(
                f"{r['length']:>6}  {r['method']:<48} {r['prefill_s']:>9.1f} {r['speedup']:>8.2f} "
                f"{r['nll_last_255']:>7.4f} {change:>7.2f} {attention} {estimate} "
                f"{run.get('commit', '?'):>10}"
            )


def conditions(dtype: str) -> dict:
    """What a section was measured on: machine, dtype, commit, load average (1, 5, 15 min) at its start."""
    return {"machine": machine(), "dtype": dtype, "commit": commit(), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768", help="layer benchmark lengths ('' to skip)")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default=";".join(LAYER_METHODS), help="';'-separated recipe specs")
    parser.add_argument(
        "--flex", default="8192,16384,32768", help="flex_attention comparison lengths ('' to skip)"
    )
    parser.add_argument("--flex-bf16", default="8192", help="lengths also compared in bfloat16 ('' for none)")
    parser.add_argument("--tile", type=int, default=TILE, help="flex_attention's tile (query rows = keys)")
    parser.add_argument("--e2e", default="8192,16384,32768", help="end-to-end prefill lengths ('' to skip)")
    parser.add_argument("--e2e-methods", default=";".join(E2E_METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only print the tables of the last results")
    args = parser.parse_args()
    if args.table:
        print_tables(json.loads(RESULTS.read_text()))
        return
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    flex_lengths = [int(x) for x in args.flex.split(",") if x]
    e2e_lengths = [int(x) for x in args.e2e.split(",") if x]
    model, tokenizer = models.load(MODEL)
    use_kvlife_attention(model)  # capture() and the prefill timings run it with kvlife=StepContext(...)
    ids = stdlib_ids(tokenizer, max(lengths + flex_lengths + e2e_lengths), first=TEXT_FROM)
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    result.update({"machine": machine(), "threads": args.threads, "model": MODEL,
                   "text": f"Python {sys.version.split()[0]} standard library modules from {TEXT_FROM!r} on",
                   "torch": torch.__version__})
    n_layers = model.config.num_hidden_layers
    if lengths or flex_lengths:
        qkv = capture(model, ids[:max(lengths + flex_lengths)], args.layer)
        shape = {"q_heads": qkv[0].shape[1], "kv_heads": qkv[1].shape[1], "head_dim": qkv[0].shape[-1]}
    if lengths:
        result["layer"] = {
            "layer": args.layer,
            "shape": {**shape, "dtype": "float32"},
            "recall_rows": 256,
            "repeats": args.repeats,
            **conditions("float32"),
            "rows": layer_bench(qkv, lengths, args.methods.split(";"), args.repeats, args.layer, n_layers),
        }
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if flex_lengths:
        dtypes = {"float32": flex_lengths, "bfloat16": [int(x) for x in args.flex_bf16.split(",") if x]}
        section = {
            "layer": args.layer,
            "shape": shape,
            "tile": args.tile,
            "repeats": args.repeats,
            "reference_rows": 256,
            "patterns": FLEX_PATTERNS,
            **conditions("float32, bfloat16 where listed"),
        }
        section["rows"] = flex_bench(qkv, flex_lengths, dtypes, args.repeats, args.tile, args.layer, n_layers)
        section["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        result["flex_attention"] = section
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if e2e_lengths:
        run = {**conditions(str(next(model.parameters()).dtype).removeprefix("torch.")),
               "rows": e2e_bench(model, ids, e2e_lengths, args.e2e_methods.split(";"))}
        run["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        # A run replaces earlier runs' rows at its lengths; the others stay, with their own commit.
        runs = result.get("end_to_end", {}).get("runs", [])
        for old in runs:
            old["rows"] = [row for row in old["rows"] if row["length"] not in e2e_lengths]
        result["end_to_end"] = {"runs": [old for old in runs if old["rows"]] + [run]}
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
