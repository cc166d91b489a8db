"""Codec benchmark: size, quality and speed of every scheme and level on real caches of a real model.

    python benchmarks/codec.py [--model-dir DIR] [--contexts 4] [--context-tokens 2048]

For each context (Python stdlib sources and /usr/share/common-licenses texts) the model prefills the
first `--context-tokens` tokens; the next `--continuation-tokens` are held out. Every scheme/level
encodes and decodes the cache; the continuation is then run on the reconstructed cache (positions
continuing after the context) and compared with the same continuation on the exact cache:
perplexity change (pooled over contexts), greedy-token agreement (argmax equal to the exact
cache's argmax), and KL(exact || reconstructed) per token. Sizes count every byte of the stream
(header, positions, tables, checksums). Speeds are MB/s of fp16 KV (2 bytes per element) on one
core (torch.set_num_threads(1)), median of `--repeats` runs.

Writes benchmarks/results/codec.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
from common import print_table as print_table_rows

from kvlife.cache import KVCache, cache_kwarg
from kvlife.codec import LEVELS, decode_layers, encode, encode_baseline, inspect, rope_from_config
from kvlife.codec.baselines import LMCACHE_LEVELS
from kvlife.codec.calibrate import channel_weights

DEFAULT_MODEL = Path.home() / ".cache/kvlife/models/qwen2.5-coder-0.5b/hf"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = [STDLIB / "argparse.py", Path("/usr/share/common-licenses/GPL-3"), STDLIB / "difflib.py",
         Path("/usr/share/common-licenses/GPL-2"), STDLIB / "textwrap.py", STDLIB / "typing.py"]
# The weights profile is measured on a text that is none of the evaluation contexts.
CALIBRATION_TEXT = Path("/usr/share/common-licenses/LGPL-2.1")
RESULTS = Path(__file__).parent / "results" / "codec.json"


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return tokenizer, model.eval()


@torch.no_grad()
def prepare(model, tokenizer, n_contexts: int, context_tokens: int, continuation_tokens: int) -> list[dict]:
    items = []
    for path in TEXTS:
        if len(items) == n_contexts:
            break
        if not path.is_file():
            continue
        ids = tokenizer(path.read_text(errors="replace"), return_tensors="pt").input_ids[0]
        if len(ids) < context_tokens + continuation_tokens:
            continue
        context, continuation = (
            ids[:context_tokens],
            ids[context_tokens : context_tokens + continuation_tokens],
        )
        cache = KVCache.for_model(model)
        model(context[None], **cache_kwarg(model, cache), use_cache=True)
        layers = [(k.clone(), v.clone(), p.clone()) for k, v, p in cache.to_tensors()]
        reference = run_continuation(model, layers, context_tokens, continuation)
        items.append(
            {
                "path": str(path),
                "layers": layers,
                "continuation": continuation,
                "reference": reference,
                "context_tokens": context_tokens,
            }
        )
        print(f"  context {path.name}: {context_tokens} + {continuation_tokens} tokens", flush=True)
    if len(items) < n_contexts:
        sys.exit(f"only {len(items)} texts are long enough for {context_tokens}+{continuation_tokens} tokens")
    return items


@torch.no_grad()
def run_continuation(model, layers, context_tokens: int, continuation: torch.Tensor) -> torch.Tensor:
    cache = KVCache.from_tensors(layers)
    positions = torch.arange(context_tokens, context_tokens + len(continuation))[None]
    return model(continuation[None], **cache_kwarg(model, cache), position_ids=positions).logits[0].float()


def quality(model, item, layers) -> tuple[float, float, float, float]:
    """(nll, reference nll, token agreement, mean KL) of the continuation on reconstructed layers."""
    logits = run_continuation(model, layers, item["context_tokens"], item["continuation"])
    ref, target = item["reference"], item["continuation"][1:]
    nll = torch.nn.functional.cross_entropy(logits[:-1], target).item()
    ref_nll = torch.nn.functional.cross_entropy(ref[:-1], target).item()
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    return nll, ref_nll, agree, kl


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def measure(model, items, scheme: str, level: str, encoder, repeats: int, speed_only: bool = False) -> dict:
    nlls, refs, agrees, kls, bits, elements, enc_s, dec_s, fp16_bytes = [], [], [], [], 0, 0, 0.0, 0.0, 0
    for item in items:
        torch.set_num_threads(1)
        blob, t_enc = timed(lambda x=item["layers"]: encoder(x), repeats)
        decoded, t_dec = timed(lambda b=blob: decode_layers(b), repeats)
        torch.set_num_threads(2)
        info = inspect(blob)
        bits += 8 * info["total_bytes"]
        elements += info["elements"]
        fp16_bytes += 2 * info["elements"]
        enc_s += t_enc
        dec_s += t_dec
        if speed_only:
            continue
        nll, ref, agree, kl = quality(model, item, decoded)
        nlls.append(nll), refs.append(ref), agrees.append(agree), kls.append(kl)
    bpe = bits / elements
    if speed_only:
        return {
            "scheme": scheme,
            "level": level,
            "bits_per_element": round(bpe, 4),
            "encode_mb_s": round(fp16_bytes / enc_s / 1e6, 1),
            "decode_mb_s": round(fp16_bytes / dec_s / 1e6, 1),
        }
    ppl, ref_ppl = math.exp(statistics.mean(nlls)), math.exp(statistics.mean(refs))
    return {
        "scheme": scheme,
        "level": level,
        "bits_per_element": round(bpe, 4),
        "ratio_vs_fp16": round(16 / bpe, 3),
        "ratio_vs_int8": None,  # filled in once the int8 row is known
        "ppl_increase_pct": round(100 * (ppl / ref_ppl - 1), 3),
        "token_agreement": round(statistics.mean(agrees), 4),
        "kl_per_token": round(statistics.mean(kls), 6),
        "encode_mb_s": round(fp16_bytes / enc_s / 1e6, 1),
        "decode_mb_s": round(fp16_bytes / dec_s / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--contexts", type=int, default=4)
    parser.add_argument("--context-tokens", type=int, default=2048)
    parser.add_argument("--continuation-tokens", type=int, default=512)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default=",".join(LEVELS))
    parser.add_argument(
        "--schemes",
        default="kvlife,kvlife-noprofile,fp16,int8,int8+zstd,lmcache",
        help="kvlife uses a weights profile measured on a held-out text; kvlife-noprofile does not",
    )
    parser.add_argument("--no-rope", action="store_true", help="code keys post-RoPE (for comparison)")
    parser.add_argument("--prepared", type=Path, help="reuse (or write) prepared caches at this path")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="re-measure only encode/decode speed (e.g. on a quieter machine) and update --out's rows",
    )
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(2)
    print(f"model {args.model_dir}", flush=True)
    tokenizer, model = load_model(args.model_dir)
    rope = None if args.no_rope else rope_from_config(model.config)
    if args.prepared and args.prepared.is_file():
        items = torch.load(args.prepared, weights_only=False)
    else:
        items = prepare(model, tokenizer, args.contexts, args.context_tokens, args.continuation_tokens)
        if args.prepared:
            torch.save(items, args.prepared)
    weights = None
    if "kvlife" in args.schemes.split(","):
        calibration = tokenizer(CALIBRATION_TEXT.read_text(), return_tensors="pt").input_ids[
            :, : args.context_tokens
        ]
        weights = channel_weights(model, calibration, rotary_dim=rope.rotary_dim if rope else 0)
    load_start = os.getloadavg()[0]
    rows = []
    for scheme in args.schemes.split(","):
        if scheme.startswith("kvlife"):
            levels = args.levels.split(",")
        else:
            levels = list(LMCACHE_LEVELS) if scheme == "lmcache" else ["-"]
        for level in levels:
            if scheme == "kvlife":
                def encoder(x, level=level):
                    return encode(x, level=level, chunk_tokens=args.chunk_tokens, rope=rope, weights=weights)
            elif scheme == "kvlife-noprofile":
                def encoder(x, level=level):
                    return encode(x, level=level, chunk_tokens=args.chunk_tokens, rope=rope)
            else:
                def encoder(x, scheme=scheme, level=level):
                    return encode_baseline(scheme, x, args.chunk_tokens, "default" if level == "-" else level)
            row = measure(model, items, scheme, level, encoder, args.repeats, args.speed_only)
            rows.append(row)
            if args.speed_only:
                print(
                    f"  {scheme:16s} {level:13s} enc {row['encode_mb_s']:6.1f}  dec "
                    f"{row['decode_mb_s']:6.1f} MB/s",
                    flush=True,
                )
                continue
            print(
                f"  {scheme:16s} {level:13s} {row['bits_per_element']:7.3f} b/el  ppl "
                f"{row['ppl_increase_pct']:+7.2f}%  agree {row['token_agreement']:.3f}  KL "
                f"{row['kl_per_token']:.4f}  enc {row['encode_mb_s']:6.1f}  dec {row['decode_mb_s']:6.1f} "
                "MB/s",
                flush=True,
            )
    if args.speed_only:
        return update_speeds(args.out, rows, os.getloadavg()[0], load_start)
    int8 = next((r for r in rows if r["scheme"] == "int8"), None)
    for row in rows:
        row["ratio_vs_int8"] = round(int8["bits_per_element"] / row["bits_per_element"], 3) if int8 else None
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {_cpu_name()}, 1 thread, "
                   f"python {platform.python_version()}, torch {torch.__version__}".replace("  ", " "),
        "model": str(args.model_dir),
        "contexts": len(items),
        "context_files": [Path(item["path"]).name for item in items],
        "context_tokens": args.context_tokens,
        "continuation_tokens": args.continuation_tokens,
        "chunk_tokens": args.chunk_tokens,
        "keys_pre_rope": rope is not None,
        "calibration_text": CALIBRATION_TEXT.name,
        "load_average_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
        "notes": NOTES,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(rows)
    print(f"wrote {args.out}")
    return 0


def update_speeds(path: Path, rows: list[dict], load_end: float, load_start: float) -> int:
    result = json.loads(path.read_text())
    speeds = {(r["scheme"], r["level"]): r for r in rows}
    for row in result["rows"]:
        fresh = speeds.get((row["scheme"], row["level"]))
        if fresh:
            if abs(fresh["bits_per_element"] - row["bits_per_element"]) > 1e-3:
                sys.exit(
                    f"{row['scheme']} {row['level']}: size changed since the quality run; rerun the whole "
                    "benchmark"
                )
            row["encode_mb_s"], row["decode_mb_s"] = fresh["encode_mb_s"], fresh["decode_mb_s"]
    result["speed_load_average_1min"] = [round(load_start, 2), round(load_end, 2)]
    path.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result["rows"])
    print(f"updated speeds in {path}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def print_table(rows: list[dict]) -> None:
    print()
    print_table_rows(
        ["scheme", "level", "bits/el", "vs fp16", "vs int8", "ppl +%", "agree", "enc MB/s", "dec MB/s"],
        [[r["scheme"], r["level"], f"{r['bits_per_element']:.3f}", f"{r['ratio_vs_fp16']:.2f}",
          f"{r['ratio_vs_int8'] or 0:.2f}", f"{r['ppl_increase_pct']:.2f}", f"{r['token_agreement']:.3f}",
          f"{r['encode_mb_s']:.1f}", f"{r['decode_mb_s']:.1f}"] for r in rows])


NOTES = "filled in after the run"  # the committed codec.json carries the notes of its run

if __name__ == "__main__":
    sys.exit(main())
