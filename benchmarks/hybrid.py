"""Memory of transformer, hybrid and state-space caches: K/V plus recurrent state at 8K, 32K and 128K tokens.

Real models: their published config.json numbers (layers, attention layers, KV heads, head size, state
size; each row names its source) through `kvlife.recurrent.cache_bytes_model`, bfloat16 (2 bytes for
K/V and state alike). Tiny random-initialised configs (tests/tiny.py): the same formula checked against
`KVCache.bytes()` after a real prefill (`measured_bytes`, float32). `--model DIR` (repeatable) runs a
local model directory unchanged: a measured prefill of `--measure-tokens` tokens against the formula,
then the formula rows at the three lengths in the model's own dtype.

    .venv/bin/python benchmarks/hybrid.py [--model DIR ...] [--out benchmarks/results/hybrid.json]

Writes JSON (`rows`: model, kind, tokens, bytes, kv_bytes, state_bytes, dtype, source; tiny and local rows
add measured_bytes) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from kvlife.cache import KVCache
from kvlife.methods.base import model_forward
from kvlife.recurrent import cache_bytes_model, kind_of

ROOT = Path(__file__).resolve().parents[1]
TOKENS = (8192, 32768, 131072)
ZAMBA2_2P7B_HYBRID = {6, 12, 18, 24, 30, 36, 42, 47, 51}
# (name, model_type, config numbers, source). Only the fields the cache's size depends on.
REAL = [
    ("Llama-3.1-8B", "llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=128),
     "https://huggingface.co/mlx-community/Meta-Llama-3.1-8B-bf16/blob/refs%2Fpr%2F1/config.json "
     "(a mirror of meta-llama/Llama-3.1-8B's config.json)"),
    ("Qwen2.5-7B", "qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, use_sliding_window=False),
     "https://huggingface.co/AmberYifan/Qwen2.5-7B-gen-dpo-10k/blob/06301e9ceb9578f3c5ce6a4244af885d85f275ad/"
     "config.json (a fine-tune of Qwen/Qwen2.5-7B carrying its config.json)"),
    ("Jamba-1.5-Mini", "jamba", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4,
                                     mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256),
     "https://huggingface.co/ai21labs/Jamba-v0.1/blob/main/config.json: Jamba-1.5-Mini's own config.json was "
     "not in the searchable corpus; it keeps Jamba's 32 layers in blocks of 8 with one attention layer each "
     "(1:7), 8 KV heads (https://www.emergentmind.com/topics/jamba-1-5, AI21's Jamba-1.5 report)"),
    ("Codestral-Mamba-7B", "mamba2", dict(hidden_size=4096, num_hidden_layers=64, num_heads=128, head_dim=64,
                                          state_size=128, n_groups=8, conv_kernel=4, expand=2),
     "https://ollama.com/mahade315/mamba-codestral:7b-q4_K_M/blobs/919888b99f46 (GGUF metadata of "
     "Mamba-Codestral-7B-v0.1: 64 blocks, embedding 4096, ssm inner 8192, state 128, 8 groups, conv 4, "
     "ssm_a [1, 128] = 128 heads of 64)"),
    ("Zamba2-2.7B", "zamba2", dict(hidden_size=2560, num_hidden_layers=54, num_attention_heads=32,
                                   num_key_value_heads=32, attention_head_dim=160, mamba_d_state=64,
                                   mamba_headdim=64, mamba_ngroups=1, n_mamba_heads=80, mamba_d_conv=4,
                                   mamba_expand=2,
                                   layers_block_type=["hybrid" if i in ZAMBA2_2P7B_HYBRID else "mamba"
                                                      for i in range(54)]),
     "https://huggingface.co/Zyphra/Zamba2-2.7B-Instruct-v2/blob/main/config.json (Zamba2-7B's config.json "
     "was not in the searchable corpus: its family member stands in)"),
]
MISSING = {"Zamba2-7B": "config.json not found through the search tool (only Zamba2-1.2B/2.7B configs were); "
                        "run `--model DIR` on a local copy to add it"}


def machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cpus, {platform.system()}, torch {torch.__version__}"


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip() or "unknown"


def formula_rows(name: str, config, dtype: torch.dtype, source: str) -> list[dict]:
    width = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for tokens in TOKENS:
        model = cache_bytes_model(config, tokens, width)
        rows.append({"model": name, "kind": kind_of(config), "tokens": tokens, "bytes": model["total"],
                     "kv_bytes": model["kv"], "state_bytes": model["state"],
                     "dtype": str(dtype).replace("torch.", ""),
                     "source": source})
    return rows


def measured_row(name: str, model, tokens: int, source: str) -> dict:
    """One prefill of `tokens` tokens: the cache's own bytes against the formula."""
    cache = KVCache.for_model(model)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    model_forward(model, cache, ids, None)
    dtype = next(model.parameters()).dtype
    formula = cache_bytes_model(model.config, tokens, torch.empty(0, dtype=dtype).element_size())
    return {"model": name, "kind": kind_of(model.config), "tokens": tokens, "bytes": formula["total"],
            "kv_bytes": formula["kv"], "state_bytes": formula["state"], "measured_bytes": cache.bytes(),
            "measured_state_bytes": cache.state_bytes(), "dtype": str(dtype).replace("torch.", ""),
            "source": source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[],
                        help="a local HF model directory (repeatable)")
    parser.add_argument("--measure-tokens", type=int, default=512, help="prefill length measured on --model")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/hybrid.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, model_type, numbers, source in REAL:
        rows += formula_rows(name, AutoConfig.for_model(model_type, **numbers), torch.bfloat16, source)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import HYBRID, tiny_model

    for kind in ["qwen2", *HYBRID]:
        model = tiny_model(kind)
        for tokens in (64, 300):
            rows.append(measured_row(f"tiny-{kind}", model, tokens, "tests/tiny.py (random init)"))
    for directory in args.model:
        from kvlife.models import load

        model, _ = load(directory, dtype="auto")
        name = Path(directory).name
        rows.append(measured_row(name, model, args.measure_tokens, directory))
        rows += formula_rows(name, model.config, next(model.parameters()).dtype, directory)
    mismatches = [row for row in rows if "measured_bytes" in row and row["measured_bytes"] != row["bytes"]]
    payload = {"machine": machine(), "commit": commit(),
               "dtype": "bfloat16 for the published configs, float32 for the tiny ones",
               "tokens": list(TOKENS), "missing": MISSING,
               "formula_matches_measured": not mismatches, "rows": rows}
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"{'model':22} {'kind':11} {'tokens':>7} {'K/V MiB':>10} {'state MiB':>10} {'total MiB':>10} "
          f"{'measured':>10}")
    for row in rows:
        measured = f"{row['measured_bytes'] / 2**20:10.3f}" if "measured_bytes" in row else " " * 10
        print(f"{row['model']:22} {row['kind']:11} {row['tokens']:7d} {row['kv_bytes'] / 2**20:10.1f} "
              f"{row['state_bytes'] / 2**20:10.1f} {row['bytes'] / 2**20:10.1f} {measured}")
    print(f"formula = measured on every measured row: {not mismatches}; wrote {args.out}")


if __name__ == "__main__":
    main()
