"""Contexts assembled from stored documents (CacheBlend, EPIC) against a full prefill, on the rag task.

    .venv/bin/python benchmarks/blend.py [--sizes 4096,8192] [--samples 16] [--threads 2]
        [--methods "dense;concat;cacheblend(ratio=0.15);epic(k=16)"] [--model qwen2.5-coder-0.5b]
        [--store memory,disk:/tmp/runs/blend-docs] [--collect] [--diagnose 0,2]

Per size (assembled tokens) and sample, in multi-request mode: dense prefills the context; each assemble
method builds it from per-document caches. The documents are stored first (the offline ingestion
CacheBlend and EPIC assume: a warm-up assembly computes the missing ones, timed apart), so a
method's TTFT is lookup + re-rotation + recompute + the context's tail + turn 1's query and first
token, against dense's full prefill + the same. Every (size, sample, method) is one line of
benchmarks/results/blend-rows.jsonl, appended as it finishes: rerun to resume. After every sample,
and with --collect without running anything, it writes benchmarks/results/blend.json (rows: method,
assembled_tokens, samples, accuracy, dense_accuracy, ci_low/ci_high of accuracy minus dense's (paired
95% bootstrap over samples), ttft_s, full_prefill_ttft_s, speedup (over the samples whose dense and
method rows ran at one thread count, the count most of them ran at; each row records its threads),
dense's own accuracy interval, the paired difference against concat, what the wrong answers are,
reference NLL and its paired difference, agreement with dense's answers, tokens recomputed) and
blend-report.md.

--diagnose I,J (sample indices, at the first size) asks where the assembled cache loses what dense
knows, and writes benchmarks/results/blend-diagnosis.json (a rerun at the same size adds its
samples): per document, the relative deviation of concat's values from the full prefill's (mean over
layers, heads, tokens), then the answers (accuracy, reference NLL) on concat's cache with some
documents' K/V swapped for the full prefill's: the asked documents, the others, the first half, the
second half.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from blend_answers import answer_kinds  # noqa: E402
from foundation import machine  # noqa: E402

from kvlife.bench.stats import bootstrap_mean, paired_difference  # noqa: E402
from kvlife.bench.tasks import get_task  # noqa: E402

ANCHORS = Path(__file__).parent / "data"
RESULTS = Path(__file__).parent / "results"
METHODS = ["dense", "concat", "cacheblend(ratio=0.15)", "epic(k=16)"]
TARGET_SPEEDUP = 5.0  # the issue's target at 8K assembled tokens


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def read_rows(results: Path) -> list[dict]:
    path = results / "blend-rows.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
    return rows


def append_row(results: Path, row: dict) -> None:
    with (results / "blend-rows.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def run_one(session, sample, task) -> dict:
    segments = sample.meta["segments"]
    prefilled = session.prefill(sample.context, segments=segments)
    turns = []
    for turn in sample.turns:
        result = session.ask(turn.query, max_new_tokens=sample.max_new_tokens, reference=turn.answer)
        turns.append({"prediction": result.prediction, "reference": turn.answer,
                      "score": task.score(result.prediction, turn.answer),
                      "reference_nll": result.reference_nll, "ttft_s": result.ttft_s})
    stats = prefilled.stats
    return {"context_tokens": session.context_tokens, "prefill_s": prefilled.prefill_s,
            "ttft_s": prefilled.prefill_s + turns[0]["ttft_s"], "turns": turns,
            "accuracy": statistics.mean(t["score"] for t in turns),
            "assembly": {k: v for k, v in stats.items()
                         if k.startswith(("doc_", "recomputed", "assemble", "documents", "assembled"))}}


def measure(args) -> None:
    import torch

    from kvlife import models
    from kvlife.session import Session
    from kvlife.store import open_store
    from kvlife.store.documents import DocumentFigures

    torch.set_num_threads(args.threads)
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    store = open_store(args.store, chunk_size=256)
    task = get_task("rag")
    earlier = read_rows(args.out)
    done = {(r["size"], r["sample_id"], r["method"]) for r in earlier}
    if args.retime_dense:  # dense counts as done only where it was timed here (machine, threads)
        here = (args.threads, machine())
        done -= {(r["size"], r["sample_id"], "dense") for r in earlier if r["method"] == "dense"}
        done |= {(r["size"], r["sample_id"], "dense") for r in earlier
                 if r["method"] == "dense" and _timing(r) == here}
    sessions = {spec: Session(model, tokenizer, spec, mode="multi-request",
                              store=None if spec == "dense" else store) for spec in args.methods}
    # the sessions' document caches: same store and tenant, so what the warm-up stores, they find
    warm = any(spec != "dense" for spec in args.methods)
    for size in args.sizes:
        for sample in task.samples("default", args.samples, seed=args.seed, context_tokens=size):
            todo = [spec for spec in args.methods if (size, sample.id, spec) not in done]
            if not todo:
                continue
            warm_figures = {}
            if warm and any(spec != "dense" for spec in todo):
                # every lead-in the methods to run compute their documents after, once each
                started, figures, warmed = time.perf_counter(), DocumentFigures(), set()
                pieces, _ = sessions[args.methods[0]].format.segment_ids(sample.meta["segments"])
                for spec in todo:
                    if sessions[spec].recipe.assemble is None:
                        continue
                    documents = sessions[spec].document_store(pieces[0])
                    if documents.namespace not in warmed:  # methods of one lead-in share its entries
                        warmed.add(documents.namespace)
                        figures.add(documents.assemble(pieces, first_alone=True)[2])
                warm_figures = {**figures.as_dict(), "warm_s": round(time.perf_counter() - started, 3)}
            for spec in todo:
                started = time.perf_counter()
                row = run_one(sessions[spec], sample, task)
                row.update({"size": size, "sample_id": sample.id, "method": spec, "model": args.model,
                            "dtype": dtype, "threads": args.threads, "machine": machine(),
                            "wall_s": round(time.perf_counter() - started, 3),
                            **({"warm": warm_figures} if spec != "dense" else {})})
                append_row(args.out, row)
                print(f"{size} {sample.id} {spec}: acc {row['accuracy']:.2f} ttft {row['ttft_s']:.2f}s "
                      f"recomputed {row['assembly'].get('recomputed_rows_last_layer', '-')}", flush=True)
            collect(args)


def collect(args) -> dict:
    rows = read_rows(args.out)
    table = []
    for size in sorted({r["size"] for r in rows}):
        kinds = answer_kinds(rows, size, args.seed)
        dense: dict[str, dict] = {}  # accuracy pairs with a sample's first dense row
        dense_timed = {}  # TTFT pairs with the dense row timed on the method row's machine and threads
        for r in rows:
            if r["size"] == size and r["method"] == "dense":
                dense.setdefault(r["sample_id"], r)
                dense_timed[(r["sample_id"], _timing(r))] = r
        concat = {r["sample_id"]: r["accuracy"] for r in rows
                  if r["size"] == size and r["method"] == "concat"}
        for spec in [m for m in METHODS + sorted({r["method"] for r in rows}) if m != "dense"]:
            mine = {r["sample_id"]: r for r in rows if r["size"] == size and r["method"] == spec}
            paired = sorted(set(mine) & set(dense))
            if not paired or any(t["method"] == spec for t in table if t["assembled_tokens"] == size):
                continue
            acc = paired_difference({k: mine[k]["accuracy"] for k in paired},
                                    {k: dense[k]["accuracy"] for k in paired})
            accuracy = statistics.mean(mine[k]["accuracy"] for k in paired)
            dense_interval = bootstrap_mean([dense[k]["accuracy"] for k in paired])
            # what the recompute buys: the paired accuracy difference against concat on the same samples
            vs_concat = (paired_difference({k: mine[k]["accuracy"] for k in paired if k in concat}, concat)
                         if spec != "concat" else None)
            nll = {k: _mean_nll(mine[k]) for k in paired}
            dense_nll = {k: _mean_nll(dense[k]) for k in paired}
            nll_diff = paired_difference(nll, dense_nll, lower_is_better=True)
            agreement = [t["prediction"] == d["prediction"] for k in paired
                         for t, d in zip(mine[k]["turns"], dense[k]["turns"])]
            # TTFT only where dense and the method ran at the same thread count on the same machine
            same = {k: _timing(mine[k]) for k in paired if (k, _timing(mine[k])) in dense_timed}
            # one (thread count, machine) per row's times: the one most pairs ran at (more threads on a tie)
            counts = collections.Counter(same.values())
            timing = max(counts, key=lambda n: (counts[n], n)) if counts else (None, None)
            threads, timed_on = timing
            timed = [k for k in same if same[k] == timing]
            ttft = statistics.mean(mine[k]["ttft_s"] for k in timed) if timed else None
            full = statistics.mean(dense_timed[(k, timing)]["ttft_s"] for k in timed) if timed else None
            assembled = [mine[k]["assembly"]["assembled_tokens"] for k in paired]
            recomputed = [mine[k]["assembly"].get("recomputed_rows_last_layer", 0) for k in paired]
            recomputed_first = [mine[k]["assembly"].get("recomputed_rows_first_layer", 0) for k in paired]
            table.append({
                "method": spec, "assembled_tokens": size, "samples": len(paired),
                "assembled_tokens_mean": round(statistics.mean(assembled)),
                "accuracy": round(accuracy, 4),
                "dense_accuracy": round(statistics.mean(dense[k]["accuracy"] for k in paired), 4),
                "ci_low": round(acc.low, 4), "ci_high": round(acc.high, 4), "verdict": acc.verdict,
                # the other reading of "within dense's interval": the method's mean inside the 95%
                # bootstrap interval of dense's own accuracy on the same samples
                "dense_accuracy_interval": [round(dense_interval.low, 4), round(dense_interval.high, 4)],
                "within_dense_interval": bool(dense_interval.low <= accuracy <= dense_interval.high),
                "ttft_s": _round(ttft), "full_prefill_ttft_s": _round(full),
                "speedup": _round(full / ttft if timed else None, 2), "timed_samples": len(timed),
                "threads": threads, "timed_on": timed_on,
                "ttft_interval_s": _interval([mine[k]["ttft_s"] for k in timed]),
                "reference_nll": round(statistics.mean(v for v in nll.values() if v is not None), 4),
                "dense_reference_nll": round(statistics.mean(v for v in dense_nll.values()
                                                             if v is not None), 4),
                "reference_nll_diff": nll_diff.to_dict() if nll_diff else None,
                "agreement_with_dense": round(sum(agreement) / len(agreement), 4),
                "recomputed_tokens": round(statistics.mean(recomputed), 1),
                # of all assembled tokens
                "recomputed_share": round(sum(recomputed) / max(1, sum(assembled)), 4),
                "recomputed_first_layer": round(statistics.mean(recomputed_first), 1),
                "assemble_load_s": round(statistics.mean(mine[k]["assembly"]["assemble_load_s"]
                                                         for k in paired), 3),
                "assemble_recompute_s": round(statistics.mean(mine[k]["assembly"]["assemble_recompute_s"]
                                                              for k in paired), 3),
                "vs_concat": vs_concat.to_dict() if vs_concat else None,
                # every turn of the method's rows at this size (blend_answers.py); dense's over all its rows
                "answers": kinds.get(spec, {}), "dense_answers": kinds.get("dense", {}),
                "doc_misses_in_measured_runs": sum(mine[k]["assembly"].get("doc_misses", 0) for k in paired),
            })
    sizes = sorted({r["size"] for r in rows})
    wanted = [(size, spec) for size in (args.sizes or [4096, 8192]) for spec in args.methods]
    have = {(r["size"], r["method"]) for r in rows}
    counts = {f"{size}/{spec}": sum(1 for r in rows if r["size"] == size and r["method"] == spec)
              for size, spec in wanted}
    missing = [f"{key}: {n} of {args.samples} samples" for key, n in counts.items() if n < args.samples]
    target = [t for t in table
              if t["assembled_tokens"] == 8192 and t["method"].startswith(("cacheblend", "epic"))]
    payload = {
        "machine": machine(), "commit": commit(), "dtype": next((r["dtype"] for r in rows), None),
        "model": next((r["model"] for r in rows), None), "mode": "multi-request",
        "settings": {"sizes": sizes, "samples_wanted": args.samples, "methods": args.methods,
                     "store": args.store, "seed": args.seed,
                     "threads": sorted({_threads(r) for r in rows}), "documents_warm": True},
        "rows": table,
        "target": {"rule": "cacheblend or epic at 8192 assembled tokens: accuracy interval against dense "
                           f"includes or exceeds 0, at >= {TARGET_SPEEDUP}x lower TTFT than a full prefill",
                   "met_by": [t["method"] for t in target
                              if t["ci_high"] >= 0 and (t["speedup"] or 0) >= TARGET_SPEEDUP],
                   "met_by_both_readings": [
                       t["method"] for t in target if t["ci_high"] >= 0 and t["within_dense_interval"]
                       and (t["speedup"] or 0) >= TARGET_SPEEDUP],
                   "measured": bool(target)},
        "missing": missing, "complete": not missing and all(key in have for key in wanted),
    }
    (args.out / "blend.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_report(payload, args.out)
    return payload


def _threads(row: dict) -> int:
    return row.get("threads", 1)  # rows from before the --threads option ran at 1


# rows from before rows named their machine ran on the one blend.json then named
EARLIER_MACHINE = "AMD EPYC, 2 cpus, 24 GiB, Linux (no GPU)"


def _timing(row: dict) -> tuple[int, str]:
    return _threads(row), row.get("machine", EARLIER_MACHINE)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _mean_nll(row: dict) -> float | None:
    values = [t["reference_nll"] for t in row["turns"] if t["reference_nll"] is not None]
    return statistics.mean(values) if values else None


def _interval(values: list[float]) -> list[float]:
    interval = bootstrap_mean(values)
    return [round(interval.low, 3), round(interval.high, 3)] if interval else []


def _cell(value: float | None, spec: str, unit: str = "") -> str:
    # no TTFT where no sample ran dense and the method at the same thread count
    return "-" if value is None else f"{value:{spec}}{unit}"


def write_report(payload: dict, results: Path) -> None:
    lines = ["# Contexts assembled from stored documents: rag task", "",
             f"{payload['model']}, {payload['dtype']}, multi-request, documents stored before the measured "
             f"runs; written on {payload['machine']} at commit {payload['commit']}. Times pair a method's "
             "rows with dense's on one machine at one thread count (" + _timed_on(payload["rows"]) + ").", "",
             "| tokens | method | n | accuracy | dense [its 95% CI] | diff 95% CI | verdict | TTFT s | "
             "full prefill s | speedup | NLL | dense NLL | agree | recomputed (share) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in payload["rows"]:
        lines.append(f"| {r['assembled_tokens']} | {r['method']} | {r['samples']} | {r['accuracy']:.3f} | "
                     f"{r['dense_accuracy']:.3f} [{r['dense_accuracy_interval'][0]:.2f}, "
                     f"{r['dense_accuracy_interval'][1]:.2f}] | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
                     f"{r['verdict']} | {_cell(r['ttft_s'], '.2f')} | "
                     f"{_cell(r['full_prefill_ttft_s'], '.2f')} | {_cell(r['speedup'], '.1f', 'x')} | "
                     f"{r['reference_nll']:.3f} | {r['dense_reference_nll']:.3f} | "
                     f"{r['agreement_with_dense']:.2f} | "
                     f"{r['recomputed_tokens']:.0f} ({r['recomputed_share']:.1%}) |")
    lines += ["",
              f"Target: {payload['target']['rule']}. "
              f"Met by: {', '.join(payload['target']['met_by']) or 'none'}"
              f"{'' if payload['target']['measured'] else ' (8K not measured yet)'}; also with the "
              f"method's mean inside dense's own 95% interval: "
              f"{', '.join(payload['target']['met_by_both_readings']) or 'none'}.",
              ""]
    if payload["missing"]:
        lines += ["Missing (rerun benchmarks/blend.py to resume): " + "; ".join(payload["missing"]), ""]
    (results / "blend-report.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _timed_on(rows: list[dict]) -> str:
    machines: dict[str, list[str]] = collections.defaultdict(list)
    for r in rows:
        if r["timed_on"]:
            machines[r["timed_on"]].append(f"{r['method']} at {r['assembled_tokens']}")
    return "; ".join(f"{name}: {', '.join(timed)}" for name, timed in machines.items()) or "no row timed"


def diagnose(args) -> None:
    """Which documents' stale K/V cost the answers: oracle caches mixing concat's and the full prefill's."""
    import torch

    from kvlife import models
    from kvlife.cache import KVCache
    from kvlife.session import Session
    from kvlife.store import open_store
    from kvlife.store.documents import DocumentStore

    torch.set_num_threads(args.threads)
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    documents = DocumentStore(open_store(args.store, chunk_size=256), model, tokenizer)
    task, size = get_task("rag"), args.sizes[0]
    samples = task.samples("default", max(args.diagnose) + 1, seed=args.seed, context_tokens=size)
    path = args.out / "blend-diagnosis.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    same = ((earlier.get("model"), earlier.get("dtype"), earlier.get("assembled_tokens"))
            == (args.model, args.dtype, size))
    wanted = {samples[i].id for i in args.diagnose}
    # a rerun at the same model, dtype and size adds to the samples already written
    out = [row for row in earlier.get("samples", []) if same and row["sample_id"] not in wanted]
    for index in args.diagnose:
        sample = samples[index]
        segments = sample.meta["segments"]

        def answer(session, sample=sample) -> dict:
            turns = [session.ask(t.query, max_new_tokens=sample.max_new_tokens, reference=t.answer)
                     for t in sample.turns]
            return {"accuracy": statistics.mean(task.score(r.prediction, t.answer)
                                                for r, t in zip(turns, sample.turns)),
                    "reference_nll": round(statistics.mean(r.reference_nll for r in turns), 4),
                    "predictions": [r.prediction for r in turns]}

        dense = Session(model, tokenizer, "dense", mode="multi-request")
        dense.prefill(sample.context, segments=segments)
        concat = Session(model, tokenizer, "concat", mode="multi-request")
        concat.documents = documents
        concat.prefill(sample.context, segments=segments)
        variants = {"dense": answer(dense), "concat": answer(concat)}
        pieces, _ = dense.format.segment_ids(segments)
        starts = [sum(len(piece) for piece in pieces[:i]) for i in range(len(pieces) + 1)]
        spans = list(zip(starts[1:-1], starts[2:]))
        dense_layers, concat_layers = dense.cache.to_tensors(), concat.cache.to_tensors()
        deviation = [round(statistics.mean(
            float(((c[1][..., a:b, :] - d[1][..., a:b, :]).norm(dim=-1)
                   / d[1][..., a:b, :].norm(dim=-1)).mean())
            for c, d in zip(concat_layers, dense_layers)), 4) for a, b in spans]
        asked = [next(i for i, text in enumerate(segments[1:]) if f"record of {name}." in text)
                 for name in sample.meta["asked"]]
        n = len(spans)
        mixes = {"asked documents from dense": sorted(set(asked)),
                 "other documents from dense": [i for i in range(n) if i not in asked],
                 "first half from dense": list(range(n // 2)),
                 "second half from dense": list(range(n // 2, n))}
        for name, chosen in mixes.items():
            layers = []
            for (keys, values, positions), (dense_keys, dense_values, _) in zip(concat_layers, dense_layers):
                keys, values = keys.clone(), values.clone()
                for i in chosen:
                    a, b = spans[i]
                    keys[:, :, a:b], values[:, :, a:b] = dense_keys[:, :, a:b], dense_values[:, :, a:b]
                layers.append((keys, values, positions.clone()))
            mixed = Session(model, tokenizer, "dense", mode="multi-request")
            mixed.attach(KVCache.from_tensors(layers, next_position=len(concat.context_ids)),
                         concat.context_ids)
            variants[name] = {**answer(mixed), "documents": chosen}
        row = {"sample_id": sample.id, "documents": n, "asked_documents": asked,
               "value_deviation_per_document": deviation, "variants": variants}
        out.append(row)
        print(f"{sample.id}: asked {asked}, value deviation per document {deviation}")
        for name, v in variants.items():
            print(f"  {name:28s} acc {v['accuracy']:.2f} nll {v['reference_nll']:.3f} {v['predictions']}",
                  flush=True)
        payload = {"machine": machine(), "commit": commit(), "model": args.model, "dtype": args.dtype,
                   "assembled_tokens": size, "mode": "multi-request", "store": args.store, "samples": out}
        path.write_text(json.dumps(payload, indent=2) + "\n")


def write_anchors(args) -> None:
    from kvlife.bench.tasks.rag import anchor_document

    task = get_task("rag")
    ANCHORS.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        doc_tokens = task.settings("default", size)["doc_tokens"]
        path = ANCHORS / f"rag-anchor-{size}.txt"
        path.write_text(anchor_document(doc_tokens))
        print(f"wrote {path} ({doc_tokens} tokens' worth)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4096,8192", help="assembled tokens per context, comma-separated")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--methods", default=";".join(METHODS), help="recipes separated by ';' (dense first)")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--store", default="memory,disk:/tmp/runs/blend-docs",
                        help="tiers for the document caches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (TTFTs pair within one count)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="directory of blend-rows.jsonl, blend.json, the report")
    parser.add_argument("--collect", action="store_true", help="only rewrite blend.json from the rows so far")
    parser.add_argument("--retime-dense", action="store_true",
                        help="run dense again where it was not timed on this machine at --threads (its TTFT "
                        "pairs with methods timed here; accuracy keeps pairing with the first dense row)")
    parser.add_argument("--write-anchors", action="store_true",
                        help=f"write {ANCHORS}/rag-anchor-SIZE.txt per size (a document of the rag task's "
                        "kind that no sample holds: a lead_in=FILE for the assemble methods) and stop")
    parser.add_argument("--diagnose", default="",
                        help="sample indices (e.g. 0,2): write blend-diagnosis.json instead")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(";") if m.strip()]
    if "dense" not in args.methods:
        args.methods.insert(0, "dense")
    args.diagnose = [int(i) for i in args.diagnose.split(",") if i.strip()]
    if args.write_anchors:
        write_anchors(args)
    elif args.diagnose:
        diagnose(args)
    elif args.collect:
        collect(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
