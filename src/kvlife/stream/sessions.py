"""Streaming for Sessions: publish a session's context at several levels, fetch one into a session.

    from kvlife.stream import publish, fetch_into
    publisher = Session(model, tokenizer, mode="multi-request"); publisher.prefill(document)
    publish(publisher, "http://127.0.0.1:8766", "doc-1")          # every codec level, with token ids

    session = Session(model, tokenizer, mode="multi-request")       # elsewhere, later
    report = fetch_into(session, "http://127.0.0.1:8766", "doc-1", slo=2.0)
    session.ask("What does section 3 say?")                         # as after Session.load

What streams is the dense, uncompressed prefill of the context (the same cache the store reuses), or,
for a session whose recipe compresses (multi-request: compressed before any query), the compressed
cache as pieces (`pieces.py`: its whole-context entry cut by layers, each at several levels).
`fetch_into` then refuses a session of another recipe, model or dtype (the recipe identity, model
fingerprint and dtype of the manifest must be the session's), takes every piece at the best level the
link allows, and, when a piece cannot be had (lost or corrupt every time, or it does not decode or fit),
recompresses the context locally from its token ids (`FetchReport.recompressed` says why): a bad
piece is never used. `policy="recompute"` recompresses without fetching. A session whose recipe
shapes the prefill without compressing (sparse prefill) streams nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from kvlife.codec import rope_from_config
from kvlife.errors import KvlifeError
from kvlife.models import model_fingerprint
from kvlife.store.prefix import reuse_blocker
from kvlife.stream.client import StreamClient
from kvlife.stream.config import FetchConfig
from kvlife.stream.context import RECOMPUTE, Manifest, StreamContext, StreamError, build_context
from kvlife.stream.fetch import FetchAborted, FetchReport
from kvlife.stream.pieces import PieceManifest, PiecesContext, build_pieces
from kvlife.stream.planner import ADAPTIVE

log = logging.getLogger("kvlife.stream")


def _compressing(session: Any) -> bool:
    return session.mode == "multi-request" and session.recipe.compress is not None


def context_of(session: Any, context_id: str, levels: Sequence[str] | None = None, chunk_tokens: int = 256,
               weights: Any = None, model_name: str = "",
               layers_per_piece: int = 1) -> StreamContext | PiecesContext:
    """The streamable form of a session's context cache (multi-request mode, after `prefill`): a dense
    prefill's chunks, or a compressed cache's pieces of `layers_per_piece` layers (`levels`: raw and the
    codec's; `chunk_tokens`: the codec's chunk inside each piece)."""
    if session.cache is None or session.mode != "multi-request" or session.prefill_result is None:
        raise KvlifeError("publish a Session in multi-request mode after prefill(context)")
    if _compressing(session):
        return _pieces_of(session, context_id, levels, chunk_tokens, model_name, layers_per_piece, weights)
    blocker = reuse_blocker(session.recipe, session.recipe.compress is not None, session.cache)
    if blocker is not None:
        raise KvlifeError(f"cannot stream this context: {blocker} (stream dense prefills only)")
    session.cache.rollback(session.context_checkpoint)
    rope = rope_from_config(session.model.config)
    return build_context(session.cache, session.context_ids, context_id, model_fingerprint(session.model),
                         levels, chunk_tokens, rope, weights, model_name)


def _pieces_of(session: Any, context_id: str, levels: Sequence[str] | None, codec_tokens: int,
               model_name: str, layers_per_piece: int, weights: Any = None) -> PiecesContext:
    try:
        layers = session.stored_context()
    except ValueError as exc:  # a layer the store does not know (e.g. recurrent state)
        raise KvlifeError(f"cannot stream this compressed context: {exc}") from None
    rope = rope_from_config(session.model.config) if levels is None or set(levels) - {"raw"} else None
    extra = {"prompt_format": session.format.style}
    return build_pieces(layers, session.context_ids, context_id, model_fingerprint(session.model),
                        session.dtype, session.compressed_identity(), session.recipe.spec, levels,
                        layers_per_piece, rope, codec_tokens, model_name, extra, weights)


def publish(session: Any, url: str | StreamClient, context_id: str, levels: Sequence[str] | None = None,
            chunk_tokens: int = 256, weights: Any = None, token: str | None = None,
            model_name: str = "", layers_per_piece: int = 1) -> Manifest | PieceManifest:
    """Encode the session's context at `levels` (default all) and upload it to `kvlife serve` (a compressed
    context as pieces of `layers_per_piece` layers)."""
    context = context_of(session, context_id, levels, chunk_tokens, weights, model_name, layers_per_piece)
    client = url if isinstance(url, StreamClient) else StreamClient(url, token)
    client.put(context)
    return context.manifest


def fetch_into(session: Any, url: str | StreamClient, context_id: str, slo: float, policy: str = ADAPTIVE,
               token: str | None = None, config: FetchConfig | None = None) -> FetchReport:
    """Stream a context's cache into `session` by `slo` seconds (`Session.attach`); `ask()` then continues on
    it, as after `Session.load`. `config`: the fetch's knobs (`StreamClient.fetch`). A compressed context
    goes only to a session of its recipe, model and dtype (module docstring)."""
    client = url if isinstance(url, StreamClient) else StreamClient(url, token)
    if _compressing(session):
        return _fetch_compressed(session, client, context_id, slo, policy, config)
    blocker = reuse_blocker(session.recipe, session.recipe.compress is not None, session.new_cache())
    if blocker is not None:
        raise KvlifeError(f"a streamed context is a dense prefill; this session cannot use it: {blocker}")
    cache, report = client.fetch(context_id, slo, model=session.model, policy=policy, config=config)
    session.attach(cache, client.last_manifest.token_ids)
    return report


def check_compressed(session: Any, manifest: Any) -> None:
    """KvlifeError unless `manifest` is a compressed context this session may answer on: the same recipe
    identity (spec, kvlife version, prompt format's turn end, method files), model and dtype."""
    context_id = manifest.context_id
    if not isinstance(manifest, PieceManifest):
        raise KvlifeError(f"context {context_id!r} is a dense prefill; session recipe {session.recipe.spec} "
                          "compresses: fetch it with a dense session")
    if manifest.recipe != session.compressed_identity():
        raise KvlifeError(f"context {context_id!r} holds a cache compressed by {manifest.spec} "
                          f"({manifest.recipe}); this session's recipe is {session.recipe.spec} "
                          f"({session.compressed_identity()}): never served to another recipe")
    if manifest.model_fingerprint != model_fingerprint(session.model) or manifest.dtype != session.dtype:
        raise KvlifeError(f"context {context_id!r} was compressed from another model or dtype "
                          f"({manifest.model or 'unnamed'}, {manifest.dtype}); fetch it with that model")


def _fetch_compressed(session: Any, client: StreamClient, context_id: str, slo: float, policy: str,
                      config: FetchConfig | None) -> FetchReport:
    started = time.perf_counter()
    read = client.read_manifest(context_id)
    manifest = read[0]
    check_compressed(session, manifest)
    if policy not in (ADAPTIVE, RECOMPUTE, *manifest.levels) or not slo > 0:  # an error, not a fallback
        raise StreamError(f"policy {policy!r} (adaptive, recompute or one of {', '.join(manifest.levels)}) "
                          f"and slo {slo} (> 0 seconds): one of them is not valid")
    ids = manifest.token_ids
    if policy != RECOMPUTE:
        try:
            layers, report = client.fetch_pieces(context_id, slo, policy, config, model=session.model,
                                                 recipe=manifest.recipe, read=read)
            session.attach_stored(layers, ids)
            return report
        except FetchAborted:
            raise
        except (StreamError, ValueError, KeyError) as exc:  # a piece that cannot be had or does not fit
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("kvlife stream: %s: recompressing the context locally (%s)", context_id, reason)
    else:
        reason = "policy recompute"
    session.prefill_ids(ids)
    report = FetchReport(context_id, policy, slo, len(ids), recompressed=reason)
    report.ready_s = time.perf_counter() - started
    report.met = report.ready_s <= slo
    return report
