"""Loading and prompt-compression benchmark: quest and retrieval_attention against dense; lingua.

    flock /tmp/kvlife-cpu.lock .venv/bin/python benchmarks/load.py [--lengths 8192,16384]
        [--steps 16] [--skip-decode] [--skip-lingua] [--accuracy] [--samples 2]

Decode (per context length, default model): one kv-task context is prefilled once (with
retrieval_attention observing the prefill, which is how it learns the queries), then each
method decodes `--steps` greedy tokens after the same query from the same cache state; we record
the median step time, the time spent in attention alone, the bytes in the attention working set
vs offloaded, the top-k recall (share of the true top-k keys by q·k that were attended;
k = budget for quest, top_k over the middle for retrieval_attention) and the share of the true
attention mass attended. Index build time is reported apart (it happens once per context).
Lingua: achieved rate and prefill time (scoring + compressed prefill vs dense prefill) at the
first length. Accuracy (`--accuracy`): `kvlife bench` runs on kv and prefix_suffix, both modes, a
few samples per task (default profile, ~2K-token contexts: the load methods get budgets scaled
to that length, since their defaults would keep everything). Writes benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import machine

from kvlife.attention import dense_attention
from kvlife.methods.base import LoadMethod
from kvlife.recipe import Recipe, parse

RESULTS = Path(__file__).parent / "results" / "load.json"
MODEL = "qwen2.5-coder-0.5b"
NOTES = [
    "decode: one kv-task context per length (the filler estimate gives ~7.4K and ~14.6K tokens for the "
    "8192 / 16384 rows; context_tokens is exact), 12 timed greedy steps after one query, one torch thread, "
    "on a 2-core machine shared with other jobs: step times are indicative, compare within a row",
    "attention_ms_per_step: time inside the load method (all 24 layers); index_build_s: "
    "retrieval_attention's one-time index build (first decode step), excluded from the medians",
    "topk_recall: share of the true top-k keys by q.k that were attended (quest: k = budget over all visible "
    "keys; retrieval_attention: k = top_k over the indexed middle); attention_mass_recall: share of the true "
    "softmax mass on attended keys; both averaged over sparse layers, query heads and 8 decode steps",
    "bytes: working = K/V a step attends from resident memory (+ quest's page bounds), offloaded = K/V left "
    "at rest (quest) or moved to the CPU index (retrieval_attention; index_bytes = its float32 key copies + "
    "ids)",
    "accuracy: default profile (~2K-token contexts) so budgets are scaled (quest 256 tokens, "
    "retrieval_attention 16 sinks + 128 window + top-256); 2 samples x 4 turns per task and mode: small, "
    "differences of one answer are 0.125",
    "lingua: prefill_time_saved = 1 - (scoring + compressed prefill) / dense prefill at the first length; "
    "multi-turn compresses once with query 1 (later turns' needles may be dropped), multi-request without a "
    "query",
]
ACCURACY_METHODS = ["dense", "quest(budget=256)", "retrieval_attention(n_sink=16,window=128,top_k=256)",
                    "lingua", "lingua(scorer=smollm2-135m)"]


class Timed(LoadMethod):
    """Wraps a load method (or dense) and adds the seconds spent in its attention."""

    name = "timed"

    def __init__(self, inner: LoadMethod | None) -> None:
        self.inner, self.seconds = inner, 0.0
        if inner is not None and hasattr(inner, "observe"):
            self.observe = inner.observe

    def attend(self, call):
        started = time.perf_counter()
        out = self.inner.attend(call) if self.inner is not None else dense_attention(call)
        self.seconds += time.perf_counter() - started
        return out



def kv_sample(length: int):
    from kvlife.bench.tasks import get_task

    # the filler is sized in tokens by a chars-per-token estimate; ask for a bit more and cut after
    return get_task("kv").make_sample(random.Random(length), 0, pairs=4, turns=1, context_tokens=length,
                                      dense_json=False)


def decode(session, query_ids: list[int], steps: int, checkpoint) -> tuple[list[float], list[dict]]:
    session.cache.rollback(checkpoint)
    logits = session.forward(query_ids, phase="extend")
    times, stats = [], []
    for _ in range(steps):
        token = int(logits[-1].argmax())
        started = time.perf_counter()
        logits = session.forward([token], phase="decode")
        times.append(time.perf_counter() - started)
        stats.append(session.last_stats.get("load", {}))
    session.cache.rollback(checkpoint)
    return times, stats


def mean_of(stats: list[dict], key: str) -> float | None:
    values = [v for s in stats for v in s.get(key, [])]
    return round(statistics.fmean(values), 4) if values else None


def bench_length(model, tokenizer, length: int, steps: int) -> dict[str, Any]:
    from kvlife.methods.load.quest import Quest
    from kvlife.methods.load.retrieval_attention import RetrievalAttention
    from kvlife.session import Session

    sample = kv_sample(length)
    retrieval = RetrievalAttention()
    session = Session(model, tokenizer, Recipe(load=Timed(retrieval)), mode="multi-request")
    ids = session.format.context_ids(sample.context)[:length]
    session.cache = session.new_cache()
    started = time.perf_counter()
    session.forward(ids, phase="prefill")
    prefill_s = time.perf_counter() - started
    checkpoint = session.cache.checkpoint()
    query_ids = session.format.query_ids(sample.turns[0].query)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decode timed on one thread: small ops on a shared 2-core machine
    out: dict[str, Any] = {"context_tokens": len(ids), "dense_prefill_s": round(prefill_s, 2),
                           "decode_threads": 1,
                           "dense_cache_bytes": session.cache.bytes(), "methods": {}}
    quest = Quest()
    runs = [("dense", None), (f"quest(budget={quest.budget})", quest),
            (f"retrieval_attention(top_k={retrieval.top_k},scan={retrieval.scan})", retrieval)]
    for label, method in runs:
        timed = Timed(method)
        session.recipe = Recipe(load=timed)
        times, stats = decode(session, query_ids, steps + 1, checkpoint)
        build = stats[0].get("index_build_s")
        steady = times[1:]  # the first step builds retrieval_attention's index
        row = {"step_ms_median": round(1000 * statistics.median(steady), 1),
               "attention_ms_per_step": round(1000 * (timed.seconds - (build or 0)) / len(times), 2)}
        if build is not None:
            row["index_build_s"] = round(build, 2)
        if method is not None:
            row["bytes"] = method.byte_split(session.cache)
            load = stats[-1]
            row["attended_tokens_per_kv_head_layer"] = round(
                load.get("attended_tokens", 0)
                / (model.config.num_key_value_heads * model.config.num_hidden_layers),
                1,
            )
            method.measure_recall = True
            _, recall_stats = decode(session, query_ids, min(steps, 8), checkpoint)
            method.measure_recall = False
            row["topk_recall"] = mean_of(recall_stats, "recall")
            row["attention_mass_recall"] = mean_of(recall_stats, "mass")
        else:
            row["bytes"] = {"working_bytes": session.cache.bytes(), "offloaded_bytes": 0}
        out["methods"][label] = row
        print(length, label, row, flush=True)
    # the index's recall as a function of the share of lists scanned (same index, nprobe changed)
    sweep = {}
    for scan in (0.1, 0.25, 0.5):
        for state in retrieval._layers.values():
            for head in state.heads or []:
                head.nprobe = max(1, round(scan * head.nlist))
        retrieval.measure_recall = True
        session.recipe = Recipe(load=retrieval)
        _, recall_stats = decode(session, query_ids, 4, checkpoint)
        sweep[str(scan)] = {"topk_recall": mean_of(recall_stats, "recall"),
                            "attention_mass_recall": mean_of(recall_stats, "mass")}
    retrieval.measure_recall = False
    torch.set_num_threads(threads)
    out["retrieval_attention_scan_sweep"] = sweep
    print(length, "scan sweep", sweep, flush=True)
    return out


def bench_lingua(model, tokenizer, length: int, dense_prefill_s: float | None) -> dict[str, Any]:
    from kvlife import models
    from kvlife.session import Session

    sample = kv_sample(length)
    out = {}
    for spec in ("lingua", "lingua(scorer=smollm2-135m)"):
        recipe = parse(spec)
        session = Session(model, tokenizer, recipe, mode="multi-turn")
        ids = session.format.context_ids(sample.context)[:length]
        query = sample.turns[0].query
        if recipe.prompt.scorer != "self":  # load the scorer model outside the timing
            recipe.prompt._scorer = models.load(recipe.prompt.scorer)
        started = time.perf_counter()
        kept = recipe.prompt.compress_ids(ids, session.format.encode(query), model, tokenizer)
        scoring_s = time.perf_counter() - started
        session.cache = session.new_cache()
        started = time.perf_counter()
        session.forward(kept, phase="prefill")
        prefill_s = time.perf_counter() - started
        row = {"rate": recipe.prompt.last_stats["rate"], "kept_tokens": len(kept), "context_tokens": len(ids),
               "scoring_s": round(scoring_s, 2), "compressed_prefill_s": round(prefill_s, 2),
               "total_s": round(scoring_s + prefill_s, 2),
               "needle_kept": sample.turns[0].answer in tokenizer.decode(kept) or None}
        if dense_prefill_s:
            row["prefill_time_saved"] = round(1 - (scoring_s + prefill_s) / dense_prefill_s, 3)
        out[spec] = row
        print(length, spec, row, flush=True)
    return out


def accuracy(samples: int) -> dict[str, Any]:
    from kvlife.bench.runner import BenchConfig, run

    out = {}
    for method in ACCURACY_METHODS:
        for mode in ("multi-turn", "multi-request"):
            config = BenchConfig(
                model=MODEL, tasks=["kv", "prefix_suffix"], mode=mode, method=method, samples=samples
            )
            slug = "".join(c if c.isalnum() else "_" for c in method)
            run_dir = run(config, out=Path("results") / f"load-{slug}-{mode}", progress=False)
            rows = [
                json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines() if line
            ]
            scores = {task: round(statistics.fmean(r["score"] for r in rows if r["task"] == task), 3)
                      for task in config.tasks}
            nll = [r["reference_nll"] for r in rows if r.get("reference_nll") is not None]
            out.setdefault(method, {})[mode] = {
                **scores,
                "reference_nll": round(statistics.fmean(nll), 4) if nll else None,
                "context_tokens": round(statistics.fmean(r["context_tokens"] for r in rows), 1),
                "prefill_s_turn1": round(statistics.fmean(r["prefill_s"] for r in rows if r["turn"] == 1), 2),
                "decode_tok_s": round(
                    statistics.fmean(r["decode_tok_s"] for r in rows if r["decode_tok_s"]), 2
                ),
                "rows": len(rows),
            }
            print(method, mode, out[method][mode], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-lingua", action="store_true")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--samples", type=int, default=2)
    args = parser.parse_args()
    from kvlife import models

    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update(
        {
            "machine": machine(),
            "torch": torch.__version__,
            "model": MODEL,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "notes": NOTES,
        }
    )
    model, tokenizer = models.load(MODEL)
    lengths = [int(x) for x in args.lengths.split(",") if x]

    def save() -> None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    if not args.skip_decode:
        results.setdefault("decode", {})
        for length in lengths:
            results["decode"][str(length)] = bench_length(model, tokenizer, length, args.steps)
            save()
    if not args.skip_lingua:
        first = str(lengths[0])
        dense_s = results.get("decode", {}).get(first, {}).get("dense_prefill_s")
        results["lingua"] = {first: bench_lingua(model, tokenizer, lengths[0], dense_s)}
        save()
    if args.accuracy:
        results["accuracy"] = {"samples_per_task": args.samples, "tasks": ["kv", "prefix_suffix"],
                               "profile": "default (~2K-token contexts)", "runs": accuracy(args.samples)}
        save()


if __name__ == "__main__":
    main()
