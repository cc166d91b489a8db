"""Session: prefill a shared context once, then ask() follow-up queries on its cache.

Modes (SCBench semantics):
- multi-turn: turn 1 prefills context + query 1 together (and compresses that prefill); each later
  turn appends the previous answer (the reference by default, the model's own with
  `own_answers=True`) and the next query to the same cache.
- multi-request: `prefill(context)` prefills and compresses the context alone, without seeing any
  query; each query is answered on that cache, and the cache is then cut back to the context.

Decoding is greedy and continues at the true next positions, whatever was evicted.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvlife.attention import StepContext, use_kvlife_attention
from kvlife.cache import KVCache, cache_kwarg
from kvlife.errors import KvlifeError
from kvlife.methods.base import CacheStage
from kvlife.prompt_format import PromptFormat, stop_token_ids
from kvlife.recipe import Recipe, parse
from kvlife.recurrent import check_recipe

MODES = ("multi-turn", "multi-request")


@dataclass
class TurnResult:
    prediction: str
    output_ids: list[int]
    prompt_tokens: int  # new tokens prefilled for this turn (context included on turn 1 of multi-turn)
    prefill_s: float
    ttft_s: float
    decode_tok_s: float | None
    new_tokens: int
    # K/V bytes held after this turn's prefill (what decoding attends over); None: unknown (a server's)
    cache_bytes: int | None
    cache_tokens: float | None  # mean tokens held per layer at that point
    reference_nll: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# lead-ins (e.g. one per instruction with lead_in=head) whose document stores a session keeps at once
LEAD_IN_STORES = 4


class Session:
    """One shared context and its cache, answering queries in multi-turn or multi-request mode."""

    takes_segments = True  # prefill(context, segments=...): the runner passes a sample's document segments

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        recipe: str | Recipe | None = None,
        mode: str = "multi-turn",
        own_answers: bool = False,
        recompress: bool = False,
        prompt_format: str = "chat",
        system_prompt: str | None = None,
        store: Any = None,
        store_salt: str = "",
    ) -> None:
        if mode not in MODES:
            raise KvlifeError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        self.model = use_kvlife_attention(model)  # the methods run in kvlife's attention function
        self.tokenizer = tokenizer
        self.recipe = parse(recipe)
        check_recipe(self.recipe, getattr(model, "config", None))  # refuses attention methods on a pure SSM
        self.mode = mode
        self.own_answers = own_answers
        self.recompress = recompress
        self.format = PromptFormat(tokenizer, prompt_format, system_prompt)
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.cache: KVCache | None = None
        self.context_ids: list[int] = []
        self.context_checkpoint = None
        self.pending_answer: str | None = None
        self.turn = 0
        self.prefill_result: TurnResult | None = None
        self.loaded = False  # the context cache came from load(): turn 1 of multi-turn adds only the query
        self.store_salt = store_salt
        self.documents = None  # kvlife.store.documents.DocumentStore, made on the first assembly
        self._lead_in_documents: dict[tuple[int, ...], Any] = {}  # by head: documents after its lead-in
        # store= (a KVStore or tier URLs, see kvlife.store): prefills reuse the longest stored prefix
        self.store = None
        if store is not None:
            from kvlife.store.prefix import PrefixStore

            self.store = PrefixStore(store, salt=store_salt)

    @property
    def dtype(self) -> str:
        """The model's dtype as results and store keys name it ("float32", "bfloat16")."""
        return str(next(self.model.parameters()).dtype).replace("torch.", "")

    @property
    def context_tokens(self) -> int:
        """Tokens of the current context as prefilled (after prompt compression)."""
        return len(self.context_ids)

    # ---- low level ---------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, ids: list[int], phase: str, compress: bool = False, all_logits: bool = False):
        """Run new tokens through the model at the true next positions; returns logits [n or 1, vocab]."""
        assert self.cache is not None
        start = self.cache.next_position
        positions = torch.arange(start, start + len(ids), device=self.device)
        step = StepContext(self.cache, positions, phase=phase, recipe=self.recipe, compress=compress)
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=positions[None],
            **cache_kwarg(self.model, self.cache),
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            kvlife=step,
        )
        self.last_stats = step.stats
        whole_cache = getattr(self.recipe.compress, "compress_cache", None) if compress else None
        if whole_cache is not None:  # after the per-layer hooks: e.g. kvzip's reconstruction passes
            whole_cache(self._cache_stage(ids, phase, step.stats))
        return out.logits[0].float()

    def _cache_stage(self, ids: list[int], phase: str, stats: dict[str, Any]) -> CacheStage:
        head = self.format.head_ids() if phase == "prefill" else []
        head_tokens = 0
        while head_tokens < min(len(ids), len(head)) and ids[head_tokens] == head[head_tokens]:
            head_tokens += 1
        return CacheStage(self.model, self.cache, ids, self.format.encode, self.format.query_ids(""),
                          head_tokens, stats)

    def _prefill(self, ids: list[int], compress: bool):
        """The first prefill of a context: through the store when one is given."""
        if self.store is None:
            return self.forward(ids, phase="prefill", compress=compress)
        if compress and self.mode == "multi-request":  # compressed before any query: stored whole
            from kvlife.methods.compress import stored

            identity = self.compressed_identity()
            self.last_stats = {}  # a hit runs no forward; a miss's forward sets the compression figures
            stats = self.store.prefill_compressed(self, ids, identity, stored.stored_layers,
                                                  stored.restore_layers)
            self.last_stats = {**self.last_stats, **stats}
            return None
        logits, stats = self.store.prefill(self, ids, compress)
        self.last_stats = {**self.last_stats, **stats}
        return logits

    def new_cache(self) -> KVCache:
        return KVCache.for_model(self.model)

    # ---- compressed contexts as stored layers (the store's whole-context entries, streamed pieces) ------

    def compressed_identity(self) -> str:
        """What shapes this session's compressed context beyond its tokens (recipe spec, kvlife version, the
        prompt format's turn end, method files): the recipe part of its store and stream keys."""
        from kvlife.methods.compress import stored

        return stored.recipe_identity(self.recipe, self.model, self.format.query_ids(""))

    def stored_context(self) -> list:
        """The context cache (multi-request, after prefill) as stored layers (`kvlife.store.entries`)."""
        from kvlife.methods.compress import stored

        self.cache.rollback(self.context_checkpoint)
        return stored.stored_layers(self.cache)

    def attach_stored(self, layers: list, context_ids: list[int]) -> None:
        """`attach` the cache rebuilt from stored layers; ValueError if they do not fit this model."""
        from kvlife.methods.compress import stored

        cache = self.new_cache()
        stored.restore_layers(cache, layers, self.device)
        self.attach(cache, context_ids)

    def prefill_ids(self, context_ids: list[int]) -> None:
        """Prefill (and compress) `context_ids` (as prefilled: after any prompt compression) as the context,
        without the store: what a streamed compressed context falls back to."""
        self.cache = self.new_cache()
        self.forward(list(context_ids), phase="prefill", compress=self.recipe.compress is not None)
        self.attach(self.cache, context_ids)

    def _compress_prompt(self, context_ids: list[int], query: str | None) -> list[int]:
        method = self.recipe.prompt
        if method is None:
            return context_ids
        query_ids = self.format.encode(query) if query else None
        return method.compress_ids(context_ids, query_ids, self.model, self.tokenizer)

    # ---- public API --------------------------------------------------------------------------

    def prefill(self, context: str, segments: list[str] | None = None) -> TurnResult | None:
        """Start a new context. Multi-request prefills (and compresses) it now; multi-turn waits
        for the first query, which is prefilled together with it.

        `segments`: the context cut at document boundaries (`"".join(segments) == context`; the first
        is the instruction, the others documents, as the rag task gives them). Each is tokenized on its
        own, so a document has the same tokens wherever it appears; a recipe with an assemble method
        then builds the context's cache from per-document caches (in both modes, before any query)."""
        self.cache = self.new_cache()
        self.turn = 0
        self.pending_answer = None
        pieces = tail = None
        if segments is not None:
            if "".join(segments) != context or not segments:
                raise KvlifeError("segments must be a non-empty cut of the context (their concatenation)")
            pieces, tail = self.format.segment_ids(segments)
            self.raw_context_ids = [token for piece in pieces for token in piece] + tail
        else:
            self.raw_context_ids = self.format.context_ids(context)
        self.prefill_result = None
        self.loaded = False
        if self.recipe.assemble is not None and pieces is not None:
            return self._assemble(pieces, tail)
        if self.mode == "multi-turn":
            self.context_ids = self.raw_context_ids
            return None
        self.context_ids = self._compress_prompt(self.raw_context_ids, None)
        started = time.perf_counter()
        self._prefill(self.context_ids, compress=self.recipe.compress is not None)
        elapsed = time.perf_counter() - started
        self.context_checkpoint = self.cache.checkpoint()
        self.prefill_result = TurnResult("", [], len(self.context_ids), elapsed, elapsed, None, 0,
                                         self.cache.bytes(), self._mean_held(), stats=dict(self.last_stats))
        return self.prefill_result

    def _assemble(self, pieces: list[list[int]], tail: list[int]) -> TurnResult:
        """The context's cache from per-document caches (kvlife.store.documents: looked up, or computed and
        stored), re-rotated to their places, blended by the recipe's assemble method; then the tail."""
        self.recipe.assemble.check(self.model)  # before any document is computed
        started = time.perf_counter()
        # a segment may encode to nothing
        head, documents = pieces[0], [piece for piece in pieces[1:] if piece]
        pieces = ([head] if head else []) + documents
        layers, spans, figures = self.document_store(head).assemble(pieces, first_alone=bool(head))
        loaded = time.perf_counter()
        ids = [token for piece in pieces for token in piece]
        layers, blend_stats = self.recipe.assemble.blend(self.model, layers, ids,
                                                         spans[1:] if head else spans)
        blended = time.perf_counter()
        self.attach(KVCache.from_tensors(layers, next_position=len(ids)), ids)
        if tail:
            self.forward(tail, phase="extend")
        elapsed = time.perf_counter() - started
        self.context_ids = self.raw_context_ids = ids + tail
        self.context_checkpoint = self.cache.checkpoint()
        stats = {**figures.as_dict(), **blend_stats, "assembled_tokens": len(ids),
                 "documents": len(documents), "assemble_load_s": round(loaded - started, 5),
                 "assemble_recompute_s": round(blended - loaded, 5),
                 "assemble_tail_s": round(elapsed - (blended - started), 5)}
        self.last_stats = stats
        self.prefill_result = TurnResult("", [], len(self.context_ids), elapsed, elapsed, None, 0,
                                         self.cache.bytes(), self._mean_held(), stats=dict(stats))
        return self.prefill_result

    def document_store(self, head: list[int]):
        """The per-document caches this session's assemble method reads for a context whose first piece is
        `head`: documents computed alone (`self.documents`, in the session's store, its tiers and tenant,
        else in memory), or after the method's lead-in (other entries of the same store)."""
        from kvlife.store.documents import DocumentStore

        if self.documents is None:
            tiers = self.store.store if self.store is not None else "memory"
            self.documents = DocumentStore(tiers, self.model, self.tokenizer, salt=self.store_salt)
        if self.recipe.assemble.lead_in == "none":
            return self.documents
        # the lead-in follows from the head (the method's file is read and tokenized once per head, not
        # at every prefill)
        key = tuple(head)
        if key not in self._lead_in_documents:
            if len(self._lead_in_documents) >= LEAD_IN_STORES:  # each holds its lead-in's K/V: keep a few
                self._lead_in_documents.pop(next(iter(self._lead_in_documents)))
            lead_in = self.recipe.assemble.lead_in_ids(head, self.format.encode)
            self._lead_in_documents[key] = DocumentStore(self.documents.store, self.model, self.tokenizer,
                                                         salt=self.documents.salt, lead_in=lead_in)
        return self._lead_in_documents[key]

    def _mean_held(self) -> float:
        held = self.cache.tokens_held()
        return sum(held) / max(1, len(held))

    def ask(self, query: str, max_new_tokens: int = 64, reference: str | None = None,
            score_reference: bool = True) -> TurnResult:
        """Answer one query on the shared context; returns the prediction and its costs."""
        if self.cache is None:
            raise KvlifeError("call prefill(context) before ask(query)")
        query_ids = self.format.query_ids(query)
        if self.mode == "multi-request":
            self.cache.rollback(self.context_checkpoint)
            ids, phase, compress = query_ids, "extend", False
        elif self.turn == 0 and self.loaded:
            ids, phase, compress = query_ids, "extend", False
        elif self.turn == 0:
            self.context_ids = self._compress_prompt(self.raw_context_ids, query)
            ids, phase, compress = self.context_ids + query_ids, "prefill", self.recipe.compress is not None
        else:
            answer = self.pending_answer or ""
            ids = self.format.answer_ids(answer) + query_ids
            phase, compress = "extend", self.recompress and self.recipe.compress is not None
        started = time.perf_counter()
        if phase == "prefill":
            logits = self._prefill(ids, compress)
        else:
            logits = self.forward(ids, phase=phase, compress=compress)
        prefill_s = time.perf_counter() - started
        stats = dict(self.last_stats)
        cache_bytes, cache_tokens = self.cache.bytes(), self._mean_held()
        before_answer = self.cache.checkpoint()
        first_logits = logits[-1]
        output_ids, ttft_s, decode_s = self._generate(first_logits, max_new_tokens, started)
        prediction = self.tokenizer.decode(output_ids, skip_special_tokens=True).strip()
        nll = None
        if reference is not None and score_reference:
            self.cache.rollback(before_answer)
            nll = self._reference_nll(first_logits, reference)
        self.cache.rollback(before_answer)
        if self.mode == "multi-request":
            self.cache.rollback(self.context_checkpoint)
        else:
            self.pending_answer = prediction if (self.own_answers or reference is None) else reference
        self.turn += 1
        generated = len(output_ids)
        decode_tok_s = (generated - 1) / decode_s if generated > 1 and decode_s > 0 else None
        return TurnResult(prediction, output_ids, len(ids), prefill_s, ttft_s, decode_tok_s, generated,
                          cache_bytes, cache_tokens, nll, stats)

    def _generate(self, logits: torch.Tensor, max_new_tokens: int, started: float):
        output_ids: list[int] = []
        ttft_s = 0.0
        decode_started = time.perf_counter()
        for index in range(max_new_tokens):
            token = int(logits.argmax())
            if index == 0:
                ttft_s = time.perf_counter() - started
                decode_started = time.perf_counter()
            if token in self.stop_ids:
                break
            output_ids.append(token)
            if index == max_new_tokens - 1:
                break
            logits = self.forward([token], phase="decode")[-1]
        return output_ids, ttft_s, time.perf_counter() - decode_started

    def _reference_nll(self, first_logits: torch.Tensor, reference: str) -> float | None:
        """Mean negative log-likelihood per token of the reference answer, teacher-forced."""
        ref_ids = self.format.reference_ids(reference)
        if not ref_ids:
            return None
        logits = first_logits[None]
        if len(ref_ids) > 1:
            logits = torch.cat([logits, self.forward(ref_ids[:-1], phase="decode", all_logits=True)], dim=0)
        logprobs = torch.log_softmax(logits, dim=-1)
        nll = -logprobs[torch.arange(len(ref_ids)), torch.tensor(ref_ids)].mean()
        value = float(nll)
        return value if math.isfinite(value) else None

    def save(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        """Save the context cache (the state after prefill) to a safetensors file."""
        if self.cache is None:
            raise KvlifeError("nothing to save: call prefill(context) first")
        from kvlife.models import model_fingerprint

        meta = {"recipe": self.recipe.spec, "context_ids": self.context_ids,
                "model_fingerprint": model_fingerprint(self.model), **(metadata or {})}
        self.cache.save(path, meta)

    def load(self, path: str) -> dict[str, Any]:
        """Restore a context cache written by `save` (same recipe); ask() then continues on it.

        Returns the file's metadata. Multi-request cuts back to the loaded cache after each query;
        multi-turn appends turn 1's query to it.
        """
        meta_cache, metadata = KVCache.load(path, device=self.device)
        if metadata.get("recipe", self.recipe.spec) != self.recipe.spec:
            raise KvlifeError(f"{path} was saved with recipe {metadata.get('recipe')!r}, this session uses "
                              f"{self.recipe.spec!r}; load it with the same recipe")
        from kvlife.models import model_fingerprint

        if metadata.get("model_fingerprint", model_fingerprint(self.model)) != model_fingerprint(self.model):
            raise KvlifeError(f"{path} was saved from another model (or other weights); "
                              "load it with that model")
        expected = KVCache.for_model(self.model)
        if len(meta_cache.layers) != len(expected.layers):
            raise KvlifeError(f"{path} holds {len(meta_cache.layers)} layers, "
                              f"the model has {len(expected.layers)}")
        self.attach(meta_cache, metadata.get("context_ids", []))
        return metadata

    def attach(self, cache: KVCache, context_ids: list[int]) -> None:
        """Make `cache`, the cache of `context_ids`, this session's context: ask() continues on it as after
        `load` (multi-request cuts back to it after each query; multi-turn appends turn 1's query to it)."""
        self.cache = cache
        self.context_ids = list(context_ids)
        self.raw_context_ids = self.context_ids
        self.turn, self.pending_answer, self.prefill_result = 0, None, None
        self.context_checkpoint = cache.checkpoint()
        self.loaded = True
