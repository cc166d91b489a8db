"""kvlife.stream: a fetch policy over kvlife.store: a context's KV by a deadline, the codec level chosen per
chunk by the measured bandwidth, or the chunk recomputed (CacheGen's streaming idea).

    kvlife stream serve --root DIR --trace step:40mbit,4mbit,1.5      # `kvlife serve`, shaped by a trace
    publish(session, URL, "doc-1")                                     # every level + token ids
    cache, report = StreamClient(URL).fetch("doc-1", slo=2.0, model=model, config=FetchConfig())
    fetch_into(session, URL, "doc-1", slo=2.0)                         # then session.ask(...)

A streamed context is store chunks (one namespace per codec level) plus a manifest, served by the one
server, `kvlife serve` (kvlife.store.server); a compressed context's chunks are its whole-context entry
cut by layers (pieces.py). Layers: README.md. See docs/streaming.md.
"""

import importlib

_EXPORTS = {
    "ChunkRecord": "fetch", "FetchAborted": "fetch", "FetchReport": "fetch", "StreamClient": "client",
    "FetchConfig": "config", "RECOMPUTE": "context", "Manifest": "context", "StreamContext": "context",
    "StreamError": "context", "build_context": "context", "ADAPTIVE": "planner", "Decision": "planner",
    "Planner": "planner", "context_of": "sessions", "fetch_into": "sessions", "publish": "sessions",
    "PieceManifest": "pieces", "PiecesContext": "pieces", "build_pieces": "pieces",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy: the CLI's parser imports kvlife.stream.cli, which needs no torch
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvlife.stream' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kvlife.stream.{_EXPORTS[name]}"), name)
