"""Streaming for Sessions: publish a session's context at several levels, fetch one into a session.

    from kvlife.stream import publish, fetch_into
    publisher = Session(model, tokenizer, mode="multi-request"); publisher.prefill(document)
    publish(publisher, "http://127.0.0.1:8766", "doc-1")          # every codec level, with token ids

    session = Session(model, tokenizer, mode="multi-request")       # elsewhere, later
    report = fetch_into(session, "http://127.0.0.1:8766", "doc-1", slo=2.0)
    session.ask("What does section 3 say?")                         # as after Session.load

What streams is the dense, uncompressed prefill of the context (the same cache the store reuses):
`fetch_into` refuses a session whose recipe shapes the prefill (sparse prefill, compress methods),
and `publish` a session whose cache is not the plain prefill of its context tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvlife.codec import rope_from_config
from kvlife.errors import KvlifeError
from kvlife.models import model_fingerprint
from kvlife.store.prefix import reuse_blocker
from kvlife.stream.client import StreamClient
from kvlife.stream.config import FetchConfig
from kvlife.stream.context import Manifest, StreamContext, build_context
from kvlife.stream.fetch import FetchReport
from kvlife.stream.planner import ADAPTIVE


def context_of(session: Any, context_id: str, levels: Sequence[str] | None = None, chunk_tokens: int = 256,
               weights: Any = None, model_name: str = "") -> StreamContext:
    """The streamable form of a session's context cache (multi-request mode, after `prefill`)."""
    if session.cache is None or session.mode != "multi-request" or session.prefill_result is None:
        raise KvlifeError("publish a Session in multi-request mode after prefill(context)")
    blocker = reuse_blocker(session.recipe, session.recipe.compress is not None, session.cache)
    if blocker is not None:
        raise KvlifeError(f"cannot stream this context: {blocker} (stream dense prefills only)")
    session.cache.rollback(session.context_checkpoint)
    rope = rope_from_config(session.model.config)
    return build_context(session.cache, session.context_ids, context_id, model_fingerprint(session.model),
                         levels, chunk_tokens, rope, weights, model_name)


def publish(session: Any, url: str | StreamClient, context_id: str, levels: Sequence[str] | None = None,
            chunk_tokens: int = 256, weights: Any = None, token: str | None = None,
            model_name: str = "") -> Manifest:
    """Encode the session's context at `levels` (default all) and upload it to `kvlife serve`."""
    context = context_of(session, context_id, levels, chunk_tokens, weights, model_name)
    client = url if isinstance(url, StreamClient) else StreamClient(url, token)
    client.put(context)
    return context.manifest


def fetch_into(session: Any, url: str | StreamClient, context_id: str, slo: float, policy: str = ADAPTIVE,
               token: str | None = None, config: FetchConfig | None = None) -> FetchReport:
    """Stream a context's cache into `session` by `slo` seconds (`Session.attach`); `ask()` then continues on
    it, as after `Session.load`. `config`: the fetch's knobs (`StreamClient.fetch`)."""
    blocker = reuse_blocker(session.recipe, session.recipe.compress is not None, session.new_cache())
    if blocker is not None:
        raise KvlifeError(f"a streamed context is a dense prefill; this session cannot use it: {blocker}")
    client = url if isinstance(url, StreamClient) else StreamClient(url, token)
    cache, report = client.fetch(context_id, slo, model=session.model, policy=policy, config=config)
    session.attach(cache, client.last_manifest.token_ids)
    return report
