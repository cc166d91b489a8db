"""kvlife.stream: bandwidth-adaptive KV streaming with a recompute fallback (CacheGen's streaming idea).

    kvlife stream serve --root DIR --trace step:40mbit,4mbit,1.5      # a throttled server
    publish(session, URL, "doc-1")                                     # every level + token ids
    cache, report = StreamClient(URL).fetch("doc-1", slo=2.0, model=model)
    fetch_into(session, URL, "doc-1", slo=2.0)                         # then session.ask(...)

Layers (lower never import upper): sessions (Session glue), cli -> client (fetcher thread + worker)
-> planner, estimate, recompute, transport -> context (manifest, layout, StreamError); server ->
store, shaper -> trace. The server side (server, store, shaper, trace) imports no torch until an
upload's manifest is checked. See docs/streaming.md.
"""

import importlib

_EXPORTS = {
    "ChunkRecord": "client", "FetchReport": "client", "StreamClient": "client",
    "RECOMPUTE": "context", "Manifest": "context", "StreamContext": "context", "StreamError": "context",
    "build_context": "context", "ADAPTIVE": "planner", "Decision": "planner", "Planner": "planner",
    "context_of": "sessions", "fetch_into": "sessions", "publish": "sessions",
    "Trace": "trace", "TraceError": "trace", "parse_trace": "trace",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy, so that `kvlife stream serve` starts without importing torch
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvlife.stream' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kvlife.stream.{_EXPORTS[name]}"), name)
