"""Which chunks of a streamed context its quality depends on: the KL divergence (and NLL change) from the
`lossless-ish` cache of caches that mix codec levels chunk by chunk, on the contexts of benchmarks/stream.py.

    flock /tmp/kvlife-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_sensitivity.py

The streaming planner keeps one uniform level and refines the worst chunks first, on the premise that a
context's quality is set by its worst chunks. This measures that premise per chunk position: for every
sample, every uniform lossy level; the first chunk at `high` and the rest at a lower level, and the other
way round; and every chunk but one at `high`, that one at `extreme`. The caches are built from the
published chunks exactly as the client builds them (`CacheBuilder`), with no link: only quality is
measured. Scores are teacher-forced over every turn's reference answer (as benchmarks/stream.py's KL; the
`lossless-ish` cache stands for the dense one, KL 0.0000 from it there). Writes
benchmarks/results/stream-sensitivity.json and prints a table of KL per configuration.
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
from common import machine  # noqa: E402
from stream_policies import publish_samples  # noqa: E402

from kvlife.codec.format import parse_header  # noqa: E402
from kvlife.stream import StreamClient  # noqa: E402
from kvlife.stream.recompute import CacheBuilder  # noqa: E402
from stream import TASKS, context_id_for, load_model_and_weights, reference_logprobs, start_server  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "stream-sensitivity.json"
REFERENCE = "lossless-ish"
LOW = ["compact", "aggressive", "extreme"]


def configurations(levels: list[str], n: int) -> dict[str, list[str]]:
    """Name -> each chunk's level: uniform levels, the first chunk against the rest, one `extreme` chunk."""
    configs = {level: [level] * n for level in levels if level != REFERENCE}
    for low in LOW:
        configs[f"high first, {low} rest"] = ["high"] + [low] * (n - 1)
        configs[f"{low} first, high rest"] = [low] + ["high"] * (n - 1)
    for j in range(1, n):  # at 0 it is "extreme first, high rest"
        configs[f"extreme at {j}"] = ["high"] * j + ["extreme"] + ["high"] * (n - 1 - j)
    return configs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--samples", type=int, default=3, help="samples per task")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--table", type=Path, help="run nothing: print the table of this stream-sensitivity.json"
    )
    args = parser.parse_args()
    if args.table is not None:
        print_table(json.loads(args.table.read_text())["samples"])
        return 0
    import torch

    from kvlife.bench.tasks import get_task
    from kvlife.session import Session

    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="kvlife-stream-sensitivity-")
    server, url = start_server(root)
    client = StreamClient(url)
    rows = []
    try:
        loaded = load_model_and_weights()
        publish_samples(client, args.tasks.split(","), args.samples, loaded)
        model, tokenizer, _ = loaded
        for task_name in args.tasks.split(","):
            for sample in get_task(task_name).samples("default", n=args.samples):
                context_id = context_id_for(task_name, sample)
                manifest = client.manifest(context_id)
                header = parse_header(client.header(manifest), header_only=True)
                parts = {level: [client.chunk(manifest, level, i) for i in range(manifest.n_chunks)]
                         for level in manifest.levels}

                def score(options, manifest=manifest, header=header, parts=parts, sample=sample):
                    builder = CacheBuilder(header, model)
                    for i, level in enumerate(options):
                        builder.add_encoded(i, parts[level][i], manifest.chunks[level][i].crc32)
                    session = Session(model, tokenizer, "dense", mode="multi-request")
                    session.attach(builder.finish(), manifest.token_ids)
                    return reference_logprobs(session, sample)

                ref, targets = score([REFERENCE] * manifest.n_chunks)
                ref_nll = -ref[torch.arange(len(targets)), targets]
                results = {}
                for name, options in configurations(manifest.levels, manifest.n_chunks).items():
                    logprobs, _ = score(options)
                    kl = float((ref.exp() * (ref - logprobs)).sum(-1).mean())
                    nll = -logprobs[torch.arange(len(targets)), targets]
                    results[name] = {
                        "kl": round(kl, 5),
                        "nll_change": round(float(nll.mean() - ref_nll.mean()), 5),
                    }
                rows.append(
                    {
                        "sample": context_id,
                        "chunks": manifest.n_chunks,
                        "reference_tokens": len(targets),
                        "results": results,
                    }
                )
                print(
                    f"{context_id}: {manifest.n_chunks} chunks, {len(targets)} reference tokens", flush=True
                )
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "model": "qwen2.5-coder-0.5b",
        "machine": machine(),
        "torch_threads": 1,
        "tasks": args.tasks.split(","),
        "samples_per_task": args.samples,
        "reference": REFERENCE,
        "wall_s": time.perf_counter() - started,
        "notes": "KL from the lossless-ish cache's next-token distributions over the reference answers "
        "(teacher-forced), per configuration of per-chunk levels; no link, quality only.",
        "samples": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print_table(rows)
    print(f"wrote {args.out}")
    return 0


def print_table(rows: list[dict]) -> None:
    names = [name for name in rows[0]["results"] if not name.startswith("extreme at ")]
    width = max(len(name) for name in names) + 2
    print("KL from lossless-ish, per sample (columns) and configuration (rows); 'one extreme chunk' is the")
    print("largest and the median over positions 1.. of one chunk at extreme among high ones")
    labels = [f"{row['sample'].split('-')[0][:10]}-{row['sample'].rsplit('-', 1)[-1]}" for row in rows]
    print(" " * width + "".join(f"{label:>14}" for label in labels) + f"{'median':>10}")
    for name in names:
        values = [row["results"][name]["kl"] for row in rows]
        print(
            f"{name:<{width}}"
            + "".join(f"{v:>14.4f}" for v in values)
            + f"{statistics.median(values):>10.4f}"
        )
    for label, pick in (
        ("one extreme chunk: max of 1..", max),
        ("one extreme chunk: median 1..", statistics.median),
    ):
        values = [
            pick([row["results"][f"extreme at {j}"]["kl"] for j in range(1, row["chunks"])]) for row in rows
        ]
        print(
            f"{label:<{width}}"
            + "".join(f"{v:>14.4f}" for v in values)
            + f"{statistics.median(values):>10.4f}"
        )


if __name__ == "__main__":
    sys.exit(main())
