"""Offline head split for DuoAttention: `kvlife search-heads --model M --out FILE`.

DuoAttention (Xiao et al., 2024) learns a gate per KV head by gradient descent on synthetic
passkey retrieval; kvlife answers the same question without gradients, by measuring it. Each
calibration sample is a multi-passkey haystack: Python standard-library source (from module `m`
on, so not the text `search-patterns` reads) with `passkeys` sentences "The pass key of NAME is
KEY." at random lines, and questions asking for some of the keys. The context is prefilled
densely once; then, for every KV head of every full-attention layer in turn, the question and
its teacher-forced answer are run with that head alone streaming (seeing only the first `n_sink`
and the last `n_local` context tokens, as duo_attention's cache will let it) and every other head
dense. A head's score is the mean KL divergence of the answer tokens' next-token distributions
from the all-dense ones: a head whose loss of the middle moves the answers is a retrieval head.
"""

from __future__ import annotations

import argparse
import random
import string
import sysconfig
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kvlife.attention import AttnCall, dense_attention, reference_attention
from kvlife.cache import KVCache
from kvlife.errors import SpecError
from kvlife.methods.base import model_forward
from kvlife.methods.compress import head_split

NAMES = ("falcon", "maple", "harbor", "quartz", "lantern", "meadow", "copper", "glacier", "orchid", "saffron",
         "timber", "violet", "ember", "cobalt", "juniper", "summit")


@dataclass
class HeadSearch:
    """The calibration of `kvlife search-heads` (what the written split records)."""

    samples: int = 4  # haystacks
    tokens: int = 1500  # tokens per haystack (the default benchmark profile's 1.2-2.4K contexts)
    passkeys: int = 10  # pass keys hidden in each haystack (DuoAttention's multi_passkey10)
    queries: int = 2  # of them asked per haystack
    n_sink: int = 64  # a streaming head's sinks (DuoAttention's sink size)
    n_local: int = 256  # and its recent window (DuoAttention's recent size)
    seed: int = 0


@lru_cache(maxsize=1)
def filler_lines() -> tuple[str, ...]:
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.name >= "m")
    return tuple(line for path in files for line in path.read_text(errors="replace").splitlines() if line.strip())


def haystack(tokenizer: Any, search: HeadSearch, index: int) -> tuple[str, list[tuple[str, str]]]:
    """Sample `index`: the context text and (question, answer) pairs."""
    rng = random.Random(search.seed * 7919 + index)
    lines, start = filler_lines(), rng.randrange(len(filler_lines()) // 2)
    body, used = [], 0
    for line in lines[start:]:
        used += len(tokenizer.encode(line + "\n", add_special_tokens=False))
        if used > search.tokens:
            break
        body.append(line)
    names = rng.sample(NAMES, min(search.passkeys, len(NAMES)))
    keys = {name: "".join(rng.choices(string.ascii_lowercase + string.digits, k=8)) for name in names}
    for name in names:
        body.insert(rng.randrange(len(body) + 1), f"# The pass key of {name} is {keys[name]}. Remember it.")
    asked = rng.sample(names, min(search.queries, len(names)))
    return "\n".join(body), [(f"What is the pass key of {name}? Answer with the key only.", keys[name])
                             for name in asked]


def prompt_ids(tokenizer: Any, context: str, question: str) -> tuple[list[int], list[int]]:
    """(context ids, question ids) as the benchmark's prompt format splits them (chat template if any)."""
    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{context}\n\n{question}"}],
                                             tokenize=False, add_generation_prompt=True)
        cut = text.index(question)
        return encode(text[:cut]), encode(text[cut:])
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + encode(context + "\n\n"), encode(question + "\n")


class StreamOneHead:
    """Dense attention, except that one KV head of one layer sees only the sinks, the last `n_local`
    context tokens and the new tokens (as a streaming head of duo_attention's cache would)."""

    name = "stream_one_head"

    def __init__(self, layer: int, head: int, n_context: int, n_sink: int, n_local: int) -> None:
        self.layer, self.head, self.n_context, self.n_sink, self.n_local = layer, head, n_context, n_sink, n_local

    def attend(self, call: AttnCall) -> torch.Tensor:
        if call.layer_idx != self.layer:
            return dense_attention(call)
        visible = torch.ones_like(call.k_pos, dtype=torch.bool)
        k_pos = call.k_pos[self.head]
        visible[self.head] = (k_pos < self.n_sink) | (k_pos >= self.n_context - self.n_local)
        return reference_attention(call, visible[:, None, :].expand(-1, call.query.shape[2], -1))


