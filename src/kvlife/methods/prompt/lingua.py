"""LLMLingua: drop the context tokens a small language model finds least surprising."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, ClassVar

import numpy as np
import torch

from kvlife import models
from kvlife.errors import SpecError
from kvlife.methods.base import PromptMethod

WORD = re.compile(r"[a-z0-9][a-z0-9_\-]*")
STOPWORDS = frozenset(
    "the and for are but not you all any can had her was one our out has have his how its may new now "
    "old see two way who did get let say she too use what when where which while with this that these "
    "those there their them then than from into about after before value key find give tell answer "
    "question context text below above word words".split()
)
COMMON_WORD_SHARE = 0.2  # a query word in more than this share of the sentences says nothing
HEAD_SCAN = 64  # a chat template's head (up to its last special token) lies in the first tokens
LOGIT_ROWS = 128  # vocabulary projections per piece while scoring (bounds the logits' memory)


def _words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if len(w) >= 3 and w not in STOPWORDS}


@dataclasses.dataclass
class Lingua(PromptMethod):
    """Keep the context's most surprising tokens and the sentences that mention the query.

    Jiang et al., 2023 ("LLMLingua: Compressing Prompts for Accelerated Inference of Large
    Language Models"). A small language model's per-token surprisal (negative log-likelihood)
    measures how much information a token carries; tokens it predicts easily are dropped until
    the context is down to the target rate. As LLMLingua's coarse level (and LongLLMLingua's
    question awareness), when the query is known (multi-turn: query 1; multi-request passes None)
    whole sentences containing its distinctive words are kept first, rarest words first.

    Surprisal is computed in chunks with plain forwards (each chunk sees `overlap` tokens of the
    one before). The chat template's head (through its last special token in the first 64
    tokens) and the context's last token are always kept. After each call, `last_stats` holds
    original and kept tokens, the achieved `rate` (kept / original) and the scoring time;
    `last_rate` is that rate alone.

    Parameters:
        rate (1/3): fraction of the context tokens kept.
        scorer ("self"): the model scoring surprisal, "self" (the session's model) or a registered
            model name / HF dir (e.g. "smollm2-135m"; its tokens are mapped to the session's by
            character offsets, which needs fast tokenizers; otherwise "self" is used).
        chunk (512): tokens per scoring forward.
        overlap (64): tokens of the previous chunk each chunk sees as context.
        query_share (0.5): at most this share of the kept tokens goes to whole query sentences.
    """

    name: ClassVar[str] = "lingua"
    paper: ClassVar[str] = (
        "Jiang et al., 2023, LLMLingua: Compressing Prompts for Accelerated Inference of Large Language "
        "Models"
    )
    rate: float = 1 / 3
    scorer: str = "self"
    chunk: int = 512
    overlap: int = 64
    query_share: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self._scorer: tuple[Any, Any] | None = None
        self._sentence_tokens = 0
        self.last_stats: dict[str, Any] = {}
        self.last_rate: float | None = None

    def validate(self) -> None:
        if not 0 < self.rate <= 1:
            raise SpecError(f"lingua: rate must be in (0, 1], got {self.rate}")
        if self.chunk < 2 or not 0 <= self.overlap < self.chunk:
            raise SpecError(
                f"lingua: need chunk >= 2 and 0 <= overlap < chunk, got {self.chunk}, {self.overlap}"
            )
        if not 0 <= self.query_share <= 1:
            raise SpecError(f"lingua: query_share must be in [0, 1], got {self.query_share}")

    # ---- surprisal ------------------------------------------------------------------------------

    @torch.no_grad()
    def surprisal(self, ids: list[int], model: Any) -> np.ndarray:
        """Per-token negative log-likelihood under `model` (the first token gets +inf: no context)."""
        device = next(model.parameters()).device
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        nll = np.full(len(ids), np.inf, dtype=np.float64)
        for start in range(0, len(ids), self.chunk):
            first = max(0, start - self.overlap)
            piece = torch.tensor([ids[first:start + self.chunk]], device=device)
            hidden = decoder(input_ids=piece, use_cache=False).last_hidden_state[0]
            targets = piece[0, 1:]
            picked = []
            for row in range(0, targets.shape[0], LOGIT_ROWS):
                logits = head(hidden[row:min(row + LOGIT_ROWS, targets.shape[0])]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                rows = targets[row:row + LOGIT_ROWS, None]
                picked.append(torch.log_softmax(logits, dim=-1).gather(1, rows)[:, 0])
            values = -torch.cat(picked).double().cpu().numpy()  # values[j]: token first + 1 + j
            skip = max(0, start - first - 1)  # overlap tokens were scored with more context before
            nll[first + 1 + skip: first + 1 + len(values)] = values[skip:]
        return nll

    def _scored(self, context_ids: list[int], model: Any, tokenizer: Any) -> np.ndarray:
        if self.scorer == "self":
            return self.surprisal(context_ids, model)
        if self._scorer is None:
            self._scorer = models.load(self.scorer)
        scorer_model, scorer_tokenizer = self._scorer
        try:
            text = tokenizer.decode(context_ids)
            mine = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            theirs = scorer_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (TypeError, NotImplementedError, ValueError):
            return self.surprisal(context_ids, model)
        if list(mine["input_ids"]) != list(context_ids):
            return self.surprisal(context_ids, model)
        # Spread each scorer token's surprisal over its characters, then sum them per own token.
        per_char = np.zeros(len(text) + 1)
        token_nll = self.surprisal(list(theirs["input_ids"]), scorer_model)
        token_nll[~np.isfinite(token_nll)] = token_nll[np.isfinite(token_nll)].max(initial=10.0)
        for (lo, hi), value in zip(theirs["offset_mapping"], token_nll):
            if hi > lo:
                per_char[lo:hi] += value / (hi - lo)
        cumulative = np.concatenate([[0.0], np.cumsum(per_char)])
        spans = np.array(mine["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return cumulative[spans[:, 1]] - cumulative[spans[:, 0]]

    # ---- selection ------------------------------------------------------------------------------

    @staticmethod
    def protected(context_ids: list[int], tokenizer: Any) -> np.ndarray:
        """Bool mask of tokens always kept: the chat template head and the last token."""
        keep = np.zeros(len(context_ids), dtype=bool)
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        head = [i for i, token in enumerate(context_ids[:HEAD_SCAN]) if token in special]
        if head:
            keep[: head[-1] + 3] = True  # the special token, then the role name and its newline
        keep[-1:] = True
        return keep

    @staticmethod
    def sentences(texts: list[str]) -> list[tuple[int, int]]:
        """Token spans [lo, hi) of sentences: a sentence ends with a token holding . ! ? or a newline."""
        spans, lo = [], 0
        for index, text in enumerate(texts):
            if any(mark in text for mark in ".!?\n"):
                spans.append((lo, index + 1))
                lo = index + 1
        if lo < len(texts):
            spans.append((lo, len(texts)))
        return spans

    def query_sentences(self, texts: list[str], query_words: set[str], budget: int) -> np.ndarray:
        """Bool mask of tokens in the sentences that hold the query's distinctive words (rarest first)."""
        keep = np.zeros(len(texts), dtype=bool)
        spans = self.sentences(texts)
        if not query_words or not spans:
            return keep
        words = [_words("".join(texts[lo:hi])) & query_words for lo, hi in spans]
        frequency = {w: sum(w in found for found in words) for w in query_words}
        weight = {w: math.log(len(spans) / n) for w, n in frequency.items()
                  if 0 < n <= max(1, COMMON_WORD_SHARE * len(spans))}
        ranked = sorted(range(len(spans)), key=lambda i: -sum(weight.get(w, 0.0) for w in words[i]))
        used = 0
        for index in ranked:
            if not any(w in weight for w in words[index]):
                break
            lo, hi = spans[index]
            if used + hi - lo > budget:
                continue
            keep[lo:hi] = True
            used += hi - lo
        return keep

    def keep_mask(
        self, context_ids: list[int], query_ids: list[int] | None, model: Any, tokenizer: Any
    ) -> np.ndarray:
        """Bool [len(context_ids)]: the tokens kept (exactly round(rate * n) unless protection needs more)."""
        total = len(context_ids)
        target = max(1, round(self.rate * total))
        if target >= total:
            self._sentence_tokens = 0
            return np.ones(total, dtype=bool)
        keep = self.protected(context_ids, tokenizer)
        self._sentence_tokens = 0
        if query_ids:
            texts = [tokenizer.decode([token]) for token in context_ids]
            budget = int(self.query_share * target) - int(keep.sum())
            chosen = self.query_sentences(texts, _words(tokenizer.decode(query_ids)), max(0, budget)) & ~keep
            self._sentence_tokens = int(chosen.sum())
            keep |= chosen
        room = target - int(keep.sum())
        if room > 0:
            nll = np.where(keep, -np.inf, self._scored(context_ids, model, tokenizer))
            order = np.argsort(-nll, kind="stable")  # most surprising first; ties keep text order
            keep[order[:room]] = True
        return keep

    def compress_ids(
        self, context_ids: list[int], query_ids: list[int] | None, model: Any, tokenizer: Any
    ) -> list[int]:
        started = time.perf_counter()
        keep = self.keep_mask(context_ids, query_ids, model, tokenizer)
        kept = [token for token, flag in zip(context_ids, keep) if flag]
        self._record(len(context_ids), len(kept), self._sentence_tokens, time.perf_counter() - started)
        return kept

    def _record(self, total: int, kept: int, sentence_tokens: int, seconds: float) -> None:
        self.last_rate = kept / max(1, total)
        self.last_stats = {"original_tokens": total, "kept_tokens": kept, "rate": round(self.last_rate, 4),
                           "query_sentence_tokens": sentence_tokens, "scoring_s": round(seconds, 3)}
