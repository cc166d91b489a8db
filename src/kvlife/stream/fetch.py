"""One streamed fetch: its state and its two threads, chunk by chunk by a deadline.

The fetcher (a background thread) asks the planner for chunk i's option with the throughput measured
so far, fetches chunk i at that level (or, for "recompute", fetches nothing), hands it to the worker and
moves on to chunk i+1 at once; once every chunk is in, it fetches the worst chunks again at a better
level while the planner predicts that done by the deadline (refinement). The worker (the calling
thread) takes chunks in order, decodes them or recomputes them with the model on top of the cache built
so far, and writes refined chunks over the old ones, so decoding and recomputing overlap with fetching.

A chunk that fails in transit (connection lost, error status, cut short, or bytes that fail their
envelope or the manifest's SHA-256) is never used: it is fetched again (the planner choosing again,
with the time lost) up to `max_attempts` times in all, then recomputed; without a model the fetch fails.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvlife.store.envelope import HEADER
from kvlife.stream.abandon import Abandonment, Cutoff
from kvlife.stream.config import FetchConfig
from kvlife.stream.context import RECOMPUTE, StreamError
from kvlife.stream.estimate import SpeedEstimate, ThroughputEstimate
from kvlife.stream.planner import Planner
from kvlife.stream.recompute import CacheBuilder
from kvlife.stream.transport import Abandoned, DeadlinePassed, TransportError


class FetchAborted(StreamError):
    """The fetch ran past `FetchConfig.abort_after_s`."""


@dataclass
class ChunkRecord:
    index: int
    tokens: int
    option: str = ""  # what the chunk finally was: a level or "recompute"
    planned: list[str] = field(default_factory=list)  # every decision for it (more than one after a failure)
    bytes: int = 0  # received, in the chunk's envelope, over every fetch of it
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
    refine_stopped: str = ""  # why refining ended early: a fetch given up, failures in transit ("" if not)
    recompressed: str = ""  # a compressed context recompressed locally instead: why ("" if not)
    setup_s: float = 0.0  # manifest and header
    bytes: int = 0
    chunks: list[ChunkRecord] = field(default_factory=list)

    def options(self) -> list[str]:
        return [c.option for c in self.chunks]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backlog:
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


_DONE = object()  # the fetcher's last item: no more chunks or refinements


@dataclass
class Fetch:
    """Everything one fetch knows while it runs, shared by its fetcher thread, its worker and the abandonment
    rules. `run()` needs `source` (what gets a chunk's checked bytes: `StreamClient.chunk`), `builder` and
    `report`; the rules need only the manifest, planner, speeds, backlog, clock and config."""

    manifest: Any  # Manifest: chunk sizes, keys and CRCs
    planner: Planner
    speeds: SpeedEstimate
    config: FetchConfig = field(default_factory=FetchConfig)
    source: Any = None
    builder: CacheBuilder | None = None
    report: FetchReport | None = None
    link: ThroughputEstimate | None = None
    started: float = field(default_factory=time.perf_counter)
    clock: Callable[[], float] | None = None  # seconds since the fetch began
    backlog: Backlog = field(default_factory=Backlog)
    no_recompute: str = "there is no model to recompute it"  # why a chunk that keeps failing ends the fetch

    def __post_init__(self) -> None:
        if self.clock is None:
            self.clock = lambda: time.perf_counter() - self.started
        if self.link is None:
            self.link = ThroughputEstimate(window=self.config.throughput_window)
        limit = self.config.abort_after_s
        self.abort_at = None if limit is None else self.started + limit
        self.tokens = self.planner.tokens
        self.handoff: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.held: list[str] = []  # each chunk's level (or "recompute") as the fetcher last sent it

    def fraction(self, index: int) -> float:
        """Chunk `index`'s tokens over a full chunk's (what the speed estimates scale by)."""
        return self.tokens[index] / self.planner.full_tokens

    # ---- the caller's thread: the worker ---------------------------------------------------------------

    def run(self) -> tuple[Any, FetchReport]:
        """Fetch, decode and recompute every chunk, refine, and return the cache and the report."""
        thread = threading.Thread(target=self.fetcher, name="kvlife-stream-fetch", daemon=True)
        thread.start()
        n = len(self.tokens)
        try:
            for index in range(n):
                self.work(index, *self.next_item(f"{index} of {n} chunks ready"))
            self.report.complete_s = self.clock()
            while (item := self.next_item(f"all {n} chunks ready, refining")) is not _DONE:
                self.work_refinement(*item)
            cache = self.builder.finish()
        finally:
            self.stop.set()
            thread.join(timeout=60)
        report = self.report
        report.ready_s = self.clock()
        report.met = report.ready_s <= self.planner.slo
        report.bytes += sum(c.bytes for c in report.chunks)
        return cache, report

    def next_item(self, what: str) -> Any:
        while True:
            if self.abort_at is not None and time.perf_counter() > self.abort_at:
                raise FetchAborted(f"gave up after {self.config.abort_after_s:g} s with {what}")
            try:
                item = self.handoff.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def work(self, index: int, option: str, data: bytes | None) -> None:
        """Decode chunk `index` into the cache (or recompute it: if asked to, or if it fails to decode)."""
        record = self.report.chunks[index]
        self.backlog.begin()
        started = time.perf_counter()
        if option != RECOMPUTE:
            try:
                self.builder.add_encoded(index, data, self.manifest.chunks[option][index].crc32)
                self.speeds.add_decode(option, time.perf_counter() - started, self.fraction(index))
            except StreamError as exc:  # passed its SHA-256 but does not decode: never used
                record.failures.append(f"decode: {exc}")
                if not self.planner.allow_recompute:
                    raise
                option = RECOMPUTE
        if option == RECOMPUTE:
            prefix = self.builder.tokens
            self.builder.recompute(self.manifest.chunk_ids(index))
            seconds = time.perf_counter() - started
            self.speeds.add_recompute(self.tokens[index], prefix, seconds, self.fraction(index))
        record.option = option
        record.work_s = time.perf_counter() - started
        self.backlog.end()
        record.ready_at_s = self.clock()

    def work_refinement(self, index: int, level: str, data: bytes) -> None:
        """Write chunk `index`, fetched again at `level`, over the cache's version (kept if it fails)."""
        record = self.report.chunks[index]
        self.backlog.begin()
        started = time.perf_counter()
        if record.option != RECOMPUTE:  # a chunk whose fetched bytes failed to decode was recomputed: exact
            try:
                self.builder.replace_encoded(index, data, self.manifest.chunks[level][index].crc32)
                self.speeds.add_decode(level, time.perf_counter() - started, self.fraction(index))
                record.option = level
                record.refined.append(level)
            except StreamError as exc:  # the chunk keeps the version it had
                record.failures.append(f"refine decode: {exc}")
        self.backlog.end()

    # ---- the fetcher thread ------------------------------------------------------------------------------

    def fetcher(self) -> None:
        n = len(self.tokens)
        try:
            for index in range(n):
                if self.stop.is_set():
                    return
                if self.abort_at is not None and time.perf_counter() > self.abort_at:
                    limit = self.config.abort_after_s
                    raise FetchAborted(f"gave up after {limit:g} s at chunk {index} of {n}")
                option, data = self.next_chunk(index)
                self.held.append(option)
                self.handoff.put((option, data))
            if self.config.refine:
                self.report.refine_stopped = self.refine()
            self.handoff.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the worker, which raises it
            self.handoff.put(exc)

    def next_chunk(self, index: int) -> tuple[str, bytes | None]:
        """Decide chunk `index` and fetch it (again after a failure); returns (option, bytes or None)."""
        record, link, attempts = self.report.chunks[index], self.link, 0
        while True:
            bandwidth = link.predict()
            decision = self.planner.choose(index, self.clock(), self.backlog.free_at(self.clock()), bandwidth,
                                           self.speeds)
            if attempts >= self.config.max_attempts and self.planner.allow_recompute:
                decision.option = RECOMPUTE
            # a level chosen on the prior rate alone holds nothing back
            self.planner.commit(decision, measured=bool(link.samples))
            record.planned.append(decision.option)
            record.predicted_bandwidth, record.predicted_ready_s = bandwidth, decision.predicted_ready_s
            if decision.option == RECOMPUTE:
                self.backlog.add(self.speeds.recompute_s(self.tokens[index], sum(self.tokens[:index])))
                return RECOMPUTE, None
            level = decision.option
            fetch_started = time.perf_counter()
            attempts += 1
            give_up = None if len(record.abandoned) >= self.config.max_abandons else \
                Abandonment(self, index, level, bandwidth, fetch_started, probe=not link.samples)
            try:
                data = self.source.chunk(self.manifest, level, index, self.abort_at, give_up)
            except DeadlinePassed:
                raise FetchAborted(f"gave up at chunk {index}: the abort time passed") from None
            except Abandoned as exc:  # the link is not what the choice assumed: what arrived is a sample
                attempts -= 1
                next_rate = give_up.next_rate if give_up is not None else None
                link.add(exc.received, exc.seconds if next_rate is None else exc.received / next_rate)
                record.abandoned.append(f"{level} after {exc.received} bytes, {exc.seconds:.3f} s")
                record.bytes += exc.received
                record.fetch_s += exc.seconds
                continue
            except TransportError as exc:
                record.failures.append(str(exc))
                if attempts >= self.config.max_attempts and not self.planner.allow_recompute:
                    context_id = self.manifest.context_id
                    raise StreamError(f"chunk {index} of {context_id!r} failed {attempts} times and "
                                      f"{self.no_recompute}: {exc}") from None
                continue
            elapsed = time.perf_counter() - fetch_started
            received = len(data) + HEADER.size
            recent = give_up.recent_rate() if give_up is not None else None
            if recent is not None and recent[0] / recent[1] < received / elapsed:
                link.add(*recent)  # the link slowed down during the chunk: its last part is the sample
            else:
                link.add(received, elapsed)
            record.bytes += received
            record.fetch_s += elapsed
            record.throughput = received / max(elapsed, 1e-9)
            self.backlog.add(self.speeds.decode_s(level, self.fraction(index)))
            return level, data

    def refine(self) -> str:
        """Fetch the worst chunks again at a better level while the planner predicts it done by the deadline
        (`Planner.refine`), handing each to the worker; a fetch that would end after the deadline less the
        margin is given up at once (the chunk keeps what it has), and so is refining. Returns why refining
        stopped early ("" when the planner saw nothing more that fits)."""
        failures: list[str] = []
        records = self.report.chunks
        while not self.stop.is_set():
            now = self.clock()
            free = self.backlog.free_at(now)
            plan = self.planner.refine(self.held, now, free, self.link.predict(), self.speeds)
            if plan is None:
                return ""
            index, level = plan.chunks[0], plan.level
            decode_s = self.speeds.decode_s(level, self.fraction(index))
            end_at = self.started + self.planner.budget - decode_s
            cutoff = Cutoff(self.manifest.size(level, index) + HEADER.size, end_at)
            fetch_started = time.perf_counter()
            try:
                data = self.source.chunk(self.manifest, level, index, self.abort_at, cutoff)
            except Abandoned as exc:  # it would end late: the time left is not enough for it
                self.link.add(exc.received, exc.seconds)
                records[index].bytes += exc.received
                records[index].fetch_s += exc.seconds
                return (f"{level}/{index} given up after {exc.received} bytes, {exc.seconds:.3f} s: "
                        "it would end late")
            except TransportError as exc:  # lost or corrupt (or the abort time passed): never used
                failures.append(str(exc))
                if len(failures) >= self.config.max_attempts or isinstance(exc, DeadlinePassed):
                    return f"{len(failures)} refinement fetches failed in transit; the last: {exc}"
                continue
            elapsed = time.perf_counter() - fetch_started
            self.link.add(len(data) + HEADER.size, elapsed)
            records[index].bytes += len(data) + HEADER.size  # both versions' bytes count
            records[index].fetch_s += elapsed
            self.backlog.add(decode_s)
            self.held[index] = level
            self.handoff.put((index, level, data))
        return ""
