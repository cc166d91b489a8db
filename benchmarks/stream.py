"""Streaming benchmark: deadline misses, time to first token and quality of the adaptive policy against
every fixed codec level and against always recomputing, over real throttled links.

    flock /tmp/kvlife-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream.py

For each task sample (the default model, default task profile, multi-request) it prefills the context
once (dense), encodes its cache at every level (with a channel-weights profile measured on a held-out
text, as benchmarks/codec.py) and uploads it to a `kvlife stream serve` process (`kvlife serve`) on loopback.
Then, for each bandwidth trace, the server's link is restarted on the trace and the client fetches the
context: once per fixed level (a fixed policy ignores the deadline, so one fetch serves every deadline; a
fetch still running at 1.25 x the largest deadline is cut off and counted as a miss), once per deadline with
the adaptive policy. Always-recompute needs no link: one run per sample serves every trace.

Quality is measured on the cache each policy really produced (the adaptive one per run; the same mix
of chunks gives the same cache, so mixes are scored once): accuracy of the model's answers to the
sample's queries (`--queries`, 4: every turn of the default tasks; 2 before results/stream.json of this
version), and over every turn's reference answer (teacher-forced) the perplexity relative
to the dense cache and the KL divergence from the dense cache's next-token distributions (the steadier
signal: a few short answers move perplexity by percents from noise alone). TTFT = time until the context is
ready + the first query's prefill and first token on it. Writes benchmarks/results/stream.json and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402
from common import print_table as print_table_rows  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.backends.loopback import free_port  # noqa: E402
from kvlife.bench.tasks import get_task  # noqa: E402
from kvlife.session import Session  # noqa: E402
from kvlife.stream import RECOMPUTE, FetchAborted, FetchConfig, StreamClient, publish  # noqa: E402
from kvlife.stream.config import parse_discount  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "stream.json"
CALIBRATION_TEXT = Path("/usr/share/common-licenses/LGPL-2.1")
# dense turn-1 accuracy >= 75% (benchmarks/results/tasks.json)
TASKS = ["prefix_suffix", "qa_eng", "repoqa_and_kv"]
# (trace, deadlines in seconds); rates in bits/s as tc writes them
TRACES = [
    ("constant:32mbit", [0.75, 1.5, 3.0]),
    ("step:64mbit,8mbit,0.4", [1.0, 2.0, 4.0]),
    ("walk:24mbit,seed=1", [1.0, 2.0, 4.0]),
    ("step:32mbit,1mbit,0.1", [4.0, 8.0]),  # a deep drop: recomputing beats every level
]


def load_model_and_weights() -> tuple:
    """The default model (one torch thread) and the codec's channel weights measured on a held-out text."""
    import torch

    from kvlife.codec.calibrate import channel_weights
    from kvlife.codec.rope import rope_from_config

    torch.set_num_threads(1)
    model, tokenizer = models.load(models.DEFAULT_MODEL)
    rope = rope_from_config(model.config)
    calibration = tokenizer(CALIBRATION_TEXT.read_text(), return_tensors="pt").input_ids[:, :2048]
    return model, tokenizer, channel_weights(model, calibration, rotary_dim=rope.rotary_dim if rope else 0)


def context_id_for(task_name: str, sample) -> str:
    return f"{task_name}-{sample.id}".replace("/", "-").replace(":", "-")[:100]


def fetch_record(report) -> dict:
    """What a run keeps of an adaptive fetch: when it was ready (and when every chunk was first in), each
    chunk's final option, the requests given up, and per chunk every decision of the first pass, the ready
    time its plan predicted and the better levels it was fetched at again (refinement)."""
    return {"ready_s": report.ready_s, "complete_s": report.complete_s, "options": report.options(),
            "refined": [c.refined for c in report.chunks], "refine_stopped": report.refine_stopped,
            "abandoned": sum(len(c.abandoned) for c in report.chunks),
            "planned": [c.planned for c in report.chunks],
            "predicted_ready_s": [round(c.predicted_ready_s, 3) for c in report.chunks]}


def compare_rows(path: Path) -> dict:
    """The adaptive rows of another run's stream.json, with the settings they were made with."""
    other = json.loads(path.read_text())
    return {
        "drop_factor": other.get("drop_factor", 1.0),
        "discount": other.get("discount", "1"),
        "refine_discount": other.get("refine_discount", "as discount"),
        "machine": other["machine"],
        "adaptive": [r for r in other["summary"] if r["policy"] == "adaptive"],
    }


