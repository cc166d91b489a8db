"""kvzip's scoring variants on samples no variant was chosen on (held-out seeds), paired against dense.

lifecycle.json screened kvzip's scoring variants on the kv task's 8 samples of seed 0 (the rows
`kvzip(ratio=0.25,...)`) and the best of them was picked there. A pick among several variants on 32
turns flatters it, so this script measures the picked variant, kvzip's default and dense again on
the samples of another seed, multi-request, and reports each one's paired 95% interval against dense
and the variant's against the default on the same samples. Each row also carries `pooled`: its recipe
on its task over every seed measured so far (the rows of earlier invocations, and seed 0's per-sample
scores where lifecycle.json holds them), paired against dense on the samples both have (and a
variant against the default), and `heldout`: the same over the seeds other than 0 only.

    python benchmarks/kvzip_heldout.py                      # seed 1, 8 samples, kv, float32
    python benchmarks/kvzip_heldout.py --recipes "dense;kvzip(ratio=0.25);kvzip(ratio=0.35,alpha=0)"
    python benchmarks/kvzip_heldout.py --recipes "dense;kvzip(ratio=0.25)" --task prefix_suffix --seed 2

Writes benchmarks/results/kvzip-heldout.json (rows of other recipes, tasks or seeds already there are
kept) and prints a table. Runs resume (results/kvzip-heldout/; a finished run is read back, not
measured again); takes /tmp/kvlife-heavy.lock while a model runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from foundation import machine  # noqa: E402
from lifecycle import commit, heavy_lock  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.bench.runner import BenchConfig, read_rows, run  # noqa: E402
from kvlife.bench.stats import paired_difference  # noqa: E402
from kvlife.bench.summary import by_sample  # noqa: E402
from kvlife.errors import KvlifeError  # noqa: E402
from kvlife.recipe import parse  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEFAULT_RECIPES = "dense;kvzip(ratio=0.25);kvzip(ratio=0.25,alpha=0)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=DEFAULT_RECIPES,
                        help="';'-separated: dense first, then the default, then the variants")
    parser.add_argument("--task", default="kv")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="results/kvzip-heldout")
    parser.add_argument("--json", default=str(RESULTS / "kvzip-heldout.json"))
    args = parser.parse_args()
    recipes = [spec.strip() for spec in args.recipes.split(";") if spec.strip()]
    if len(recipes) < 2 or recipes[0] != "dense":
        parser.error("--recipes: dense first, then at least one recipe")
    try:
        for spec in recipes:
            parse(spec)
    except KvlifeError as exc:
        parser.error(f"--recipes: {exc}")
    if args.seed == 0:
        parser.error("--seed: 0 is the screening seed of lifecycle.json; a held-out check needs another")

    model = tokenizer = None
    scores, rows = {}, []
    for spec in recipes:
        config = BenchConfig(model=args.model, tasks=[args.task], mode="multi-request", method=spec,
                             samples=args.samples, seed=args.seed, dtype=args.dtype)
        run_dir = Path(args.out) / config.run_id()
        predictions = run_dir / "predictions.jsonl"
        done = read_rows(predictions) if predictions.exists() else []
        if len(done) < args.samples or not (run_dir / "summary.json").exists():
            if model is None:
                model, tokenizer = models.load(args.model, dtype=args.dtype)
            with heavy_lock():
                run(config, out=run_dir, model=model, tokenizer=tokenizer, progress=False)
            done = read_rows(predictions)
        scores[spec] = {sample: score for (_, sample), score in by_sample(done).items()}
        nll = [r["reference_nll"] for r in done if r.get("reference_nll") is not None]
        row = {"recipe": spec, "task": args.task, "seed": args.seed, "samples": len(scores[spec]),
               "turns": len(done), "accuracy": round(sum(r["score"] for r in done) / max(1, len(done)), 4),
               "reference_nll": round(sum(nll) / len(nll), 4) if nll else None,
               "scores_by_sample": scores[spec], "run": run_dir.name}
        if spec != "dense":
            versus = paired_difference(scores[spec], scores["dense"])
            row.update(dense_accuracy=rows[0]["accuracy"], ratio_to_dense=round(row["accuracy"] / max(
                1e-9, rows[0]["accuracy"]), 3), ci_low=round(versus.low, 4), ci_high=round(versus.high, 4),
                vs_dense=versus.to_dict())
            if spec != recipes[1]:
                row["vs_default"] = paired_difference(scores[spec], scores[recipes[1]]).to_dict()
        rows.append(row)

    # rows of other recipes (or seeds, tasks) measured by earlier invocations are kept
    mine = {(row["recipe"], row["task"], row["seed"]) for row in rows}
    earlier = json.loads(Path(args.json).read_text()).get("rows", []) if Path(args.json).exists() else []
    rows += [row for row in earlier if (row["recipe"], row["task"], row["seed"]) not in mine]
    pool(rows, recipes[1])
    payload = {"about": "kvzip's scoring variants on held-out samples (seed != 0; lifecycle.json screened on "
                        "seed 0), multi-request, paired 95% bootstrap intervals against dense "
                        "('vs_dense') and against the first recipe after dense ('vs_default')",
               "model": args.model, "dtype": args.dtype, "machine": machine(), "commit": commit(),
               "rows": rows}
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"| recipe | accuracy | x dense | vs dense [95%] | vs {recipes[1]} [95%] | NLL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['recipe']} | {row['accuracy']:.2f} | {row.get('ratio_to_dense', 1.0):.3f} | "
              f"{cell(row.get('vs_dense'))} | {cell(row.get('vs_default'))} | {row.get('reference_nll')} |")
    printed = set()
    for row, pooled in ((row, row.get(name)) for name in ("heldout", "pooled") for row in rows):
        if pooled and "vs_dense" in pooled and (row["recipe"], row["task"], *pooled["seeds"]) not in printed:
            printed.add((row["recipe"], row["task"], *pooled["seeds"]))
            print(f"{row['task']}, seeds {', '.join(map(str, pooled['seeds']))} pooled ({pooled['samples']} "
                  f"samples): {row['recipe']} {pooled['accuracy']:.3f} against dense "
                  f"{pooled['dense_accuracy']:.3f}, {pooled['ratio_to_dense']:.3f}x, "
                  f"{cell(pooled['vs_dense'])}" + (f"; against {pooled['vs_default']['recipe']} on its "
                                                    f"{pooled['vs_default']['samples']} samples "
                                                    f"{cell(pooled['vs_default'])}"
                                                    if "vs_default" in pooled else ""))
    print(f"wrote {args.json}")
    return 0


def pool(rows: list[dict], default: str) -> None:
    """Give every row a `pooled` block: its recipe on its task over every seed measured, seed 0's
    per-sample scores from lifecycle.json included (a sample is (seed, sample id)), and a `heldout`
    block: the same over the seeds other than 0 only (the samples nothing was screened or diagnosed
    on). Each has the ratio and the paired interval against dense over the samples both have, and for a
    recipe other than `default` the paired interval against `default` ("vs_default")."""
    by_recipe: dict[tuple[str, str], dict] = {}
    for task in {row["task"] for row in rows}:
        for recipe, screened in screening_scores(task).items():
            found = by_recipe.setdefault((recipe, task), {})
            found.update({(0, sample): score for sample, score in screened.items()})
    for row in rows:
        if row.get("scores_by_sample"):
            by_recipe.setdefault((row["recipe"], row["task"]), {}).update(
                {(row["seed"], sample): s for sample, s in row["scores_by_sample"].items()})
    for row in rows:
        for name, keep in (("pooled", lambda seed: True), ("heldout", lambda seed: seed != 0)):
            scores = {key: score for key, score in by_recipe.get((row["recipe"], row["task"]), {}).items()
                      if keep(key[0])}
            if scores:
                row[name] = pooled_block(row["recipe"], scores, by_recipe.get(("dense", row["task"]), {}),
                                         default, by_recipe.get((default, row["task"]), {}))
            else:
                row.pop(name, None)


def pooled_block(recipe: str, pooled: dict, dense: dict, default: str, baseline: dict) -> dict:
    """One recipe's scores by (seed, sample) summarised, paired with dense's and the default's."""
    block = {"seeds": sorted({seed for seed, _ in pooled}), "samples": len(pooled),
             "accuracy": round(sum(pooled.values()) / len(pooled), 4)}
    common = [key for key in pooled if key in dense]
    if recipe != "dense" and common:
        mean = sum(pooled[key] for key in common) / len(common)
        dense_mean = sum(dense[key] for key in common) / len(common)
        block.update(paired_samples=len(common), dense_accuracy=round(dense_mean, 4),
                     ratio_to_dense=round(mean / max(1e-9, dense_mean), 3),
                     vs_dense=paired_difference({k: pooled[k] for k in common}, dense).to_dict())
    shared = [key for key in pooled if key in baseline]
    if recipe not in ("dense", default) and shared:
        block["vs_default"] = {"recipe": default, "samples": len(shared),
                               **paired_difference({k: pooled[k] for k in shared}, baseline).to_dict()}
    return block


def screening_scores(task: str) -> dict[str, dict]:
    """Per recipe, its per-sample scores on seed 0 (lifecycle.json's raw rows of `task` at the default
    size that recorded them)."""
    path = RESULTS / "lifecycle.json"
    rows = json.loads(path.read_text()).get("rows", []) if path.exists() else []
    return {row["recipe"]: row["scores_by_sample"] for row in rows
            if (row["encoding"], row["task"], row["target_context_tokens"]) == ("raw", task, None)
            and "scores_by_sample" in row}


def cell(found: dict | None) -> str:
    if not found:
        return "-"
    return f"{found['diff']:+.2f} [{found['ci_low']:+.2f}, {found['ci_high']:+.2f}] {found['verdict']}"


if __name__ == "__main__":
    sys.exit(main())
