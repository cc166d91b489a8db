"""The streaming client: fetch a context's KV chunk by chunk by a deadline, adapting the level per chunk.

    client = StreamClient("http://127.0.0.1:8766")
    cache, report = client.fetch("doc-1", slo=2.0, model=model)   # KVCache of the whole context
    report.met, report.ready_s, [c.option for c in report.chunks]

Two threads. The fetcher (a background thread) asks the planner for chunk i's option with the
throughput measured so far, then fetches chunk i at that level (or, for "recompute", fetches nothing)
and hands it to the worker; it moves on to chunk i+1 at once. The worker (the calling thread) takes
chunks in order, checks and decodes them, or recomputes a chunk with the model from its token ids on
top of the cache built so far, so decoding and recomputing overlap with fetching.

A chunk that fails in transit (connection lost, error status, cut short, or bytes whose SHA-256 is
not the manifest's) is never used: it is fetched again (the planner choosing again, with the time
lost) up to `max_attempts` times in all, then recomputed; without a model, the fetch fails.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from kvlife.stream.context import (
    RECOMPUTE,
    Manifest,
    StreamContext,
    StreamError,
    bundle_parts,
    check_context_id,
)
from kvlife.stream.estimate import THROUGHPUT_WINDOW, SpeedEstimate, ThroughputEstimate
from kvlife.stream.planner import ADAPTIVE, DISCOUNT, REFINE_DISCOUNT, STEP_UP_MARGIN, Planner
from kvlife.stream.recompute import CacheBuilder
from kvlife.stream.transport import Abandoned, DeadlinePassed, HttpTransport, TransportError

RECOMPUTE_FLOPS_PRIOR = 1.5e11  # float32 prefill FLOP/s of this project's CPU core; replaced once measured


class FetchAborted(StreamError):
    """The fetch ran past `abort_after_s`."""


@dataclass
class ChunkRecord:
    index: int
    tokens: int
    option: str = ""  # what the chunk finally was: a level or "recompute"
    planned: list[str] = field(default_factory=list)  # every decision for it (more than one after a failure)
    bytes: int = 0
    fetch_s: float = 0.0
    work_s: float = 0.0  # decoding or recomputing
    throughput: float | None = None  # bytes/s this chunk's fetch achieved
    predicted_bandwidth: float | None = None
    predicted_ready_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)  # fetches given up because the link slowed down
    ready_at_s: float = 0.0  # when it joined the cache (seconds since the fetch began)
    refined: list[str] = field(default_factory=list)  # the better levels it was fetched at again, in order


@dataclass
class FetchReport:
    context_id: str
    policy: str
    slo: float
    tokens: int
    ready_s: float = 0.0  # when the cache was handed over (after any refinement)
    met: bool = False
    complete_s: float = 0.0  # when every chunk was first in the cache (before refinement)
    refine_stopped: str = ""  # why refining ended early: a fetch given up, or failures in transit ("" otherwise)
    setup_s: float = 0.0  # manifest and header
    bytes: int = 0
    chunks: list[ChunkRecord] = field(default_factory=list)

    def options(self) -> list[str]:
        return [c.option for c in self.chunks]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StreamClient:
    def __init__(self, url: str | Any, token: str | None = None, timeout_s: float = 30.0) -> None:
        from kvlife.codec import warm_up

        self.transport = HttpTransport(url, token, timeout_s) if isinstance(url, str) else url
        warm_up()  # the codec's kernels load now (once per process, ~0.3 s), not inside a fetch's deadline
        self.speeds: SpeedEstimate | None = None  # kept across fetches: this machine's speeds
        self.last_manifest: Manifest | None = None

    # ---- small requests ----------------------------------------------------------------------

    def manifest(self, context_id: str) -> Manifest:
        return self._manifest(context_id)[0]

    def _manifest(self, context_id: str) -> tuple[Manifest, int]:
        try:
            data = self.transport.get(f"/v1/contexts/{check_context_id(context_id)}/manifest")
        except TransportError as exc:
            if exc.status == 404:
                raise StreamError(f"the server has no context {context_id!r} (store it with `kvlife stream put`)") from None
            raise
        try:
            return Manifest.from_json(json.loads(data)), len(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StreamError(f"the manifest of {context_id!r} is not JSON: {exc}") from None

    def put(self, context: StreamContext) -> dict:
        return self.transport.put(f"/v1/contexts/{context.manifest.context_id}", bundle_parts(context))

    def set_trace(self, spec: str | None) -> dict:
        """Restart the server's link trace at t = 0 (None: unshaped)."""
        return self.transport.request_json("POST", "/v1/link", {"trace": spec})

    # ---- the fetch -----------------------------------------------------------------------------

    def fetch(self, context_id: str, slo: float, model: Any = None, policy: str = ADAPTIVE, margin: float = 0.05,
              max_attempts: int = 2, levels: list[str] | None = None,
              abort_after_s: float | None = None, drop_factor: float = 2.0,
              discount: float | str | None = DISCOUNT, step_up_margin: float = STEP_UP_MARGIN,
              refine: bool = True, refine_discount: float | str | None = REFINE_DISCOUNT,
              throughput_window: int = THROUGHPUT_WINDOW, first_lift: bool = False) -> tuple[Any, FetchReport]:
        """The context's KVCache, ready as close to `slo` seconds as the link allows, and what happened.

        `model`: needed to recompute chunks (and checked against the context's model fingerprint);
        without it every chunk is fetched. `policy`: "adaptive", "recompute" or a level name (fixed).
        `levels`: restrict the levels the adaptive policy may use. `abort_after_s`: give up (raise
        `FetchAborted`) once the fetch has taken that long (benchmarks bound hopeless fixed policies).
        `drop_factor`: the bandwidth drop a fetched chunk must survive (`Planner.insured`; 1: off).
        `discount`: the adaptive plans assume the predicted throughput divided by this (1: as predicted; "wide",
        the default: each level's size step where it is 2x or more; None: every level's step; `Planner`).
        `step_up_margin`: the further fraction of `slo` a move to a better level needs (`Planner`).
        `refine`: once every chunk is in the cache, spend the time left before the deadline fetching the
        worst chunks again at a better level (`Planner.refine`; adaptive policy only); `refine_discount`: its
        throughput discount (default 1: none, since a refinement that would end late is given up; None: as
        `discount`). `throughput_window`: the predicted throughput is the harmonic mean of this many last
        samples, or the last if lower (`ThroughputEstimate`). `first_lift`: an experiment, off by default:
        the first chunk one level above its plan's where the plan still meets (`Planner`)."""
        from kvlife.codec.format import parse_header

        started = time.perf_counter()
        manifest, manifest_bytes = self._manifest(context_id)
        self.last_manifest = manifest
        header_blob = self.transport.get(f"/v1/contexts/{context_id}/header")
        setup_s = time.perf_counter() - started
        if hashlib.sha256(header_blob).hexdigest() != manifest.header_sha256:
            raise StreamError(f"the header of {context_id!r} does not match its manifest")
        header = parse_header(header_blob, header_only=True)
        if model is not None:
            from kvlife.store.keys import model_fingerprint

            if model_fingerprint(model) != manifest.model_fingerprint:
                raise StreamError(f"context {context_id!r} was encoded from another model ({manifest.model or 'unnamed'}); "
                                  "fetch it with that model")
        if policy == RECOMPUTE and model is None:
            raise StreamError("policy 'recompute' needs the model")
        usable = [lv for lv in manifest.levels if levels is None or lv in levels]
        n = manifest.n_chunks
        tokens = [len(manifest.chunk_ids(i)) for i in range(n)]
        planner = Planner({lv: [manifest.size(lv, i) for i in range(n)] for lv in usable}, tokens, slo, policy,
                          margin, allow_recompute=model is not None, drop_factor=drop_factor,
                          discount=discount, step_up_margin=step_up_margin, refine_discount=refine_discount,
                          first_lift=first_lift)
        speeds = self._speeds(header, model)
        # the manifest and header are small: their rate says little about a chunk's (the round trips dominate),
        # so it is only the prior for the first chunk, whose own transfer then corrects it (`_Abandonment`)
        link = ThroughputEstimate(prior_bytes_s=(manifest_bytes + len(header_blob)) / max(setup_s, 1e-6),
                                  window=throughput_window)
        report = FetchReport(context_id, policy, slo, len(manifest.token_ids), setup_s=setup_s)
        report.chunks = [ChunkRecord(i, tokens[i]) for i in range(n)]
        builder = CacheBuilder(header, model)
        handoff: queue.Queue = queue.Queue()
        backlog = _Backlog()
        stop = threading.Event()

        def clock() -> float:
            return time.perf_counter() - started

        def fetcher() -> None:
            abort_at = None if abort_after_s is None else started + abort_after_s
            try:
                held = []
                for i in range(n):
                    if stop.is_set():
                        return
                    if abort_after_s is not None and clock() > abort_after_s:
                        raise FetchAborted(f"gave up after {abort_after_s:g} s at chunk {i} of {n}")
                    item = self._next_chunk(i, manifest, planner, speeds, link, backlog, clock, report.chunks[i],
                                            max_attempts, model is not None, tokens, abort_at)
                    held.append(item[0])
                    handoff.put(item)
                if refine:
                    report.refine_stopped = self._refine(held, manifest, planner, speeds, link, backlog, clock, started,
                                                         handoff, stop, max_attempts, tokens, abort_at, report.chunks)
                handoff.put(_DONE)
            except BaseException as exc:  # noqa: BLE001 - handed to the worker, which raises it
                handoff.put(exc)

        def next_item(what: str) -> Any:
            while True:
                if abort_after_s is not None and clock() > abort_after_s:
                    raise FetchAborted(f"gave up after {abort_after_s:g} s with {what}")
                try:
                    item = handoff.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(item, BaseException):
                    raise item
                return item

        thread = threading.Thread(target=fetcher, name="kvlife-stream-fetch", daemon=True)
        thread.start()
        try:
            for i in range(n):
                item = next_item(f"{i} of {n} chunks ready")
                record = report.chunks[i]
                backlog.begin()
                work_started = time.perf_counter()
                option, data = item
                if option != RECOMPUTE:
                    try:
                        builder.add_encoded(i, data, manifest.chunks[option][i].crc32)
                        speeds.add_decode(option, time.perf_counter() - work_started, tokens[i] / max(tokens))
                    except StreamError as exc:  # passed its SHA-256 but does not decode: never used
                        record.failures.append(f"decode: {exc}")
                        if model is None:
                            raise
                        option = RECOMPUTE
                if option == RECOMPUTE:
                    prefix = builder.tokens
                    builder.recompute(manifest.chunk_ids(i))
                    speeds.add_recompute(tokens[i], prefix, time.perf_counter() - work_started, tokens[i] / max(tokens))
                record.option = option
                record.work_s = time.perf_counter() - work_started
                backlog.end()
                record.ready_at_s = clock()
            report.complete_s = clock()
            while (item := next_item(f"all {n} chunks ready, refining")) is not _DONE:
                i, level, data = item
                record = report.chunks[i]
                backlog.begin()
                work_started = time.perf_counter()
                if record.option != RECOMPUTE:  # a chunk whose fetched bytes failed to decode was recomputed: exact
                    try:
                        builder.replace_encoded(i, data, manifest.chunks[level][i].crc32)
                        speeds.add_decode(level, time.perf_counter() - work_started, tokens[i] / max(tokens))
                        record.option = level
                        record.refined.append(level)
                    except StreamError as exc:  # the chunk keeps the version it had
                        record.failures.append(f"refine decode: {exc}")
                backlog.end()
            cache = builder.finish()
        finally:
            stop.set()
            thread.join(timeout=60)
        report.ready_s = clock()
        report.met = report.ready_s <= slo
        report.bytes = manifest_bytes + len(header_blob) + sum(c.bytes for c in report.chunks)
        return cache, report

    def _speeds(self, header: Any, model: Any) -> SpeedEstimate:
        fp16_chunk = sum(2 * s.heads * s.head_dim * 2 for s in header.layers) * header.chunk_tokens
        if self.speeds is None or self.speeds.fp16_chunk_bytes != fp16_chunk:
            params = sum(p.numel() for p in model.parameters()) if model is not None else 5e8
            self.speeds = SpeedEstimate(fp16_chunk, recompute_tokens_s=RECOMPUTE_FLOPS_PRIOR / (2 * params))
        return self.speeds

    def _get_chunk(self, manifest: Manifest, level: str, i: int, deadline: float | None, give_up: Any) -> bytes:
        """Chunk i at `level`, its bytes checked against the manifest's SHA-256: bytes that fail it raise
        `TransportError` (as a chunk lost in transit does), so they are never used."""
        data = self.transport.get(f"/v1/contexts/{manifest.context_id}/chunks/{level}/{i}", deadline=deadline,
                                  give_up=give_up)
        if hashlib.sha256(data).hexdigest() != manifest.chunks[level][i].sha256:
            raise TransportError(f"chunk {level}/{i}: {len(data)} bytes that fail the manifest's SHA-256")
        return data

    def _refine(self, held: list[str], manifest: Manifest, planner: Planner, speeds: SpeedEstimate,
                link: ThroughputEstimate, backlog: _Backlog, clock, started: float, handoff: queue.Queue,
                stop: threading.Event, max_attempts: int, tokens: list[int], abort_at: float | None,
                records: list[ChunkRecord]) -> str:
        """Fetch the worst chunks again at a better level while the planner predicts it done by the deadline
        (`Planner.refine`), handing each to the worker; a fetch that would end after the deadline less the
        margin is given up at once (the chunk keeps what it has), and so is refining. Returns why refining
        stopped early ("" when the planner saw nothing more that fits)."""
        failures: list[str] = []
        while not stop.is_set():
            now = clock()
            plan = planner.refine(held, now, backlog.free_at(now), link.predict(), speeds)
            if plan is None:
                return ""
            i, level = plan.chunks[0], plan.level
            decode_s = speeds.decode_s(level, tokens[i] / max(tokens))
            cutoff = _Cutoff(manifest.size(level, i), started + planner.budget - decode_s)
            fetch_started = time.perf_counter()
            try:
                data = self._get_chunk(manifest, level, i, abort_at, cutoff)
            except Abandoned as exc:  # it would end late: the time left is not enough for it
                link.add(exc.received, exc.seconds)
                records[i].bytes += exc.received
                records[i].fetch_s += exc.seconds
                return f"{level}/{i} given up after {exc.received} bytes, {exc.seconds:.3f} s: it would end late"
            except TransportError as exc:  # lost or corrupt (or the abort time passed): never used
                failures.append(str(exc))
                if len(failures) >= max_attempts or isinstance(exc, DeadlinePassed):
                    return f"{len(failures)} refinement fetches failed in transit; the last: {exc}"
                continue
            elapsed = time.perf_counter() - fetch_started
            link.add(len(data), elapsed)
            records[i].bytes += len(data)  # the chunk's bytes and fetch time count both of its versions
            records[i].fetch_s += elapsed
            backlog.add(decode_s)
            held[i] = level
            handoff.put((i, level, data))
        return ""

    def _next_chunk(self, i: int, manifest: Manifest, planner: Planner, speeds: SpeedEstimate,
                    link: ThroughputEstimate, backlog: _Backlog, clock, record: ChunkRecord, max_attempts: int,
                    can_recompute: bool, tokens: list[int], abort_at: float | None) -> tuple[str, bytes | None]:
        """Decide chunk i and fetch it (again after a failure); returns (option, bytes or None)."""
        attempts = 0
        while True:
            bandwidth = link.predict()
            decision = planner.choose(i, clock(), backlog.free_at(clock()), bandwidth, speeds)
            if attempts >= max_attempts and can_recompute:
                decision.option = RECOMPUTE
            planner.commit(decision, measured=bool(link.samples))  # a level chosen on the prior holds nothing back
            record.planned.append(decision.option)
            record.predicted_bandwidth, record.predicted_ready_s = bandwidth, decision.predicted_ready_s
            if decision.option == RECOMPUTE:
                backlog.add(speeds.recompute_s(tokens[i], sum(tokens[:i])))
                return RECOMPUTE, None
            level = decision.option
            fetch_started = time.perf_counter()
            attempts += 1
            try:
                give_up = None if len(record.abandoned) >= 3 else \
                    _Abandonment(i, level, manifest, planner, speeds, backlog, clock, bandwidth, tokens,
                                 fetch_started, probe=not link.samples)
                data = self._get_chunk(manifest, level, i, abort_at, give_up)
            except DeadlinePassed:
                raise FetchAborted(f"gave up at chunk {i}: the abort time passed") from None
            except Abandoned as exc:  # the link is not what the choice assumed: what arrived is a throughput sample
                attempts -= 1
                if give_up is not None and give_up.next_rate is not None:
                    link.add(exc.received, exc.received / give_up.next_rate)
                else:
                    link.add(exc.received, exc.seconds)
                record.abandoned.append(f"{level} after {exc.received} bytes, {exc.seconds:.3f} s")
                record.bytes += exc.received
                record.fetch_s += exc.seconds
                continue
            except TransportError as exc:
                record.failures.append(str(exc))
                if attempts >= max_attempts and not can_recompute:
                    raise StreamError(f"chunk {i} of {manifest.context_id!r} failed {attempts} times and there is "
                                      f"no model to recompute it: {exc}") from None
                continue
            elapsed = time.perf_counter() - fetch_started
            recent = give_up.recent_rate() if give_up is not None else None
            if recent is not None and recent[0] / recent[1] < len(data) / elapsed:
                link.add(*recent)  # the link slowed down during the chunk: its last part is the sample
            else:
                link.add(len(data), elapsed)
            record.bytes += len(data)
            record.fetch_s += elapsed
            record.throughput = len(data) / max(elapsed, 1e-9)
            backlog.add(speeds.decode_s(level, tokens[i] / max(tokens)))
            return level, data