@torch.no_grad()
def search(model: Any, tokenizer: Any, model_name: str, search: HeadSearch | None = None, log=print) -> dict:
    """Score every KV head of every full-attention layer; returns the split dict (see head_split.py)."""
    search = search or HeadSearch()
    if search.samples < 1 or search.queries < 1 or search.passkeys < search.queries:
        raise SpecError("search-heads: need --samples >= 1 and 1 <= --queries <= --passkeys")
    started = time.perf_counter()
    cache = KVCache.for_model(model)
    kv_heads = model.config.get_text_config().num_key_value_heads
    full = [i for i, layer in enumerate(cache.layers) if not layer.is_sliding]
    totals = torch.zeros(len(cache.layers), kv_heads, dtype=torch.float64)
    answers = 0
    for index in range(search.samples):
        context, asked = haystack(tokenizer, search, index)
        for question, answer in asked:
            context_ids, question_ids = prompt_ids(tokenizer, context, question)
            answer_ids = list(tokenizer.encode(answer, add_special_tokens=False))
            cache = KVCache.for_model(model)
            model_forward(model, cache, context_ids, None)
            start = cache.checkpoint()
            ids, rows = question_ids + answer_ids, slice(len(question_ids) - 1, -1)
            dense = torch.log_softmax(model_forward(model, cache, ids, None, all_logits=True)[rows], dim=-1)
            for layer in full:
                for head in range(kv_heads):
                    cache.rollback(start)
                    streaming = StreamOneHead(layer, head, len(context_ids), search.n_sink, search.n_local)
                    recipe = SimpleNamespace(prefill=streaming, compress=None, load=None)
                    logits = model_forward(model, cache, ids, recipe, all_logits=True)[rows]
                    moved = torch.log_softmax(logits, dim=-1)
                    totals[layer, head] += float((dense.exp() * (dense - moved)).sum(-1).mean())
            answers += 1
        log(f"sample {index + 1}/{search.samples}: {len(context_ids)} context tokens, "
            f"{time.perf_counter() - started:.0f} s")
    scores = totals / answers
    rows_out = [[round(float(v), 6) for v in scores[i]] if i in full else None for i in range(len(cache.layers))]
    ranked = sorted((float(scores[i, h]), i, h) for i in full for h in range(kv_heads))
    return {
        "format": head_split.FORMAT, "model": model_name, "signature": head_split.model_signature(model),
        "n_layers": len(cache.layers), "kv_heads": kv_heads, "n_sink": search.n_sink, "n_local": search.n_local,
        "method": "mean KL divergence of the answer tokens' distributions when this KV head alone streams",
        "calibration": {**asdict(search), "answers": answers,
                        "text": "multi-passkey haystacks in Python standard library sources (modules m..)",
                        "seconds": round(time.perf_counter() - started, 1)},
        "summary": {"top_heads": [[i, h] for _, i, h in ranked[::-1][:8]],
                    "median_score": round(ranked[len(ranked) // 2][0], 6)},
        "scores": rows_out,
    }


def cmd_search_heads(args: argparse.Namespace) -> int:
    from kvlife import models

    model, tokenizer = models.load(args.model)
    settings = HeadSearch(samples=args.samples, tokens=args.tokens, passkeys=args.passkeys,
                          queries=args.queries, n_sink=args.n_sink, n_local=args.n_local, seed=args.seed)
    split = search(model, tokenizer, models.model_name(args.model), settings)
    head_split.write(args.out, split)
    head_split.load(args.out)  # what we wrote must read back
    print(f"wrote {args.out}: use it as duo_attention(config={args.out})")
    return 0


def add_parser(sub: Any) -> None:
    """The `kvlife search-heads` subcommand."""
    from kvlife.models import DEFAULT_MODEL

    defaults = HeadSearch()
    parser = sub.add_parser("search-heads", help="find DuoAttention's retrieval and streaming heads (writes JSON)",
                            description="Score each KV head by how much the answers to passkey questions move "
                                        "when that head alone keeps only its sinks and recent tokens.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model name or HF dir (default {DEFAULT_MODEL})")
    parser.add_argument("--out", required=True, help="JSON file to write")
    for flag, value, meaning in (("samples", defaults.samples, "haystacks"),
                                 ("tokens", defaults.tokens, "tokens per haystack"),
                                 ("passkeys", defaults.passkeys, "pass keys hidden per haystack"),
                                 ("queries", defaults.queries, "pass keys asked per haystack"),
                                 ("n-sink", defaults.n_sink, "a streaming head's sink tokens"),
                                 ("n-local", defaults.n_local, "a streaming head's recent tokens"),
                                 ("seed", defaults.seed, "calibration seed")):
        parser.add_argument(f"--{flag}", type=int, default=value, help=f"{meaning} (default {value})")
    parser.set_defaults(func=cmd_search_heads)
