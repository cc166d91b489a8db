"""Planner settings compared on shaped links: deadline misses and the levels each setting chose, against
every fixed level, with no quality evaluation (so minutes, not an hour; benchmarks/stream.py scores quality).

    flock /tmp/kvlife-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_policies.py

It publishes `--samples` contexts per task of benchmarks/stream.py (the model is loaded once, to prefill
and encode them), then, over the shaped traces of benchmarks/stream.py except the 1 Mbit/s drop (which
needs recomputing, so the model in the client; `--traces` names others), fetches each context at every
fixed level (one fetch per trace and level serves every deadline) and once per deadline with each planner
setting. The client has no model: nothing is recomputed, every chunk is fetched and decoded. Per
(trace, deadline, setting): the deadline misses, and the chosen levels against the best fixed level that met
the deadline on every sample: `level_ok` counts the fetches whose every chunk is at that level or better,
`mean_rank` is the mean level rank of the chunks (0 = lossless-ish) beside that level's rank. The level check
is a proxy for quality, stricter than stream.py's test (a chunk one level lower fails it). Writes
benchmarks/results/stream-policies.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import commit, machine  # noqa: E402

from kvlife.errors import KvlifeError  # noqa: E402
from kvlife.store.trace import TraceError, parse_trace  # noqa: E402
from kvlife.stream import FetchAborted, FetchConfig, StreamClient, publish  # noqa: E402
from kvlife.stream.config import parse_discount  # noqa: E402
from stream import TASKS, TRACES, context_id_for, fetch_record, load_model_and_weights, start_server  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "stream-policies.json"
SHAPED = [(trace, deadlines) for trace, deadlines in TRACES if "1mbit" not in trace]
# (discount, drop factor): no discount, a uniform one, the wide steps (the client's default), the wide steps
# without the insurance
SETTINGS = ["1,2", "1.3,2", "wide,2", "wide,1"]
SCHEMA = "stream-policies/1"


def publish_samples(
    client: StreamClient, tasks: list[str], samples: int, loaded: tuple | None = None
) -> list[str]:
    """Prefill and publish the samples; `loaded`: `load_model_and_weights()`'s result, if the caller has
    it."""
    from kvlife import models
    from kvlife.bench.tasks import get_task
    from kvlife.session import Session

    model, tokenizer, weights = loaded if loaded is not None else load_model_and_weights()
    ids = []
    for task_name in tasks:
        for sample in get_task(task_name).samples("default", n=samples):
            session = Session(model, tokenizer, "dense", mode="multi-request")
            session.prefill(sample.context)
            context_id = context_id_for(task_name, sample)
            manifest = publish(session, client, context_id, weights=weights, model_name=models.DEFAULT_MODEL)
            print(
                f"published {context_id}: {len(manifest.token_ids)} tokens, {manifest.n_chunks} chunks",
                flush=True,
            )
            ids.append(context_id)
    return ids


POSITIONAL = ["discount", "drop", "step_up", "refine"]
KEYED = [*POSITIONAL, "refine_discount", "window", "detect"]
FIELDS = {"discount": "discount", "drop": "drop_factor", "step_up": "step_up_margin", "refine": "refine",
          "refine_discount": "refine_discount", "window": "throughput_window", "detect": "detect_s"}


def parse_setting(text: str) -> FetchConfig:
    """DISCOUNT,DROP_FACTOR[,STEP_UP_MARGIN[,REFINE]][,KEY=VALUE...] as a FetchConfig; fields left out keep
    FetchConfig's defaults. REFINE is 1 (refine the worst chunks with the time left) or 0. Keyed fields (any
    of discount, drop, step_up, refine, refine_discount, window, detect) follow: refine_discount a discount (a
    number or wide); window the throughput estimate's samples (an integer >= 1); detect the seconds of the
    recent rate a chunk in flight is judged by. ValueError (or StreamError) names what is wrong. Settings
    that name options since removed (levels, lift, first_lift) are kept in their results files
    (benchmarks/results/INDEX.md)."""
    fields: dict[str, str] = {}
    for k, part in enumerate(text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            if fields.keys() - set(POSITIONAL) or k >= len(POSITIONAL):
                raise ValueError(f"too many positional fields in {text!r}")
            key, value = POSITIONAL[k], part
        if key not in KEYED or key in fields:
            raise ValueError(f"unknown or repeated field {key!r} in {text!r}")
        fields[key] = value
    if "discount" not in fields or "drop" not in fields:
        raise ValueError(f"DISCOUNT and DROP_FACTOR are needed in {text!r}")
    if fields.get("refine", "1") not in ("0", "1"):
        raise ValueError(f"REFINE is 0 or 1 in {text!r}")
    parse = {"discount": parse_discount, "refine_discount": parse_discount, "refine": lambda v: v == "1",
             "window": int, "drop": float, "step_up": float, "detect": float}
    # checked up front
    return FetchConfig(**{FIELDS[key]: parse[key](value) for key, value in fields.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--samples", type=int, default=3, help="samples per task")
    parser.add_argument(
        "--settings",
        default=";".join(SETTINGS),
        help="planner settings 'DISCOUNT,DROP_FACTOR[,STEP_UP_MARGIN[,REFINE]][,KEY=VALUE...]' separated "
        "by ';' (DISCOUNT: a number or wide; REFINE: 1, the default, or 0; keys: "
        "refine_discount=D, window=N, detect=SECONDS)",
    )
    parser.add_argument(
        "--traces",
        default=None,
        help="the traces and deadlines, 'TRACE@SECONDS[,SECONDS...]' separated by ';' (default: "
        "benchmarks/stream.py's shaped traces), e.g. 'walk:24mbit,seed=2@1,2;walk:24mbit,seed=3@1,2'",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", type=Path, default=None,
                        help="print the table of a results file again, from its runs, and run nothing")
    args = parser.parse_args()
    if args.table is not None:
        try:
            result = json.loads(args.table.read_text())
            fixed, settings = result["fixed"], result["settings"]
            ids = list(next(iter(fixed.values())))
            traces = [(t["trace"], t["deadlines"]) for t in result["traces"]]
            print_table(summarize(result["runs"], fixed, result["levels"], settings, ids, traces), settings)
        except (OSError, ValueError, KeyError, StopIteration) as exc:
            parser.error(f"cannot read a stream_policies result from {args.table}: {exc!r}")
        return 0
    try:
        shaped = SHAPED if args.traces is None else parse_traces(args.traces)
    except ValueError as exc:
        parser.error(f"--traces: {exc}")
    settings = args.settings.split(";")
    for setting in settings:
        try:
            parse_setting(setting)
        except (ValueError, KvlifeError) as exc:
            parser.error(
                f"bad setting {setting!r} ({exc}): use DISCOUNT,DROP_FACTOR[,STEP_UP_MARGIN[,REFINE]]"
                "[,KEY=VALUE...], e.g. wide,2 or 1.3,2 or wide,2,0 or wide,2,0.1,0 or "
                "wide,2,refine_discount=wide"
            )

    root = tempfile.mkdtemp(prefix="kvlife-stream-policies-")
    server, url = start_server(root)
    client = StreamClient(url)
    started = time.perf_counter()
    try:
        ids = publish_samples(client, args.tasks.split(","), args.samples)
        levels = client.manifest(ids[0]).levels
        fixed: dict[str, dict[str, dict[str, float | None]]] = {}
        for trace, deadlines in shaped:
            fixed[trace] = {}
            for context_id in ids:
                fixed[trace][context_id] = {}
                for level in levels:
                    client.set_trace(trace)
                    try:
                        _, report = client.fetch(context_id, max(deadlines), policy=level,
                                                 config=FetchConfig(abort_after_s=1.25 * max(deadlines)))
                        fixed[trace][context_id][level] = report.ready_s
                    except FetchAborted:
                        fixed[trace][context_id][level] = None
            print(f"fixed levels on {trace} done", flush=True)
        runs = []
        for setting in settings:
            config = parse_setting(setting)
            for trace, deadlines in shaped:
                for slo in deadlines:
                    for context_id in ids:
                        client.set_trace(trace)
                        _, report = client.fetch(context_id, slo, config=config)
                        runs.append({"setting": setting, "trace": trace, "slo": slo, "sample": context_id,
                                     **fetch_record(report)})
            print(f"setting {setting} done", flush=True)
    finally:
        client.set_trace(None)
        server.terminate()
        server.wait(10)
        shutil.rmtree(root, ignore_errors=True)  # the published contexts: tens of MB per sample
    result = {
        "schema": SCHEMA,
        "commit": commit(),
        "command": " ".join(["benchmarks/stream_policies.py", *sys.argv[1:]]),
        "model": "qwen2.5-coder-0.5b",
        "machine": machine(),
        "torch_threads": 1,
        "tasks": args.tasks.split(","),
        "samples_per_task": args.samples,
        "levels": levels,
        "settings": settings,
        "traces": [{"trace": t, "deadlines": d} for t, d in shaped],
        "wall_s": time.perf_counter() - started,
        "notes": (
            "Server and client on loopback, the server's send rate following the trace; the client has no "
            "model (nothing recomputed). Run under the project's CPU lock. level_ok is a proxy for quality "
            "(every chunk at the best fixed level meeting the deadline on every sample, or better)."
        ),
        "fixed": fixed,
        "runs": runs,
    }
    args.out.write_text(dumps(result))  # the runs are kept even if the summary below fails
    result["summary"] = table = summarize(runs, fixed, levels, settings, ids, shaped)
    args.out.write_text(dumps(result))
    print_table(table, settings)
    print(f"wrote {args.out}")
    return 0


def dumps(result: dict) -> str:
    """A result as JSON with one line per run and per summary row (a third of indent=1's size, still
    diffable)."""
    rows = {key: result[key] for key in ("runs", "summary") if key in result}
    text = json.dumps({key: f"\0{key}" if key in rows else value for key, value in result.items()}, indent=1)
    for key, items in rows.items():
        lines = ",\n".join("  " + json.dumps(item, separators=(", ", ": ")) for item in items)
        text = text.replace(json.dumps(f"\0{key}"), f"[\n{lines}\n ]")
    return text + "\n"



def parse_traces(text: str) -> list[tuple[str, list[float]]]:
    """'TRACE@SECONDS[,SECONDS...]' separated by ';' as (trace, deadlines), each trace checked by its
    parser."""
    out = []
    for part in text.split(";"):
        trace, sep, deadlines = part.partition("@")
        if not sep:
            raise ValueError(f"{part!r} has no '@' before its deadlines, e.g. walk:24mbit,seed=2@1,2")
        try:
            parse_trace(trace)
        except TraceError as exc:
            raise ValueError(str(exc)) from None
        try:
            seconds = [float(d) for d in deadlines.split(",")]
        except ValueError:
            raise ValueError(f"deadlines in {part!r} must be numbers of seconds") from None
        if not seconds or min(seconds) <= 0:
            raise ValueError(f"deadlines in {part!r} must be > 0")
        out.append((trace, seconds))
    return out


def summarize(runs: list[dict], fixed: dict, levels: list[str], settings: list[str], ids: list[str],
              traces: list[tuple[str, list[float]]]) -> list[dict]:
    """Per (trace, deadline, setting) the row described in the module docstring; also, per deadline that
    several traces have, one over those N traces (trace "all N"): the fixed levels then must meet it on
    every sample of every such trace, as a level chosen before the link is known must."""
    rows = []
    pooled = [(f"all {len(names)}", slo, names) for slo in sorted({slo for _, d in traces for slo in d})
              if len(names := [t for t, d in traces if slo in d]) > 1]
    for label, slo, names in [(t, slo, [t]) for t, deadlines in traces for slo in deadlines] + pooled:
        def met(level: str, slo: float = slo, names: list[str] = names) -> list[bool]:
            return [fixed[t][c][level] is not None and fixed[t][c][level] <= slo for t in names for c in ids]

        meeting = [level for level in levels if all(met(level))]
        fewest = min(len(ids) * len(names) - sum(met(level)) for level in levels)
        best = meeting[0] if meeting else None
        for setting in settings:
            group = [r for r in runs if r["setting"] == setting and r["trace"] in names and r["slo"] == slo]
            ranks = [[levels.index(o) for o in r["options"]] for r in group]
            rows.append(
                {
                    "trace": label,
                    "slo": slo,
                    "setting": setting,
                    "misses": sum(r["ready_s"] > slo for r in group),
                    "fixed_fewest_misses": fewest,
                    "fetches": len(group),
                    "best_meeting": best,
                    "level_ok": None if best is None else sum(max(rk) <= levels.index(best) for rk in ranks),
                    "mean_rank": statistics.mean(statistics.mean(rk) for rk in ranks),
                    "best_rank": None if best is None else levels.index(best),
                    "first_rank": statistics.mean(
                        rk[0] for rk in ranks
                    ),  # the first chunk weighs most (stream_sensitivity.py)
                    "median_ready_s": statistics.median(r["ready_s"] for r in group),
                }
            )
    return rows


def print_table(rows: list[dict], settings: list[str]) -> None:
    print(f"{'trace':24} {'slo':>4} {'best fixed':12} " + " ".join(f"{s:>28}" for s in settings))
    print(f"{'':24} {'':>4} {'':12} " + " ".join(f"{'miss lvl_ok rank first':>28}" for _ in settings))
    keys = []
    for r in rows:
        if (r["trace"], r["slo"]) not in keys:
            keys.append((r["trace"], r["slo"]))
    for trace, slo in keys:
        group = {r["setting"]: r for r in rows if r["trace"] == trace and r["slo"] == slo}
        first = group[settings[0]]
        best = f"{first['best_meeting']} ({first['best_rank']})" if first["best_meeting"] else "none"
        cells = []
        for s in settings:
            r = group[s]
            cells.append(
                f"{r['misses']}/{r['fixed_fewest_misses']} "
                f"{r['level_ok'] if r['level_ok'] is not None else '-'}"
                f"/{r['fetches']} {r['mean_rank']:.1f}  {r['first_rank']:.1f}".rjust(28)
            )
        print(f"{trace:24} {slo:4g} {best:12} " + " ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
