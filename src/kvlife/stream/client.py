"""The streaming client of `kvlife serve`: upload a context at several levels, fetch it by a deadline.

    client = StreamClient("http://127.0.0.1:8766")
    client.put(build_context(...))                                 # the chunks first, then the manifest
    cache, report = client.fetch("doc-1", slo=2.0, model=model)    # KVCache of the whole context
    report.met, report.ready_s, [c.option for c in report.chunks]

A context's chunks are store chunks (sealed envelopes under their keys, `Manifest.keys`); the server
lists the context only once every one of them is stored. `fetch` reads the manifest and the header,
then runs a `Fetch` (fetch.py) with the knobs of a `FetchConfig`. Every chunk's bytes are checked
(envelope and the manifest's SHA-256) before they are used. A compressed context (pieces.py: its
whole-context entry cut by layers) is fetched by `fetch_pieces`, the same `Fetch` with no recompute.
"""

from __future__ import annotations

import json
import time
from typing import Any

from kvlife.codec import warm_up
from kvlife.codec.format import parse_header
from kvlife.models import model_fingerprint
from kvlife.store.base import ChunkCorrupt
from kvlife.store.envelope import HEADER, check_header, envelope_header, open_chunk
from kvlife.stream.config import FetchConfig
from kvlife.stream.context import RECOMPUTE, Manifest, StreamContext, StreamError, check_context_id
from kvlife.stream.estimate import SpeedEstimate, ThroughputEstimate
from kvlife.stream.fetch import ChunkRecord, Fetch, FetchAborted, FetchReport
from kvlife.stream.pieces import PIECES_FORMAT, PieceBuilder, PieceManifest, PiecesContext
from kvlife.stream.planner import ADAPTIVE, Planner
from kvlife.stream.recompute import CacheBuilder
from kvlife.stream.transport import HttpTransport, TransportError

__all__ = ["ChunkRecord", "FetchAborted", "FetchReport", "StreamClient"]

RECOMPUTE_FLOPS_PRIOR = 1.5e11  # float32 prefill FLOP/s of this project's CPU core; replaced once measured
EXISTS_BATCH = 4096  # keys per POST /v1/exists


def level_sizes(manifest: Manifest | PieceManifest, config: FetchConfig) -> dict[str, list[int]]:
    """Bytes of every chunk (piece) at each level the manifest holds and `config.levels` allows."""
    usable = [lv for lv in manifest.levels if config.levels is None or lv in config.levels]
    return {lv: [manifest.size(lv, i) for i in range(manifest.n_chunks)] for lv in usable}


