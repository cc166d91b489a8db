"""Streaming benchmark: deadline misses, time to first token and quality of the adaptive policy against
every fixed codec level and against always recomputing, over real throttled links.

    flock /tmp/kvlife-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream.py

For each task sample (the default model, default task profile, multi-request) it prefills the context
once (dense), encodes its cache at every level (with a channel-weights profile measured on a held-out
text, as benchmarks/codec.py) and uploads it to a `kvlife stream serve` process on loopback. Then, for
each bandwidth trace, the server's link is restarted on the trace and the client fetches the context:
once per fixed level (a fixed policy ignores the deadline, so one fetch serves every deadline; a fetch
still running at 1.25 x the largest deadline is cut off and counted as a miss), once per deadline with
the adaptive policy. Always-recompute needs no link: one run per sample serves every trace.

Quality is measured on the cache each policy really produced (the adaptive one per run; the same mix
of chunks gives the same cache, so mixes are scored once): accuracy of the model's answers to the
sample's first queries, and over every turn's reference answer (teacher-forced) the perplexity relative
to the dense cache and the KL divergence from the dense cache's next-token distributions (the steadier
signal: a few short answers move perplexity by percents from noise alone). TTFT = time until the context is ready + the first query's prefill and first token on it.
Writes benchmarks/results/stream.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from foundation import machine  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.bench.tasks import get_task  # noqa: E402
from kvlife.session import Session  # noqa: E402
from kvlife.stream import RECOMPUTE, StreamClient, publish  # noqa: E402
from kvlife.stream.client import FetchAborted  # noqa: E402
from kvlife.stream.sessions import attach  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "stream.json"
CALIBRATION_TEXT = Path("/usr/share/common-licenses/LGPL-2.1")
TASKS = ["prefix_suffix", "qa_eng", "repoqa_and_kv"]  # dense turn-1 accuracy >= 75% (benchmarks/results/tasks.json)
# (trace, deadlines in seconds); rates in bits/s as tc writes them
TRACES = [
    ("constant:32mbit", [0.75, 1.5, 3.0]),
    ("step:64mbit,8mbit,0.4", [1.0, 2.0, 4.0]),
    ("walk:24mbit,seed=1", [1.0, 2.0, 4.0]),
    ("step:32mbit,1mbit,0.1", [4.0, 8.0]),  # a deep drop: recomputing beats every level
]


def start_server(root: str) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "kvlife.stream.server", "--root", root, "--port", str(port)],
                               stdout=subprocess.DEVNULL)
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
    attach(session, cache, ids)
    scores, ttfts = [], []
    for turn in sample.turns[:queries]:
        result = session.ask(turn.query, max_new_tokens=sample.max_new_tokens, score_reference=False)
        scores.append(task.score(result.prediction, turn.answer))
        ttfts.append(result.ttft_s)
    logprobs, targets = [], []
    for turn in sample.turns:
        query, reference = session.format.query_ids(turn.query), session.format.reference_ids(turn.answer)
        session.cache.rollback(session.context_checkpoint)
        logits = session.forward(query + reference[:-1], phase="extend", all_logits=True)[len(query) - 1:]
        logprobs.append(torch.log_softmax(logits.float(), dim=-1))
        targets.extend(reference)
        session.cache.rollback(session.context_checkpoint)
    logprobs = torch.cat(logprobs)
    nll = float(-logprobs[torch.arange(len(targets)), torch.tensor(targets)].mean())
    out = {"accuracy": statistics.mean(scores), "nll": nll, "first_token_s": ttfts[0], "reference_tokens": len(targets)}
    if dense is None:
        out["_logprobs"] = logprobs
        out["kl"] = 0.0
    else:
        ref = dense["_logprobs"]
        out["kl"] = float((ref.exp() * (ref - logprobs)).sum(-1).mean())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--samples", type=int, default=1, help="samples per task")
    parser.add_argument("--queries", type=int, default=2, help="queries scored per sample")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--drop-factor", type=float, default=4.0, help="the adaptive planner's insurance (1: off)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="a stream.json of another run (e.g. --drop-factor 1) whose adaptive rows to include")
    args = parser.parse_args()

    import torch

    from kvlife.codec.calibrate import channel_weights
    from kvlife.codec.rope import rope_from_config

    torch.set_num_threads(1)
    model, tokenizer = models.load(models.DEFAULT_MODEL)
    rope = rope_from_config(model.config)
    calibration = tokenizer(CALIBRATION_TEXT.read_text(), return_tensors="pt").input_ids[:, :2048]
    weights = channel_weights(model, calibration, rotary_dim=rope.rotary_dim if rope else 0)
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
                context_id = f"{task_name}-{sample.id}".replace("/", "-").replace(":", "-")[:100]
                manifest = publish(publisher, client, context_id, weights=weights, model_name=models.DEFAULT_MODEL)
                all_levels = manifest.levels
                ids = manifest.token_ids
                sizes = {lv: sum(c.bytes for c in manifest.chunks[lv]) for lv in manifest.levels}
                print(f"{context_id}: {len(ids)} tokens, {manifest.n_chunks} chunks, prefill {prefill.prefill_s:.1f} s, "
                      + ", ".join(f"{lv} {b / 1e6:.2f} MB" for lv, b in sizes.items()), flush=True)
                quality: dict[tuple, dict] = {}
                dense = evaluate(model, tokenizer, task, sample, publisher.cache, ids, args.queries)

                def score(cache, options, quality=quality, task=task, sample=sample, ids=ids, dense=dense):
                    key = tuple(options)
                    if key not in quality:
                        quality[key] = evaluate(model, tokenizer, task, sample, cache, ids, args.queries, dense)
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
                                                     abort_after_s=1.25 * max(deadlines))
                            ready = report.ready_s
                        except FetchAborted:
                            ready = None
                        runs.append({"trace": trace, "policy": level, "ready_s": ready, **quality[(level,) * manifest.n_chunks]})
                    for slo in deadlines:
                        client.set_trace(trace)
                        cache, report = client.fetch(context_id, slo, model=model, drop_factor=args.drop_factor)
                        runs.append({"trace": trace, "policy": "adaptive", "slo": slo, "ready_s": report.ready_s,
                                     "options": report.options(), **score(cache, report.options())})
                        print(f"  {trace} slo {slo:g}: ready {report.ready_s:.2f} s "
                              f"{'met' if report.met else 'MISSED'} {report.options()}", flush=True)
                client.set_trace(None)
                samples_out.append({"sample": context_id, "task": task_name, "tokens": len(ids),
                                    "chunks": manifest.n_chunks, "bytes": sizes, "prefill_s": prefill.prefill_s,
                                    "dense": {k: v for k, v in dense.items() if k != "_logprobs"}, "runs": runs, "wall_s": time.perf_counter() - started})
    finally:
        server.terminate()
        server.wait(10)
    table = summarize(samples_out, all_levels)
    result = {
        "model": models.DEFAULT_MODEL, "machine": machine(), "torch_threads": 1,
        "tasks": args.tasks.split(","), "samples_per_task": args.samples, "queries_per_sample": args.queries,
        "chunk_tokens": 256, "drop_factor": args.drop_factor, "traces": [{"trace": t, "deadlines": d} for t, d in TRACES],
        "recompute_tokens_s": None if client.speeds is None else round(1.0 / client.speeds.per_token_s, 1),
        "notes": ("Server and client on loopback; the server's send rate follows the trace (kvlife.stream.shaper). "
                  "Fixed policies ignore the deadline, so one fetch per trace and level serves every deadline; a "
                  "fixed fetch cut off at 1.25x the largest deadline counts as a miss with no TTFT. Always-recompute "
                  "uses no link: one run per sample serves every trace. ppl change is exp(mean reference NLL) over "
                  "that of the dense cache. Other jobs shared the 2 CPUs while this ran."),
        "summary": table, "samples": samples_out,
    }
    if args.compare is not None:
        other = json.loads(args.compare.read_text())
        result["compare"] = {"drop_factor": other.get("drop_factor", 1.0), "machine": other["machine"],
                             "adaptive": [r for r in other["summary"] if r["policy"] == "adaptive"]}
    args.out.write_text(json.dumps(result, indent=1))
    print_table(table)
    print(f"wrote {args.out}")
    return 0


def summarize(samples: list[dict], levels: list[str]) -> list[dict]:
    """One row per (trace, deadline, policy): miss rate, median TTFT, accuracy, ppl change; plus the target."""
    rows = []
    for trace, deadlines in TRACES:
        for slo in deadlines:
            group = []
            for policy in ["adaptive", *levels, RECOMPUTE]:
                misses, ttfts, accuracy, ppl, kl = [], [], [], [], []
                for sample in samples:
                    run = next(r for r in sample["runs"] if r["trace"] == trace and r["policy"] == policy
                               and r.get("slo", slo) == slo)
                    ready = run["ready_s"]
                    misses.append(ready is None or ready > slo)
                    if ready is not None:
                        ttfts.append(ready + run["first_token_s"])
                    accuracy.append(run["accuracy"])
                    ppl.append(math.exp(run["nll"] - sample["dense"]["nll"]) - 1)
                    kl.append(run["kl"])
                group.append({"trace": trace, "slo": slo, "policy": policy, "miss_rate": statistics.mean(misses),
                              "ttft_s": statistics.median(ttfts) if ttfts else None,
                              "accuracy": statistics.mean(accuracy), "ppl_change": statistics.mean(ppl),
                              "kl": statistics.mean(kl)})
            fixed = [r for r in group if r["policy"] in levels]
            fastest = min(fixed, key=lambda r: (r["miss_rate"], r["ttft_s"] or math.inf))
            meeting = [r for r in fixed if r["miss_rate"] == 0]
            best = max(meeting, key=lambda r: (r["accuracy"], -r["kl"])) if meeting else None
            adaptive = group[0]
            adaptive["target"] = {
                "fewest_misses_fixed": fastest["policy"], "misses_ok": adaptive["miss_rate"] <= fastest["miss_rate"],
                "best_meeting": best["policy"] if best else None,
                "quality_ok": None if best is None else (adaptive["accuracy"] >= best["accuracy"]
                                                         and adaptive["kl"] <= best["kl"]),
            }
            rows.extend(group)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'trace':24} {'slo':>5} {'policy':13} {'miss':>5} {'TTFT s':>7} {'acc':>5} {'ppl %':>7} {'KL':>7}  target")
    for r in rows:
        ttft = f"{r['ttft_s']:.2f}" if r["ttft_s"] is not None else "-"
        target = ""
        if "target" in r:
            t = r["target"]
            target = (f"misses {'ok' if t['misses_ok'] else 'WORSE'} (vs {t['fewest_misses_fixed']}), quality "
                      f"{ {True: 'ok', False: 'WORSE', None: 'n/a'}[t['quality_ok']]} (vs {t['best_meeting']})")
        print(f"{r['trace']:24} {r['slo']:5g} {r['policy']:13} {r['miss_rate']:5.2f} {ttft:>7} {r['accuracy']:5.2f} "
              f"{100 * r['ppl_change']:+7.2f} {r['kl']:7.4f}  {target}")


if __name__ == "__main__":
    sys.exit(main())
