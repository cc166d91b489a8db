"""Offline head split for DuoAttention: `kvlife search-heads --model M --out FILE`.

DuoAttention (Xiao et al., 2024) gives every KV head a gate alpha that mixes its full attention
with a streaming one (the first `n_sink` and the last `n_local` tokens), and learns the gates by
gradient descent on synthetic passkey retrieval; heads whose gate stays high are retrieval heads.
kvlife takes the first step of that optimisation, on the loss that matters here: the gradient of
the answer's negative log-likelihood with respect to every gate at the all-dense start, which is
the first-order change of the answer's NLL when that head alone streams,
<dNLL/d(output of the head), streaming output - full output>, summed over the question and
answer tokens. One forward and one backward per question score every head at once. A head's
score is the mean of its |gradient| over the questions: large where losing the middle of the
context moves the answer.

Calibration samples are multi-passkey haystacks (DuoAttention's multi_passkey10): Python
standard-library source (from module `m` on, so not the text `search-patterns` reads) with
`passkeys` sentences "The pass key of NAME is KEY." at random lines, and questions asking for some
of the keys, in the model's chat format. The context is prefilled densely (as kvlife prefills);
the question and answer are then run with the gates, as they will attend to duo_attention's cache.
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

from kvlife.attention import AttnCall, StepContext, dense_attention, reference_attention
from kvlife.cache import KVCache, cache_kwarg
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
    return tuple(line for path in files for line in path.read_text(errors="replace").splitlines()
                 if line.strip())


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


class GatedStreaming:
    """A prefill method for the question and answer: each full-attention layer's output is
    `full + gate * (streaming - full)` per KV head, with gates [kv_heads] at 0 (dense) whose
    gradient is DuoAttention's gate gradient. Streaming sees the sinks, the last `n_local` context
    tokens and the new tokens, as a streaming head of duo_attention's cache would."""

    name = "gated_streaming"

    def __init__(self, gates: dict[int, torch.Tensor], n_context: int, n_sink: int, n_local: int) -> None:
        self.gates, self.n_context, self.n_sink, self.n_local = gates, n_context, n_sink, n_local

    def attend(self, call: AttnCall) -> torch.Tensor:
        full = dense_attention(call)
        gate = self.gates.get(call.layer_idx)
        if gate is None:
            return full
        visible = (call.k_pos < self.n_sink) | (call.k_pos >= self.n_context - self.n_local)
        streaming = reference_attention(call, visible[:, None, :].expand(-1, call.query.shape[2], -1))
        return full + gate.repeat_interleave(call.groups)[None, :, None, None] * (streaming - full)


def gate_gradients(model: Any, context_ids: list[int], question_ids: list[int], answer_ids: list[int],
                   full: list[int], kv_heads: int, search: HeadSearch) -> torch.Tensor:
    """d(answer NLL)/d(gate) [layers, kv_heads] for one question (rows of sliding layers stay 0)."""
    cache = KVCache.for_model(model)
    model_forward(model, cache, context_ids, None)
    weight = next(model.parameters())
    gates = {layer: torch.zeros(kv_heads, dtype=weight.dtype, device=weight.device, requires_grad=True)
             for layer in full}
    recipe = SimpleNamespace(prefill=GatedStreaming(gates, len(context_ids), search.n_sink, search.n_local),
                             compress=None, load=None)
    ids, device = question_ids + answer_ids, weight.device
    positions = torch.arange(len(context_ids), len(context_ids) + len(ids), device=device)
    step = StepContext(cache, positions, phase="prefill", recipe=recipe)
    logits = model(input_ids=torch.tensor([ids], device=device), position_ids=positions[None],
                   **cache_kwarg(model, cache), use_cache=True, logits_to_keep=len(answer_ids) + 1,
                   kvlife=step).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids, device=device))
    nll.backward()
    grads = torch.zeros(len(cache.layers), kv_heads, dtype=torch.float64)
    for layer, gate in gates.items():
        grads[layer] = gate.grad.double()
    return grads


def search(model: Any, tokenizer: Any, model_name: str, search: HeadSearch | None = None, log=print) -> dict:
    """Score every KV head of every full-attention layer; returns the split dict (see head_split.py)."""
    search = search or HeadSearch()
    if search.samples < 1 or search.queries < 1 or search.passkeys < search.queries:
        raise SpecError("search-heads: need --samples >= 1 and 1 <= --queries <= --passkeys")
    started = time.perf_counter()
    cache = KVCache.for_model(model)
    layers = cache.layers
    kv_heads = model.config.get_text_config().num_key_value_heads
    full = [i for i, layer in cache.kv_layers() if not layer.is_sliding]  # attention layers only
    totals = torch.zeros(len(layers), kv_heads, dtype=torch.float64)
    answers = 0
    trainable = [param for param in model.parameters() if param.requires_grad]
    for param in trainable:  # only the gates need gradients
        param.requires_grad_(False)
    try:
        for index in range(search.samples):
            context, asked = haystack(tokenizer, search, index)
            for question, answer in asked:
                context_ids, question_ids = prompt_ids(tokenizer, context, question)
                answer_ids = list(tokenizer.encode(answer, add_special_tokens=False))
                gradients = gate_gradients(model, context_ids, question_ids, answer_ids, full, kv_heads,
                                           search)
                totals += gradients.abs()
                answers += 1
            log(f"sample {index + 1}/{search.samples}: {len(context_ids)} context tokens, "
                f"{time.perf_counter() - started:.0f} s")
    finally:
        for param in trainable:
            param.requires_grad_(True)
    scores = totals / answers
    rows_out = [[round(float(v), 6) for v in scores[i]] if i in full else None for i in range(len(layers))]
    ranked = sorted((float(scores[i, h]), i, h) for i in full for h in range(kv_heads))
    return {
        "format": head_split.FORMAT, "model": model_name, "signature": head_split.model_signature(model),
        "n_layers": len(layers), "kv_heads": kv_heads, "n_sink": search.n_sink, "n_local": search.n_local,
        "method": "mean |d(answer NLL)/d(gate)| of DuoAttention's per-head streaming gate "
                  "at the all-dense start",
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
    parser = sub.add_parser(
        "search-heads", help="find DuoAttention's retrieval and streaming heads (writes JSON)",
        description="Score each KV head by the gradient of passkey answers' NLL with respect to "
                    "DuoAttention's gate between its full and its streaming attention.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"registered model name or HF dir (default {DEFAULT_MODEL})")
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
