"""KVzip: score each cached token by the attention it gets while the model reconstructs the context."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from kvlife.attention import AttnCall, dense_attention
from kvlife.errors import KvlifeError, SpecError
from kvlife.methods.base import CacheCompressMethod, CacheStage, reduce_groups
from kvlife.methods.compress.keep import LEVELS, allocate, apply_keep, real_slots
from kvlife.methods.compress.snapkv import attention_mass, safeguard

FIRST_PROMPT = "Repeat the previous context exactly."
NEXT_PROMPT = "Repeat the part of the previous context exactly, starting with "
PREVIOUS_TAIL = 8  # tokens of the previous chunk that a later chunk's prompt quotes (as KVzip does)
NORMALIZE = ("cache", "chunk")
KEEP = 1e30  # the score of an always-kept token: above any score, KVzip+'s weighted ones included
SAFE = 1e29  # a head's safeguarded tokens (alpha): above any score, below the always-kept ones


class ReconstructionScorer:
    """A prefill method for the reconstruction passes: dense attention that also records, per
    full-attention layer, each cached token's largest attention from any query of a pass (any head of
    its GQA group), over the first `held[layer]` slots (the cache as it was before the passes).

    `normalize="cache"`: the softmax runs over every cached key (as the model's attention does).
    `normalize="chunk"`: over the keys at positions below `sink`, those of the chunk being
    reconstructed (`span`) and the pass's own keys, and only the chunk's tokens are scored by the
    pass (KVzip's and kvpress's code). `out_proj` (KVzip+): per layer the attention's output
    projection weight [hidden, q_heads * head_dim]; each probability is then divided by the norm of
    the query row's attention input and multiplied by the norm of the token's value through its
    query head's slice of the projection (`row_norms`, filled per pass by `track_row_norms`)."""

    name = "kvzip_scorer"

    def __init__(self, held: dict[int, int], normalize: str = "cache",
                 out_proj: dict[int, torch.Tensor] | None = None) -> None:
        self.held = held
        self.normalize = normalize
        self.out_proj = out_proj
        self.span = (0, 0)  # positions [first, stop) of the chunk reconstructed by the current pass
        self.sink = 0
        self.row_norms: dict[int, torch.Tensor] = {}
        self.value_norms: dict[int, torch.Tensor] = {}  # per layer [q_heads, held]: values stay
        self.scores: dict[int, torch.Tensor] = {}

    def attend(self, call: AttnCall) -> torch.Tensor:
        out = dense_attention(call)
        if call.layer_idx in self.held:
            layer = call.step.cache.layers[call.layer_idx]
            peak = reduce_groups(self.peak(call, layer), layer.positions.shape[0], "max")
            old = self.scores.get(call.layer_idx)
            self.scores[call.layer_idx] = peak if old is None else torch.maximum(old, peak)
        return out

    def peak(self, call: AttnCall, layer) -> torch.Tensor:
        """[q_heads, held]: each held token's largest (weighted) probability from the pass's queries."""
        index, held = call.layer_idx, self.held[call.layer_idx]
        allowed = weigh = None
        if self.normalize == "chunk":
            first, stop = self.span
            k_pos = layer.positions
            context = torch.arange(k_pos.shape[-1], device=k_pos.device) < held
            allowed = ~context | (k_pos < self.sink) | ((k_pos >= first) & (k_pos < stop))
        if self.out_proj is not None:
            if index not in self.value_norms:
                _, values = layer.dense_kv()
                self.value_norms[index] = value_norms(values[0, :, :held], self.out_proj[index])
            weights = self.value_norms[index]
            inverse = 1.0 / self.row_norms[index].clamp_min(1e-6)  # [rows]

            def weigh(probs: torch.Tensor, heads: slice, rows: slice) -> torch.Tensor:
                probs[..., :held] *= inverse[rows, None] * weights[heads, None]
                probs[..., held:] = 0.0  # the pass's own keys are not scored
                return probs
        return attention_mass(call, layer, slice(None), reduce="max", allowed=allowed, weigh=weigh)[:, :held]


def value_norms(values: torch.Tensor, out_proj: torch.Tensor) -> torch.Tensor:
    """||W_O,h v|| [q_heads, tokens] for values [kv_heads, tokens, head_dim] and an output projection
    weight [hidden, q_heads * head_dim] (query head h reads its KV head's values)."""
    kv_heads, _, dim = values.shape
    q_heads = out_proj.shape[1] // dim
    groups = q_heads // kv_heads
    norms = []
    for head in range(q_heads):
        part = out_proj[:, head * dim:(head + 1) * dim].float()  # [hidden, head_dim]
        norms.append(torch.linalg.vector_norm(values[head // groups].float() @ part.T, dim=-1))
    return torch.stack(norms)


def attention_modules(model, layers: list[int]) -> dict[int, Any]:
    """Each listed layer's attention module (with its output projection), for KVzip+."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    try:
        modules = {i: blocks[i].self_attn for i in layers}
        if all(hasattr(module, "o_proj") for module in modules.values()):
            return modules
    except (AttributeError, TypeError, IndexError):
        pass
    raise KvlifeError(f"kvzip(plus=true) needs a decoder stack whose layers have self_attn.o_proj; "
                      f"{type(model).__name__} has another layout")


@contextmanager
def track_row_norms(modules: dict[int, Any], scorer: ReconstructionScorer):
    """While open, each attention module's input norms per row [rows] go to `scorer.row_norms` under
    its layer."""
    def hook(index):
        def record(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            scorer.row_norms[index] = torch.linalg.vector_norm(hidden[0].float(), dim=-1)
        return record

    handles = [module.register_forward_pre_hook(hook(i), with_kwargs=True) for i, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reconstruction_scores(stage: CacheStage, layers: list[int], chunk_size: int, normalize: str = "cache",
                          plus: bool = False, sink: int = 0) -> tuple[dict, int, int]:
    """KVzip's scores [kv_heads, slots] for `layers`, the tokens the reconstruction passes fed, and
    the number of chunks. The cache is returned exactly as it was."""
    cache = stage.cache
    modules = attention_modules(stage.model, layers) if plus else None
    scorer = ReconstructionScorer({i: cache.layers[i].get_seq_length() for i in layers}, normalize,
                                  {i: m.o_proj.weight.detach() for i, m in modules.items()} if plus else None)
    recipe = SimpleNamespace(prefill=scorer, compress=None, load=None)
    head = stage.head_tokens
    context = stage.ids[head:]
    chunks = [context[start:start + chunk_size] for start in range(0, len(context), chunk_size)]
    first_position = cache.next_position - len(stage.ids)
    scorer.sink = first_position + max(sink, head)
    checkpoint = cache.checkpoint()
    fed = 0
    try:
        with track_row_norms(modules, scorer) if plus else nullcontext():
            for index, chunk in enumerate(chunks):
                if index == 0:
                    prompt = stage.encode(FIRST_PROMPT)
                else:
                    prompt = stage.encode(NEXT_PROMPT) + chunks[index - 1][-PREVIOUS_TAIL:]
                ids = prompt + stage.turn_end + chunk
                start = first_position + head + index * chunk_size
                scorer.span = (start, start + len(chunk))
                stage.forward(ids, recipe)
                cache.rollback(checkpoint)
                fed += len(ids)
    finally:
        cache.rollback(checkpoint)
    return scorer.scores, fed, len(chunks)


@dataclasses.dataclass
class KVzip(CacheCompressMethod):
    """Keep the tokens the model attends to most while it reconstructs the context from the cache.

    Kim et al., 2025 ("KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction")
    score each KV pair by the maximum attention it receives while the model, prompted with
    "Repeat the previous context exactly.", is teacher-forced through the context itself on top of
    the cache. A pair the model needs to reproduce the context is one any later query may need, so
    the compressed cache serves every query without having seen any.

    kvlife runs the reconstruction after the prefill (the whole-cache stage), in chunks of
    `chunk_size` context tokens: each pass feeds the prompt (a later chunk's prompt also quotes the
    previous chunk's last 8 tokens), the end of a user turn in the session's prompt format, and the
    chunk, attending over the full cache plus the chunk, then is cut off again; memory is bounded
    by the chunk. A token's score is its largest softmax probability from any pass's query in any
    query head of its GQA group (by default the softmax runs over the whole cache, as the model's
    attention does, and a token keeps its largest score from any pass; `normalize=chunk` follows
    KVzip's code instead). The cost, one
    forward over every context token attending to the full cache plus a score pass per layer
    (about 2-3x a prefill), is recorded in the prefill's stats under "compress". The prompt
    format's head (chat template, system prompt) and the first `n_sink` tokens are always kept.

    Parameters:
        ratio / budget (None): tokens kept per KV head on average, as a fraction of the tokens seen
            or in tokens (without either, nothing is evicted).
        level ("pair"): how the budget is spread: "pair" (the top scores over every layer and head
            at once: KVzip's default, budgets differ per layer and per head), "head" (each layer
            keeps `budget * kv_heads` tokens, the top scores across its heads: KVzip's head-wise
            non-uniform budgets, as Ada-KV) or "uniform" (every KV head keeps its own top tokens, the
            same count in all). "head" and "pair" give head-ragged layers. On the default model at
            ratio 0.25 (kv task, multi-request) "uniform" garbled the values' UUIDs (accuracy 0.03
            against dense's 0.94) where "pair" kept them: budgets must follow the heads that
            retrieve.
        chunk_size (2000): context tokens reconstructed per pass (KVzip's default).
        n_sink (4): first tokens always kept (attention sinks).
        normalize ("cache"): the keys each pass's softmax runs over: "cache" (every cached key) or
            "chunk" (as KVzip's and kvpress's code: the prompt format's head or the first `n_sink`
            tokens, the chunk being reconstructed and the pass itself; each chunk's tokens are scored
            by their own pass only).
        plus (false): KVzip+ (Jegou & Jeblick, 2026, kvpress's `kvzip_plus_normalization`): each
            probability divided by the norm of the query row's attention input and multiplied by
            ||W_O,h v||, the norm of the token's value through the output projection of the query
            head h, so a score measures what the token adds to the residual stream, not its share
            of the attention alone. Needs layers with `self_attn.o_proj` (Llama, Qwen2, Mistral).
        alpha (0.2): Ada-KV's safeguard (Feng et al., 2024; 0.2 there, kvpress's `alpha_safeguard`)
            for the `pair` and `head` levels: each KV head of each layer first keeps its own top
            `alpha * budget` tokens (the sinks among them), and the rest of the budget goes to the
            top scores as the level spreads it. At `pair` a layer whose reconstruction attention is
            spread thin (small peak probabilities everywhere) can otherwise lose nearly all of its
            context: on the default model at ratio 0.25 six of 24 layers kept 1-3% of it and kv's
            UUIDs went with them (0.880x dense over 32 samples; 0.954x with 0.2 on 24 held-out
            samples: docs/lifecycle.md). `alpha=0` is KVzip as published.
    """

    name: ClassVar[str] = "kvzip"
    paper: ClassVar[str] = (
        "Kim et al., 2025, KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
    )
    level: str = "pair"
    chunk_size: int = 2000
    n_sink: int = 4
    normalize: str = "cache"
    plus: bool = False
    alpha: float = 0.2

    def validate(self) -> None:
        super().validate()
        if self.level not in LEVELS:
            raise SpecError(f"kvzip: level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.chunk_size < 1:
            raise SpecError(f"kvzip: chunk_size must be >= 1 token, got {self.chunk_size}")
        if self.n_sink < 0:
            raise SpecError(f"kvzip: n_sink must be >= 0, got {self.n_sink}")
        if self.normalize not in NORMALIZE:
            raise SpecError(f"kvzip: normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        if not isinstance(self.plus, bool):
            raise SpecError(f"kvzip: plus must be true or false, got {self.plus!r}")
        if not 0 <= self.alpha <= 1:
            raise SpecError(f"kvzip: alpha must be in [0, 1], got {self.alpha}")

    def compress_cache(self, stage: CacheStage) -> None:
        cache = stage.cache
        targets = {index: self.target_tokens(layer, None) for index, layer in cache.kv_layers()
                   if not layer.is_sliding}
        targets = {index: target for index, target in targets.items() if target is not None}
        if not targets:
            return
        started = time.perf_counter()
        scores, fed, chunks = reconstruction_scores(stage, sorted(targets), self.chunk_size, self.normalize,
                                                    self.plus, self.n_sink)
        self.evict(cache, scores, targets, max(self.n_sink, stage.head_tokens))
        stage.stats["compress"] = {"method": self.spec(), "seconds": round(time.perf_counter() - started, 4),
                                   "forward_tokens": fed, "chunks": chunks, "prefill_tokens": len(stage.ids)}

    def evict(self, cache, scores: dict[int, torch.Tensor], targets: dict[int, int], protect: int) -> None:
        """Keep the top-scored tokens at this method's level; the first `protect` positions always, and
        each head's own top `alpha * target` (the safeguard) before the level spreads the rest."""
        ranked = {}
        for index, score in scores.items():
            layer = cache.layers[index]
            score = score.masked_fill(layer.positions < protect, KEEP)
            score = score.masked_fill(~real_slots(layer), float("-inf"))
            ranked[index] = safeguard(score, int(self.alpha * targets[index]), SAFE)  # alpha 0: unchanged
        for index, mask in allocate(ranked, targets, self.level).items():
            apply_keep(cache, index, mask)
