"""Codec steps for pruned caches: which of keys and values a compressed (kvzip) cache needs fine.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/codec_sparse.py [--task repoqa] [--samples 8]

Reads each sample's kvzip(ratio=0.25) context from the raw store `benchmarks/lifecycle.py` filled
(results/lifecycle/store/raw; a sample missing there is compressed and stored first), codes it at each
setting below (keys' and values' step as a multiple of the head's RMS, with or without the model's
shipped channel-weights profile), decodes it, and scores every turn's reference answer teacher-forced:
the rise of its mean NLL over the exact cache's, and the bytes per context token of the coded entry.
A screen, not an accuracy: mean NLL over a long answer moves little when one token flips, so the
largest rise over the answers says more than the mean; accuracy is lifecycle.py's. Writes
benchmarks/results/codec-sparse.json and prints a table. Takes /tmp/kvlife-heavy.lock while it runs.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import commit, machine, print_table  # noqa: E402

from kvlife import models  # noqa: E402
from kvlife.bench.tasks import get_task  # noqa: E402
from kvlife.codec.levels import Level  # noqa: E402
from kvlife.session import Session  # noqa: E402
from kvlife.store import entries, open_store  # noqa: E402
from kvlife.store.profiles import codec_setup  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "codec-sparse.json"
# (name, alpha_k, alpha_v, with the profile)
SETTINGS = [("balanced", 0.8, 1.1, False), ("balanced+profile", 0.8, 1.1, True),
            ("high+profile", 0.5, 0.7, True), ("k0.5,v1.1+profile", 0.5, 1.1, True),
            ("k0.8,v0.7+profile", 0.8, 0.7, True), ("k0.65,v0.9+profile", 0.65, 0.9, True),
            ("k0.4,v1.3+profile (sparse)", 0.4, 1.3, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="repoqa")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--recipe", default="kvzip(ratio=0.25)")
    parser.add_argument("--store", default="results/lifecycle/store/raw")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    with open("/tmp/kvlife-heavy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        model, tokenizer = models.load(models.DEFAULT_MODEL, dtype="float32")
        turns, tokens = measure(args, model, tokenizer)
    config = model.config
    fp16 = 2 * 2 * config.num_hidden_layers * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads)
    summary = []
    for name, alpha_k, alpha_v, profile in SETTINGS:
        rises = [r for row in turns for r in row["settings"][name]["nll_rise"]]
        size = sum(row["settings"][name]["bytes"] for row in turns) / tokens
        summary.append({"setting": name, "alpha_k": alpha_k, "alpha_v": alpha_v, "profile": profile,
                        "bytes_per_token": round(size, 1), "fp16_dense_over_stored": round(fp16 / size, 2),
                        "mean_nll_rise": round(sum(rises) / len(rises), 4),
                        "max_nll_rise": round(max(rises), 4), "answers": len(rises)})
    out = {"benchmark": "codec-sparse", "commit": commit(), "machine": machine(),
           "model": models.DEFAULT_MODEL, "dtype": "float32", "task": args.task, "recipe": args.recipe,
           "samples": len(turns), "wall_s": round(time.perf_counter() - started, 1), "summary": summary,
           "turns": turns,
           "notes": "Entries re-encoded from the raw store's exact kvzip contexts; nll_rise: the reference "
                    "answer's mean NLL per token on the decoded cache minus on the exact one, per turn."}
    RESULTS.write_text(json.dumps(out, indent=1))
    print_table(["setting", "bytes/token", "fp16 dense / stored", "mean NLL rise", "largest rise"],
                [[s["setting"], s["bytes_per_token"], s["fp16_dense_over_stored"],
                  f"{s['mean_nll_rise']:+.4f}", f"{s['max_nll_rise']:+.3f}"] for s in summary])


def measure(args: argparse.Namespace, model, tokenizer) -> tuple[list[dict], int]:
    raw = open_store(f"disk:{args.store}", encoding="raw")
    codec = codec_setup(model, "kvlife:balanced+profile")
    turns, tokens = [], 0
    for sample in get_task(args.task).samples("default", args.samples, 0, None):
        session = Session(model, tokenizer, args.recipe, mode="multi-request", store=raw)
        session.prefill(sample.context)
        layers, ids = session.stored_context(), list(session.context_ids)
        tokens += len(ids)
        exact = nlls(session, sample)
        row = {"sample": sample.id, "context_tokens": len(ids), "exact_nll": exact, "settings": {}}
        for name, alpha_k, alpha_v, profile in SETTINGS:
            level = Level(name, 255, alpha_k, alpha_v)
            # the store's entry format at a setting no named level has: its level, swapped in
            entries.codec_level = lambda _encoding, level=level: level
            payload = entries.encode_entry(layers, "kvlife:balanced", codec.rope, 256,
                                           codec.weights if profile else None)
            session.attach_stored(entries.decode_entry(payload), ids)
            row["settings"][name] = {"bytes": len(payload),
                                     "nll_rise": [round(a - b, 5) for a, b in
                                                  zip(nlls(session, sample), exact)]}
        turns.append(row)
        print(f"{sample.id}: done", flush=True)
    return turns, tokens


def nlls(session: Session, sample) -> list[float]:
    """Each turn's reference answer's mean NLL per token, teacher-forced on the session's context."""
    return [session.ask(t.query, max_new_tokens=1, reference=t.answer).reference_nll for t in sample.turns]


if __name__ == "__main__":
    main()
