"""Which layers a compressed kv cache misses: give layers back their full cache, one at a time and in
groups, on the turns that dense answers and the method does not.

For each kv sample (multi-request): the context is prefilled once dense and once with the method. Each
turn's reference answer is teacher-forced after its query on both caches; a turn is *exact* when the
model's top token is the reference's at every position (what greedy decoding needs to reproduce it).
For every turn exact on dense and not on the method's cache, the method's cache is tried again with
dense's layers in place of its own: each layer alone, the *starved* layers together (those holding
under 5% of the context, averaged over their KV heads) and all the others together.

    python benchmarks/kvzip_layers.py                                   # kvzip(ratio=0.25), seed 0
    python benchmarks/kvzip_layers.py --recipe "kvzip(ratio=0.25,alpha=0)"   # KVzip as published

Writes benchmarks/results/kvzip-layers.json (one entry per recipe and seed; others kept) and prints
what it found. Takes /tmp/kvlife-heavy.lock while the model runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from foundation import machine  # noqa: E402
from lifecycle import commit, heavy_lock  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.bench.tasks import get_task  # noqa: E402
from kvlife.errors import KvlifeError  # noqa: E402
from kvlife.methods.compress.keep import real_slots  # noqa: E402
from kvlife.recipe import parse  # noqa: E402
from kvlife.session import Session  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STARVED = 0.05  # a layer holding less than this share of the context is starved


def exact(session: Session, query: str, ref_ids: list[int], dense: Session | None = None,
          layers: list[int] = ()) -> bool:
    """Whether the reference's tokens are the model's top token at every position after the query
    (teacher-forced) on the session's context cache, with dense's cache in `layers` (both caches left
    as they were)."""
    session.cache.rollback(session.context_checkpoint)
    states = {index: dense.cache.layers[index].checkpoint() for index in layers}
    for index in layers:
        session.cache.layers[index] = dense.cache.layers[index]
    try:
        query_ids = session.format.query_ids(query)
        logits = session.forward(query_ids + ref_ids[:-1], phase="extend", all_logits=True)
        return logits[len(query_ids) - 1:].argmax(-1).tolist() == ref_ids
    finally:
        for index, state in states.items():
            dense.cache.layers[index].rollback(state)
        session.cache.rollback(session.context_checkpoint)  # the method's own layer objects again


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="kvzip(ratio=0.25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=str(RESULTS / "kvzip-layers.json"))
    args = parser.parse_args()
    try:
        recipe = parse(args.recipe)
    except KvlifeError as exc:
        parser.error(f"--recipe: {exc}")
    if recipe.compress is None:
        parser.error("--recipe: needs a compress method (its cache is compared with dense's)")
    if args.samples < 1:
        parser.error("--samples: at least 1")

    model, tokenizer = models.load(args.model, dtype=args.dtype)
    samples = get_task("kv").samples("default", args.samples, args.seed, None)
    found = []
    with heavy_lock(), torch.no_grad():
        for sample in samples:
            dense = Session(model, tokenizer, None, mode="multi-request")
            dense.prefill(sample.context)
            method = Session(model, tokenizer, args.recipe, mode="multi-request")
            method.prefill(sample.context)
            n = len(method.context_ids)
            shares = [float(real_slots(layer).float().sum(1).mean()) / n for layer in method.cache.layers]
            starved = [index for index, share in enumerate(shares) if share < STARVED]
            others = [index for index in range(len(shares)) if index not in starved]
            turns = []
            for number, turn in enumerate(sample.turns, 1):
                query, ref = turn.query, method.format.reference_ids(turn.answer)
                row = {"turn": number, "dense_exact": exact(dense, query, ref),
                       "exact": exact(method, query, ref)}
                if row["dense_exact"] and not row["exact"]:
                    row["fixed_by_layer"] = [index for index in range(len(shares))
                                             if exact(method, query, ref, dense, [index])]
                    row["fixed_by_starved"] = exact(method, query, ref, dense, starved)
                    row["fixed_by_others"] = exact(method, query, ref, dense, others)
                turns.append(row)
            found.append({"sample": sample.id, "context_tokens": n, "starved": starved, "turns": turns,
                          "layer_share": [round(share, 4) for share in shares]})
            print(f"{sample.id}: starved layers {starved}; " + "; ".join(
                f"turn {t['turn']}: dense {'ok' if t['dense_exact'] else 'miss'}, method "
                f"{'ok' if t['exact'] else 'miss'}" + (
                    f" (fixed by layer {t['fixed_by_layer']}, starved {t['fixed_by_starved']}, "
                    f"others {t['fixed_by_others']})" if "fixed_by_layer" in t else "")
                for t in turns), flush=True)

    misses = [t for entry in found for t in entry["turns"] if "fixed_by_layer" in t]
    summary = {"method_misses_dense_exact": len(misses),
               "fixed_by_starved": sum(t["fixed_by_starved"] for t in misses),
               "fixed_by_others": sum(t["fixed_by_others"] for t in misses),
               "fixed_by_one_layer": sum(bool(t["fixed_by_layer"]) for t in misses)}
    entry = {"recipe": args.recipe, "seed": args.seed, "samples": len(found), "summary": summary,
             "by_sample": found, "model": args.model, "dtype": args.dtype, "machine": machine(),
             "commit": commit()}
    path = Path(args.json)
    earlier = json.loads(path.read_text()).get("entries", []) if path.exists() else []
    entries = [e for e in earlier if (e["recipe"], e["seed"]) != (args.recipe, args.seed)] + [entry]
    path.write_text(json.dumps({
        "about": "kv turns (multi-request) that dense answers exactly and a compressed cache does not "
                 "(teacher-forced), tried again with dense's cache in one layer, in the starved layers "
                 f"(under {STARVED:.0%} of the context kept) or in all the others",
        "entries": entries}, indent=2) + "\n")
    print(f"{args.recipe}, seed {args.seed}: {summary['method_misses_dense_exact']} turns exact on dense and "
          f"missed; fixed by the starved layers' full cache: {summary['fixed_by_starved']}, by all the "
          f"others': {summary['fixed_by_others']}, by one layer's: {summary['fixed_by_one_layer']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