def start_server(root: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "kvlife.cli", "stream", "serve", "--root", root,
                                "--port", str(port)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("kvlife stream serve did not start")


def evaluate(model, tokenizer, task, sample, cache, ids, queries: int, dense: dict | None = None) -> dict:
    """On a context cache: accuracy of the answers to the first `queries` turns (greedy), and over every
    turn's reference answer (teacher-forced) the mean NLL and the KL divergence from the dense cache's
    next-token distributions (`dense`: this function's output on the dense cache)."""
    import torch

    session = Session(model, tokenizer, "dense", mode="multi-request")
    session.attach(cache, ids)
    scores, ttfts = [], []
    for turn in sample.turns[:queries]:
        result = session.ask(turn.query, max_new_tokens=sample.max_new_tokens, score_reference=False)
        scores.append(task.score(result.prediction, turn.answer))
        ttfts.append(result.ttft_s)
    logprobs, targets = reference_logprobs(session, sample)
    token_nll = -logprobs[torch.arange(len(targets)), targets]
    out = {
        "accuracy": statistics.mean(scores),
        "scores": scores,
        "nll": float(token_nll.mean()),
        "first_token_s": ttfts[0],
        "reference_tokens": len(targets),
        "token_nll": [round(float(x), 5) for x in token_nll],
    }
    if dense is None:
        out["_logprobs"] = logprobs
        out["kl"] = 0.0
    else:
        ref = dense["_logprobs"]
        out["kl"] = float((ref.exp() * (ref - logprobs)).sum(-1).mean())
    return out


def reference_logprobs(session, sample) -> tuple:
    """Next-token log-probabilities over every turn's reference answer (teacher-forced on the session's
    context, rolled back after each turn), and the reference tokens."""
    import torch

    logprobs, targets = [], []
    for turn in sample.turns:
        query, reference = session.format.query_ids(turn.query), session.format.reference_ids(turn.answer)
        session.cache.rollback(session.context_checkpoint)
        logits = session.forward(query + reference[:-1], phase="extend", all_logits=True)[len(query) - 1:]
        logprobs.append(torch.log_softmax(logits.float(), dim=-1))
        targets.extend(reference)
        session.cache.rollback(session.context_checkpoint)
    return torch.cat(logprobs), torch.tensor(targets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--samples", type=int, default=1, help="samples per task")
    parser.add_argument("--queries", type=int, default=4,
                        help="queries whose answers are scored per sample (the default tasks have 4 turns)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--drop-factor", type=float, default=2.0, help="the adaptive planner's insurance (1: off)"
    )
    parser.add_argument(
        "--discount",
        default="wide",
        help="the adaptive planner's throughput discount: a number >= 1 (1: off) or 'wide' (each "
        "level's size step where it is 2x or more, the client's default)",
    )
    parser.add_argument("--refine-discount", default="1",
                        help="the same for the adaptive client's refinement (the client's default, 1: off)")
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="a stream.json of another run (e.g. --drop-factor 1) whose adaptive rows to include",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="run nothing: print this stream.json's summary as the Markdown table of docs/streaming.md",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="run nothing: combine these partial results (runs of one --tasks each) into --out",
    )
    args = parser.parse_args()
    try:
        discount = parse_discount(args.discount)
    except ValueError as exc:
        parser.error(f"--discount {exc}")
    try:
        refine_discount = parse_discount(args.refine_discount)
    except ValueError as exc:
        parser.error(f"--refine-discount {exc}")
    needed = [
        (args.markdown, "summary"),
        (args.compare, "summary"),
        *((path, "samples") for path in args.merge or []),
    ]
    for path, key in needed:
        if path is not None:
            try:
                json.loads(path.read_text())[key]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                parser.error(f"{path} is not a stream.json or a partial result of this script: {exc!r}")
    if args.markdown:
        print_markdown(json.loads(args.markdown.read_text())["summary"])
        return 0
    if args.merge:
        return merge(args.merge, args.out, args.compare)
    config = FetchConfig(drop_factor=args.drop_factor, discount=discount, refine_discount=refine_discount)

    model, tokenizer, weights = load_model_and_weights()
    root = tempfile.mkdtemp(prefix="kvlife-stream-bench-")
    server, url = start_server(root)
    client = StreamClient(url)
    all_levels: list[str] = []
    samples_out = []
    try:
        for task_name in args.tasks.split(","):
            task = get_task(task_name)
            for sample in task.samples("default", n=args.samples):
                started = time.perf_counter()
                publisher = Session(model, tokenizer, "dense", mode="multi-request")
                prefill = publisher.prefill(sample.context)
                context_id = context_id_for(task_name, sample)
                manifest = publish(
                    publisher, client, context_id, weights=weights, model_name=models.DEFAULT_MODEL
                )
                all_levels = manifest.levels
                ids = manifest.token_ids
                sizes = {lv: sum(c.bytes for c in manifest.chunks[lv]) for lv in manifest.levels}
                print(
                    f"{context_id}: {len(ids)} tokens, {manifest.n_chunks} chunks, prefill "
                    f"{prefill.prefill_s:.1f} s, "
                    + ", ".join(f"{lv} {b / 1e6:.2f} MB" for lv, b in sizes.items()),
                    flush=True,
                )
                quality: dict[tuple, dict] = {}
                dense = evaluate(model, tokenizer, task, sample, publisher.cache, ids, args.queries)

                def score(cache, options, quality=quality, task=task, sample=sample, ids=ids, dense=dense):
                    key = tuple(options)
                    if key not in quality:
                        quality[key] = evaluate(
                            model, tokenizer, task, sample, cache, ids, args.queries, dense
                        )
                    return quality[key]

                runs = []
                client.set_trace(None)
                cache, report = client.fetch(context_id, 600.0, model=model, policy=RECOMPUTE)
                recompute_run = {"policy": RECOMPUTE, "ready_s": report.ready_s, "options": report.options(),
                                 **score(cache, report.options())}
                for level in manifest.levels:  # unshaped: the quality of each fixed level
                    cache, report = client.fetch(context_id, 600.0, model=model, policy=level)
                    score(cache, report.options())
                for trace, deadlines in TRACES:
                    runs.append({**recompute_run, "trace": trace})
                    for level in manifest.levels:
                        client.set_trace(trace)
                        try:
                            _, report = client.fetch(context_id, max(deadlines), model=model, policy=level,
                                                     config=FetchConfig(abort_after_s=1.25 * max(deadlines)))
                            ready = report.ready_s
                        except FetchAborted:
                            ready = None
                        runs.append(
                            {
                                "trace": trace,
                                "policy": level,
                                "ready_s": ready,
                                **quality[(level,) * manifest.n_chunks],
                            }
                        )
                    for slo in deadlines:
                        client.set_trace(trace)
                        cache, report = client.fetch(context_id, slo, model=model, config=config)
                        runs.append({"trace": trace, "policy": "adaptive", "slo": slo, **fetch_record(report),
                                     **score(cache, report.options())})
                        print(f"  {trace} slo {slo:g}: ready {report.ready_s:.2f} s "
                              f"{'met' if report.met else 'MISSED'} {report.options()}", flush=True)
                client.set_trace(None)
                samples_out.append(
                    {
                        "sample": context_id,
                        "task": task_name,
                        "tokens": len(ids),
                        "chunks": manifest.n_chunks,
                        "bytes": sizes,
                        "prefill_s": prefill.prefill_s,
                        "dense": {k: v for k, v in dense.items() if k != "_logprobs"},
                        "runs": runs,
                        "wall_s": time.perf_counter() - started,
                    }
                )
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(root, ignore_errors=True)  # the published contexts: tens of MB per sample
    result = {
        "model": models.DEFAULT_MODEL, "machine": machine(), "torch_threads": 1,
        "tasks": args.tasks.split(","), "samples_per_task": args.samples, "queries_per_sample": args.queries,
        "chunk_tokens": 256, "drop_factor": args.drop_factor, "discount": args.discount,
        "refine_discount": args.refine_discount,
        "traces": [{"trace": t, "deadlines": d} for t, d in TRACES],
        "recompute_tokens_s": None if client.speeds is None else round(1.0 / client.speeds.per_token_s, 1),
        "notes": NOTES,
        "samples": samples_out,
    }
    args.out.write_text(json.dumps(result, indent=1))  # the runs are kept even if the summary below fails
    result["summary"] = table = summarize(samples_out, all_levels)
    if args.compare is not None:
        result["compare"] = compare_rows(args.compare)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(table)
    print(f"wrote {args.out}")
    return 0


BOOTSTRAP_DRAWS = 2000
NOTES = (
    "Server and client on loopback; the server's send rate follows the trace (kvlife.store.shaper). Fixed "
    "policies ignore the deadline, so one fetch per trace and level serves every deadline; a fixed fetch cut "
    "off at 1.25x the largest deadline counts as a miss with no TTFT. Always-recompute uses no link: one run "
    "per sample serves every trace. ppl change is exp(mean reference NLL) over that of the dense cache; the "
    "target's quality test is in summarize()'s docstring (accuracy and ppl change each not worse than any "
    "meeting fixed level's beyond a paired bootstrap's 5% point; the strict accuracy comparison and KL are "
    "reported beside it). Run under the project's CPU lock (no other heavy job; lighter jobs may have run), "
    "one task per process, merged with --merge."
)


def ppl_change(runs: list[dict], dense: list[dict]) -> float:
    """Mean over samples of exp(mean reference NLL - that of the dense cache) - 1."""
    import numpy as np

    changes = []
    for run, base in zip(runs, dense, strict=True):
        tokens = np.asarray(run["token_nll"]) - np.asarray(base["token_nll"])
        changes.append(math.exp(float(tokens.mean())) - 1)
    return statistics.mean(changes)


def ppl_difference(runs: list[dict], other: list[dict], dense: list[dict], seed: int = 0) -> dict:
    """ppl change of `runs` minus that of `other` (same samples, same reference tokens), with a paired
    bootstrap over the reference tokens of each sample: the 5% and 95% points of the difference."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = np.zeros(BOOTSTRAP_DRAWS)
    for run, alt, base in zip(runs, other, dense, strict=True):
        reference = np.asarray(base["token_nll"])
        mine, theirs = np.asarray(run["token_nll"]) - reference, np.asarray(alt["token_nll"]) - reference
        picks = rng.integers(0, len(reference), (BOOTSTRAP_DRAWS, len(reference)))
        draws += np.exp(mine[picks].mean(axis=1)) - np.exp(theirs[picks].mean(axis=1))
    low, high = np.quantile(draws / len(runs), [0.05, 0.95])
    return {
        "diff": ppl_change(runs, dense) - ppl_change(other, dense),
        "low": float(low),
        "high": float(high),
    }


def answer_scores(runs: list[dict]) -> list[float]:
    """One policy's per-answer scores over the samples, in order (a result made before per-answer scores were
    kept has one figure per sample, its mean accuracy)."""
    return [score for run in runs for score in run.get("scores", [run["accuracy"]])]


def accuracy_difference(runs: list[dict], other: list[dict], seed: int = 0) -> dict:
    """Accuracy of `runs` minus that of `other` over the same answers (same samples, same queries), with a
    paired bootstrap over the answers: the 5% and 95% points of the difference, and the answers each got
    right where the other did not (`wins`, `losses`)."""
    import numpy as np

    diff = np.asarray(answer_scores(runs)) - np.asarray(answer_scores(other))
    rng = np.random.default_rng(seed)
    draws = diff[rng.integers(0, len(diff), (BOOTSTRAP_DRAWS, len(diff)))].mean(axis=1)
    low, high = np.quantile(draws, [0.05, 0.95])
    return {"diff": float(diff.mean()), "low": float(low), "high": float(high), "answers": len(diff),
            "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum())}


def quality_test(candidate: str, meeting: list[str], picked: dict, dense: list[dict]) -> dict:
    """The target's quality half for one policy against the fixed levels in `meeting` (the candidate itself
    left out): accuracy and ppl change each not worse than any of theirs beyond noise, and the strict
    accuracy comparison (at least the highest of theirs) beside it."""
    others = [level for level in meeting if level != candidate]
    if not others:
        return {"quality_ok": True, "accuracy_ok": True, "accuracy_strict_ok": True, "ppl_ok": True}
    accuracy = {level: accuracy_difference(picked[candidate], picked[level]) for level in others}
    ppl = {level: ppl_difference(picked[candidate], picked[level], dense) for level in others}
    acc_worst = min(accuracy, key=lambda level: accuracy[level]["high"])
    ppl_worst = max(ppl, key=lambda level: ppl[level]["low"])
    mine = statistics.mean(answer_scores(picked[candidate]))
    out = {
        "accuracy_ok": all(v["high"] >= 0 for v in accuracy.values()),
        "accuracy_strict_ok": all(mine >= statistics.mean(answer_scores(picked[level])) for level in others),
        "accuracy_vs": acc_worst,
        "accuracy_diff": accuracy[acc_worst],
        "ppl_ok": all(v["low"] <= 0 for v in ppl.values()),
        "ppl_vs": ppl_worst,
        "ppl_diff": ppl[ppl_worst],
    }
    out["quality_ok"] = out["accuracy_ok"] and out["ppl_ok"]
    return out


def summarize(samples: list[dict], levels: list[str]) -> list[dict]:
    """One row per (trace, deadline, policy): miss rate, median TTFT, accuracy, ppl change; plus the target.

    The target's quality half, as the issue defines quality (perplexity change and task accuracy): against
    every fixed level that meets the deadline (no miss on any sample), the adaptive policy is not worse
    beyond noise in either: the 95% point of a paired bootstrap of its accuracy minus the level's
    (resampling the answers) is >= 0, and the 5% point of one of its ppl change minus the level's
    (resampling each sample's reference tokens) is <= 0. Beside it: the strict accuracy comparison (at
    least the highest accuracy of a meeting level; `accuracy_strict_ok`), and KL from the dense cache
    (`kl_ok`: no higher than the lowest KL of a meeting level), which is not the target. `top_check`: the
    same tests applied to the best meeting level (the codec's order) against the other meeting levels, a
    policy the target should pass: with a few dozen answers the strict comparison often fails it, since
    a worse level answers one or two more questions by chance."""
    rows = []
    dense = [sample["dense"] for sample in samples]
    for trace, deadlines in TRACES:
        for slo in deadlines:
            group, picked = [], {}
            for policy in ["adaptive", *levels, RECOMPUTE]:
                misses, ttfts, kl, runs = [], [], [], []
                for sample in samples:
                    run = next(r for r in sample["runs"] if r["trace"] == trace and r["policy"] == policy
                               and r.get("slo", slo) == slo)
                    ready = run["ready_s"]
                    misses.append(ready is None or ready > slo)
                    if ready is not None:
                        ttfts.append(ready + run["first_token_s"])
                    kl.append(run["kl"])
                    runs.append(run)
                picked[policy] = runs
                group.append(
                    {
                        "trace": trace,
                        "slo": slo,
                        "policy": policy,
                        "miss_rate": statistics.mean(misses),
                        "ttft_s": statistics.median(ttfts) if ttfts else None,
                        "accuracy": statistics.mean(answer_scores(runs)),
                        "ppl_change": ppl_change(runs, dense),
                        "kl": statistics.mean(kl),
                    }
                )
            fixed = [r for r in group if r["policy"] in levels]
            fastest = min(fixed, key=lambda r: (r["miss_rate"], r["ttft_s"] or math.inf))
            meeting_rows = [r for r in fixed if r["miss_rate"] == 0]
            meeting = [r["policy"] for r in meeting_rows]
            adaptive = group[0]
            target = {
                "fewest_misses_fixed": fastest["policy"],
                "misses_ok": adaptive["miss_rate"] <= fastest["miss_rate"],
                "meeting_fixed": meeting,
                "best_meeting": None,
                "quality_ok": None,
            }
            if meeting:
                best = max(meeting_rows, key=lambda r: (r["accuracy"], -r["ppl_change"]))
                target.update(quality_test("adaptive", meeting, picked, dense))
                target["best_meeting"] = best["policy"]
                target["kl_ok"] = adaptive["kl"] <= min(r["kl"] for r in meeting_rows)
                top = quality_test(meeting[0], meeting, picked, dense)
                target["top_check"] = {
                    "level": meeting[0],
                    **{key: top[key] for key in ("accuracy_strict_ok", "accuracy_ok", "ppl_ok")},
                }
            adaptive["target"] = target
            rows.extend(group)
    return rows


def merge(paths: list[Path], out: Path, compare: Path | None = None) -> int:
    """Combine partial results (one --tasks each, same code and settings) into one file with one summary."""
    parts = [json.loads(path.read_text()) for path in paths]
    result = {key: value for key, value in parts[0].items() if key not in ("summary", "samples")}
    result["tasks"] = [task for part in parts for task in part["tasks"]]
    result["samples"] = [sample for part in parts for sample in part["samples"]]
    result["runs_merged"] = [{"tasks": part["tasks"], "machine": part["machine"]} for part in parts]
    result["notes"] = NOTES  # the summary below is this version's
    levels = [level for level in result["samples"][0]["bytes"]]
    result["summary"] = summarize(result["samples"], levels)
    if compare is not None:
        result["compare"] = compare_rows(compare)
    out.write_text(json.dumps(result, indent=1))
    print_table(result["summary"])
    print(f"wrote {out}")
    return 0


def print_table(rows: list[dict]) -> None:
    cells = []
    for r in rows:
        target = ""
        if "target" in r:
            t = r["target"]
            target = (
                f"misses {'ok' if t['misses_ok'] else 'WORSE'} (vs {t['fewest_misses_fixed']}), quality "
                f"{ {True: 'ok', False: 'WORSE', None: 'n/a'}[t['quality_ok']] } (best {t['best_meeting']})"
            )
        cells.append([r["trace"], f"{r['slo']:g}", r["policy"], f"{r['miss_rate']:.2f}",
                      f"{r['ttft_s']:.2f}" if r["ttft_s"] is not None else "-", f"{r['accuracy']:.2f}",
                      f"{100 * r['ppl_change']:+.2f}", f"{r['kl']:.4f}", target])
    print_table_rows(["trace", "slo", "policy", "miss", "TTFT s", "acc", "ppl %", "KL", "target"], cells)


def print_markdown(rows: list[dict]) -> None:
    """The summary as docs/streaming.md shows it: per (trace, deadline) the adaptive policy, the fixed level
    with the fewest misses, the best fixed level that meets the deadline, and the target's verdict."""

    def cell(r: dict) -> str:
        ttft = f"{r['ttft_s']:.2f}" if r["ttft_s"] is not None else "-"
        return (f"{r['miss_rate']:.2f} / {ttft} / {100 * r['ppl_change']:+.1f}% / {r['accuracy']:.2f} / "
                f"{r['kl']:.3f}")

    print(
        "| trace | slo s | adaptive | fewest-miss fixed | best fixed meeting it | misses / quality (ppl and "
        "accuracy differences, 90% CIs; KL) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    counts = {"misses": 0, "quality": 0, "rows": 0, "quality_rows": 0, "strict": 0,
              "top_accuracy_strict_ok": 0, "top_accuracy_ok": 0, "top_ppl_ok": 0}
    for r in rows:
        if "target" not in r:
            continue
        t = r["target"]
        group = {x["policy"]: x for x in rows if x["trace"] == r["trace"] and x["slo"] == r["slo"]}
        fastest = group[t["fewest_misses_fixed"]]
        best = f"{t['best_meeting']}: {cell(group[t['best_meeting']])}" if t["best_meeting"] else "none"
        verdict = "yes" if t["misses_ok"] else "no"
        counts["rows"] += 1
        counts["misses"] += t["misses_ok"]
        if t["quality_ok"] is None:
            verdict += " / n/a"
        else:
            counts["quality_rows"] += 1
            counts["quality"] += t["quality_ok"]
            counts["strict"] += t["accuracy_strict_ok"]
            for key in ("accuracy_strict_ok", "accuracy_ok", "ppl_ok"):
                counts["top_" + key] += t["top_check"][key]
            d, a = t["ppl_diff"], t["accuracy_diff"]
            verdict += (
                f" / {'yes' if t['quality_ok'] else 'no'} (ppl {100 * d['diff']:+.1f} pts vs {t['ppl_vs']}, "
                f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]; acc {100 * a['diff']:+.1f} pts vs "
                f"{t['accuracy_vs']}, [{100 * a['low']:+.1f}, {100 * a['high']:+.1f}], "
                f"{a['wins']}+/{a['losses']}- of {a['answers']}, strict "
                f"{'ok' if t['accuracy_strict_ok'] else 'lower'}; KL {'ok' if t['kl_ok'] else 'higher'})"
            )
        print(
            f"| `{r['trace']}` | {r['slo']:g} | {cell(r)} | {t['fewest_misses_fixed']}: {cell(fastest)} | "
            f"{best} | {verdict} |"
        )
    print(f"\nmisses ok in {counts['misses']} of {counts['rows']} rows; quality ok in {counts['quality']} of "
          f"{counts['quality_rows']} rows with a meeting fixed level (strict accuracy comparison: ok in "
          f"{counts['strict']})")
    print(
        f"the same tests on the best meeting fixed level of each row against the other meeting levels: the "
        f"accuracy test passes in {counts['top_accuracy_ok']} of {counts['quality_rows']} rows, the ppl test "
        f"in {counts['top_ppl_ok']}, the strict accuracy comparison in {counts['top_accuracy_strict_ok']}"
    )


if __name__ == "__main__":
    sys.exit(main())