_DONE = object()  # the fetcher's last item: no more chunks or refinements


PROBE_BYTES = 64 << 10  # how much of the first chunk arrives before its own rate is trusted over the prior
RECENT_S = 0.15  # the window of a chunk's recent rate, its sample (long enough to span a few pieces at 1 Mbit/s)
DETECT_S = 0.05  # the window of the rate a chunk in flight is judged by: a drop shows two pieces after it at 8 Mbit/s
GIVE_UP_GAIN = 0.02  # of the deadline: what giving up a late chunk must gain when no plan meets the deadline


class _Abandonment:
    """When to give up a chunk in flight (as DASH players abandon a segment), asked as its bytes arrive.

    - The first chunk (`probe`: no chunk measured yet) is chosen on the prior rate. Once `PROBE_BYTES` of
      it have arrived, the rate it would average over the whole chunk (its request latency plus its size
      at the rate its body arrives) replaces the prior: if the planner, at that rate, would choose another
      option (better or worse), the chunk is given up; otherwise its level is committed (held by the
      planner's hysteresis from then on; a level chosen on the prior alone is not).
    - Any chunk: once it is projected to take more than twice its predicted time (what is left at the rate
      of its last `DETECT_S` seconds: a drop shows at once, not only after the average has sunk), the whole
      plan is made again at that rate, twice: keeping this chunk (the link busy until the rest of it has
      come, the next chunks planned after it) and giving it up (this chunk planned again with the rest).
      The chunk is given up if only giving it up meets the deadline; if both do, if giving it up lets the
      remaining chunks be fetched at a better level; if neither does, if giving it up is ready sooner by
      more than `GIVE_UP_GAIN` of the deadline. (Comparing this chunk's own costs instead misses that a
      recomputed chunk uses the worker, idle while the link is slow: finishing a chunk caught by a drop
      can cost less link time than a cheaper level and still be the later plan.)
    `next_rate`: the rate the client should believe after a give-up (the probe's or the recent rate);
    `recent_rate()`: after the chunk, the rate of its last `RECENT_S` seconds if the chunk lasted longer.
    """

    def __init__(self, i: int, level: str, manifest: Manifest, planner: Planner, speeds: SpeedEstimate,
                 backlog: _Backlog, clock, bandwidth: float | None, tokens: list[int], fetch_started: float,
                 probe: bool) -> None:
        self.i, self.level, self.manifest, self.planner, self.speeds = i, level, manifest, planner, speeds
        self.backlog, self.clock, self.tokens, self.fetch_started = backlog, clock, tokens, fetch_started
        self.size = manifest.size(level, i)
        self.expected = self.size / max(bandwidth or 1.0, 1.0)
        self.checked = 0.0
        self.arrivals: deque[tuple[float, int]] = deque([(0.0, 0)])  # (seconds, bytes received) of recent pieces
        self.probe = probe
        self.next_rate: float | None = None

    def recent_rate(self) -> tuple[int, float] | None:
        """(bytes, seconds) of the chunk's last `RECENT_S` seconds, if it lasted longer than that (None otherwise:
        its whole transfer is the sample)."""
        since, before = self.arrivals[0]
        seconds, received = self.arrivals[-1]
        if since <= 0.0 or seconds <= since:
            return None
        return received - before, seconds - since

    def __call__(self, received: int, seconds: float) -> bool:
        self.arrivals.append((seconds, received))
        while len(self.arrivals) > 2 and seconds - self.arrivals[1][0] >= RECENT_S:
            self.arrivals.popleft()
        if received >= self.size:
            return False
        if self.probe and received >= min(PROBE_BYTES, self.size // 2):
            self.probe = False
            latency = max(0.0, time.perf_counter() - self.fetch_started - seconds)
            rate = self.size / (latency + self.size * max(seconds, 1e-6) / received)
            now = self.clock()
            decision = self.planner.choose(self.i, now, self.backlog.free_at(now), rate, self.speeds)
            if decision.option != self.level:
                self.next_rate = rate
                return True
            self.planner.commit(decision)  # the level holds from here, measured
            return False
        if seconds - self.checked < DETECT_S / 2:
            return False
        # the rate since the last piece at least DETECT_S ago; never from the request (the first piece's wait is
        # latency), so nothing is judged before DETECT_S after the first piece
        start = next(((since, before) for since, before in reversed(self.arrivals)
                      if since > 0.0 and seconds - since >= DETECT_S), None)
        if start is None:
            return False
        since, before = start
        rate = max((received - before) / max(seconds - since, 1e-6), 1.0)
        if seconds + (self.size - received) / rate < max(2 * self.expected, 0.05):
            return False
        self.checked = seconds
        if self._give_up(received, rate):
            # the window may still hold pieces from before a drop: believe its last two intervals if slower
            (t0, b0), (t1, b1) = self.arrivals[-min(3, len(self.arrivals))], self.arrivals[-1]
            last = (b1 - b0) / (t1 - t0) if t1 > t0 > 0.0 else rate
            self.next_rate = max(min(rate, last), 1.0)
            return True
        return False

    def _give_up(self, received: int, rate: float) -> bool:
        planner, now = self.planner, self.clock()
        free = self.backlog.free_at(now)
        leave = planner.choose(self.i, now, free, rate, self.speeds)
        if leave.option == self.level:
            return False
        arrives = now + (self.size - received) / rate
        done = max(free, arrives) + self.speeds.decode_s(self.level, self.tokens[self.i] / max(self.tokens))
        if self.i + 1 < len(self.tokens):
            stay = planner.choose(self.i + 1, arrives, done, rate, self.speeds)
            stay_ready, stay_meets, stay_level = stay.predicted_ready_s, stay.meets, stay.plan_level
        else:
            stay_ready, stay_level = done, self.level
            stay_meets = done <= planner.budget
        if leave.meets != stay_meets:
            return leave.meets
        if leave.meets:
            return planner.rank(leave.plan_level) < planner.rank(stay_level)
        return leave.predicted_ready_s < stay_ready - GIVE_UP_GAIN * planner.slo


class _Cutoff:
    """Gives a refinement fetch up once it is projected to end after `end_at` (a `time.perf_counter()` value):
    what is left at the rate measured from its first piece (the first piece's wait is latency)."""

    def __init__(self, size: int, end_at: float) -> None:
        self.size, self.end_at = size, end_at
        self.first: tuple[float, int] | None = None

    def __call__(self, received: int, seconds: float) -> bool:
        now = time.perf_counter()
        if now > self.end_at:
            return True
        if received >= self.size:
            return False
        if self.first is None:
            self.first = (seconds, received)
            return False
        since, before = self.first
        if seconds <= since:
            return False
        rate = (received - before) / (seconds - since)
        return now + (self.size - received) / max(rate, 1.0) > self.end_at


class _Backlog:
    """The worker's queue as the planner sees it: predicted seconds of work queued and in progress."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queued: list[float] = []
        self.current: tuple[float, float] | None = None  # (start, predicted seconds)

    def add(self, seconds: float) -> None:
        with self.lock:
            self.queued.append(seconds)

    def begin(self) -> None:
        with self.lock:
            predicted = self.queued.pop(0) if self.queued else 0.0
            self.current = (time.perf_counter(), predicted)

    def end(self) -> None:
        with self.lock:
            self.current = None

    def free_at(self, now: float) -> float:
        """When the worker is predicted to be idle, in the caller's clock (`now` = that clock's now)."""
        with self.lock:
            remaining = 0.0
            if self.current is not None:
                start, predicted = self.current
                remaining = max(0.0, predicted - (time.perf_counter() - start))
            return now + remaining + sum(self.queued)