class StreamClient:
    def __init__(self, url: str | Any, token: str | None = None, timeout_s: float = 30.0) -> None:
        """`url`: the server, or a transport (with `HttpTransport`'s `get`, `put` and `request_json`)."""
        self.transport = HttpTransport(url, token, timeout_s) if isinstance(url, str) else url
        warm_up()  # the codec's kernels load now (once per process, ~0.3 s), not inside a fetch's deadline
        self.speeds: SpeedEstimate | None = None  # kept across fetches: this machine's speeds
        self.piece_speeds: SpeedEstimate | None = None  # the same for compressed contexts' pieces
        self.last_manifest: Manifest | PieceManifest | None = None

    # ---- small requests ----------------------------------------------------------------------------

    def manifest(self, context_id: str) -> Manifest | PieceManifest:
        """A dense context's `Manifest` or a compressed one's `PieceManifest`."""
        return self._manifest(context_id)[0]

    def read_manifest(self, context_id: str) -> tuple[Manifest | PieceManifest, int, float]:
        """The manifest, its size in bytes and the seconds its request took."""
        started = time.perf_counter()
        manifest, size = self._manifest(context_id)
        return manifest, size, time.perf_counter() - started

    def _manifest(self, context_id: str) -> tuple[Manifest | PieceManifest, int]:
        try:
            data = self.transport.get(f"/v1/contexts/{check_context_id(context_id)}/manifest")
        except TransportError as exc:
            if exc.status == 404:
                raise StreamError(f"the server has no context {context_id!r} "
                                  "(store it with `kvlife stream put`)") from None
            raise
        try:
            parsed = json.loads(data)
            if isinstance(parsed, dict) and parsed.get("format") == PIECES_FORMAT:
                return PieceManifest.from_json(parsed), len(data)
            return Manifest.from_json(parsed), len(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise StreamError(f"the manifest of {context_id!r} is not JSON: {exc}") from None

    def contexts(self) -> list[str]:
        return self.transport.request_json("GET", "/v1/contexts")["contexts"]

    def put(self, context: StreamContext | PiecesContext) -> dict:
        """Upload the chunks the server does not hold yet (the header, every level's), then the manifest; a
        `PiecesContext` (a compressed context) likewise, its pieces for chunks."""
        payloads = context.payloads()
        keys = list(payloads)
        held: list[bool] = []
        for start in range(0, len(keys), EXISTS_BATCH):
            batch = {"keys": keys[start:start + EXISTS_BATCH]}
            held += self.transport.request_json("POST", "/v1/exists", batch)["exists"]
        for key, present in zip(keys, held, strict=True):
            if not present:
                self.transport.put(f"/v1/chunks/{key}", [envelope_header(key, payloads[key]), payloads[key]])
        manifest = context.manifest
        return self.transport.request_json("PUT", f"/v1/contexts/{manifest.context_id}",
                                           {"manifest": manifest.to_json(), "chunks": keys})

    def set_trace(self, spec: str | None) -> dict:
        """Restart the server's link trace at t = 0 (None: unshaped)."""
        return self.transport.request_json("POST", "/v1/link", {"trace": spec})

    def chunk(self, manifest: Manifest, level: str, index: int, deadline: float | None = None,
              give_up: Any = None) -> bytes:
        """Chunk `index` at `level`, its envelope opened and its SHA-256 checked against the manifest's: bytes
        that fail raise `TransportError` (as a chunk lost in transit does), so they are never used.
        `deadline`, `give_up`: as `HttpTransport.get`."""
        key = manifest.chunk_key(level, index)
        blob = self.transport.get(f"/v1/chunks/{key}", deadline=deadline, give_up=give_up)
        try:
            return _open(key, blob, manifest.chunks[level][index].sha256)
        except ChunkCorrupt as exc:
            raise TransportError(f"chunk {level}/{index}: {len(blob)} bytes that fail the manifest's SHA-256 "
                                 f"({exc})") from None

    def header(self, manifest: Manifest) -> bytes:
        """The context's codec header (shared by every level), checked against the manifest."""
        try:
            return _open(manifest.header_key, self.transport.get(f"/v1/chunks/{manifest.header_key}"),
                         manifest.header_sha256)
        except ChunkCorrupt:
            raise StreamError(f"the header of {manifest.context_id!r} does not match its manifest") from None
        except TransportError as exc:
            if exc.status == 404:
                raise StreamError(f"the server holds no header for {manifest.context_id!r}: store the "
                                  "context again (`kvlife stream put`)") from None
            raise

    # ---- the fetch ---------------------------------------------------------------------------------

    def fetch(self, context_id: str, slo: float, model: Any = None, policy: str = ADAPTIVE,
              config: FetchConfig | None = None) -> tuple[Any, FetchReport]:
        """The context's KVCache, ready as close to `slo` seconds as the link allows, and what happened.

        `model`: needed to recompute chunks (and checked against the context's model fingerprint); without
        it every chunk is fetched. `policy`: "adaptive", "recompute" or a level name (fixed). `config`: the
        planner's and the client's knobs (`FetchConfig`; its defaults are the measured best)."""
        config = config or FetchConfig()
        started = time.perf_counter()
        manifest, manifest_bytes = self._manifest(context_id)
        self.last_manifest = manifest
        if isinstance(manifest, PieceManifest):
            raise StreamError(f"context {context_id!r} is a cache compressed by {manifest.spec}: fetch it "
                              "into a session of that recipe (`kvlife fetch --method`, fetch_into) or with "
                              "fetch_pieces")
        header_blob = self.header(manifest)
        setup_s = time.perf_counter() - started
        header = parse_header(header_blob, header_only=True)
        if model is not None and model_fingerprint(model) != manifest.model_fingerprint:
            raise StreamError(f"context {context_id!r} was encoded from another model "
                              f"({manifest.model or 'unnamed'}); fetch it with that model")
        if policy == RECOMPUTE and model is None:
            raise StreamError("policy 'recompute' needs the model")
        n = manifest.n_chunks
        tokens = [len(manifest.chunk_ids(i)) for i in range(n)]
        sizes = level_sizes(manifest, config)
        planner = Planner(sizes, tokens, slo, policy, allow_recompute=model is not None, config=config)
        setup_bytes = manifest_bytes + len(header_blob) + HEADER.size
        # the manifest and header are small: their rate says little about a chunk's (the round trips
        # dominate), so it is only the prior for the first chunk, whose own transfer corrects it (the probe)
        prior = setup_bytes / max(setup_s, 1e-6)
        link = ThroughputEstimate(prior_bytes_s=prior, window=config.throughput_window)
        report = FetchReport(context_id, policy, slo, len(manifest.token_ids), setup_s=setup_s,
                             bytes=setup_bytes)
        report.chunks = [ChunkRecord(i, tokens[i]) for i in range(n)]
        fetch = Fetch(manifest, planner, self._speeds(header, model), config, source=self,
                      builder=CacheBuilder(header, model), report=report, link=link, started=started)
        return fetch.run()

    def fetch_pieces(self, context_id: str, slo: float, policy: str = ADAPTIVE,
                     config: FetchConfig | None = None, model: Any = None,
                     recipe: str | None = None,
                     read: tuple[PieceManifest, int, float] | None = None) -> tuple[list[Any], FetchReport]:
        """A compressed context's stored layers (`kvlife.store.entries.StoredLayer`, every layer in order),
        each piece at the best level that lets the whole be ready by `slo` seconds, and what happened.

        `model` / `recipe` (a recipe identity, `Session.compressed_identity`): if given, the context must have
        been compressed from that model (fingerprint) and by that recipe, or StreamError before any piece is
        fetched. `policy`: "adaptive" or a level name. A compressed cache has no per-piece recompute: when no
        plan meets the deadline the soonest (the cheapest level) is taken, and a piece that fails
        `max_attempts` times fails the fetch (`fetch_into` then recompresses the context). `read`: what
        `read_manifest` gave when the caller has read the manifest already, so it is not requested twice
        (its read time still counts in the setup, the link's first throughput sample)."""
        config = config or FetchConfig()
        manifest, manifest_bytes, read_s = read or self.read_manifest(context_id)
        started = time.perf_counter() - read_s
        self.last_manifest = manifest
        if not isinstance(manifest, PieceManifest):
            raise StreamError(f"context {context_id!r} is a dense prefill, not a compressed cache: fetch it "
                              "with fetch")
        if model is not None and model_fingerprint(model) != manifest.model_fingerprint:
            raise StreamError(f"context {context_id!r} was compressed from another model "
                              f"({manifest.model or 'unnamed'}); fetch it with that model")
        if recipe is not None and recipe != manifest.recipe:
            raise StreamError(f"context {context_id!r} was compressed by {manifest.recipe}, not {recipe}")
        if policy == RECOMPUTE:
            raise StreamError("a compressed context has no per-piece recompute: recompress it with its "
                              "session")
        setup_s = time.perf_counter() - started
        work = manifest.work
        sizes = level_sizes(manifest, config)
        planner = Planner(sizes, work, slo, policy, allow_recompute=False, config=config)
        link = ThroughputEstimate(prior_bytes_s=manifest_bytes / max(setup_s, 1e-6),
                                  window=config.throughput_window)
        report = FetchReport(context_id, policy, slo, len(manifest.token_ids), setup_s=setup_s,
                             bytes=manifest_bytes)
        report.chunks = [ChunkRecord(i, w) for i, w in enumerate(work)]
        if self.piece_speeds is None or self.piece_speeds.fp16_chunk_bytes != max(work):
            self.piece_speeds = SpeedEstimate(max(work))
        fetch = Fetch(manifest, planner, self.piece_speeds, config, source=self,
                      builder=PieceBuilder(manifest), report=report, link=link, started=started,
                      no_recompute="a compressed context has no per-piece recompute")
        return fetch.run()

    def _speeds(self, header: Any, model: Any) -> SpeedEstimate:
        fp16_chunk = sum(2 * s.heads * s.head_dim * 2 for s in header.layers) * header.chunk_tokens
        if self.speeds is None or self.speeds.fp16_chunk_bytes != fp16_chunk:
            params = sum(p.numel() for p in model.parameters()) if model is not None else 5e8
            self.speeds = SpeedEstimate(fp16_chunk, recompute_tokens_s=RECOMPUTE_FLOPS_PRIOR / (2 * params))
        return self.speeds


def _open(key: str, blob: bytes, sha256: str) -> bytes:
    """The payload of an envelope read under `key`, if it is the one whose SHA-256 the manifest names."""
    if check_header(key, blob)[1].hex() != sha256:
        raise ChunkCorrupt(f"chunk {key[:12]}: not the manifest's")
    return open_chunk(key, blob)
