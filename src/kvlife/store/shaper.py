"""A send-rate cap that follows a bandwidth trace: the server's link, shared by every response it sends.

The shaper is a virtual clock: sending a piece of `n` bytes moves the link's "busy until" time forward
by the time the trace needs for `n` bytes from there on (from now, if the link was idle), and the
writer sleeps until then before handing the piece to the socket, i.e. a piece leaves when a link
following the trace would have finished serializing it. Responses therefore share the link as they
would share a real one, and an object of any size arrives no earlier than size / rate after it was
asked for (so a client measures the trace's rate even on small objects). `burst_s` > 0 lets pieces
leave that much earlier. Time starts at the shaper's creation or at `reset()` (the streaming benchmark
resets it before each run, so every run sees the trace from t = 0). Without a trace nothing is paced.

Pieces are small (`piece_bytes`, 16 KiB by default) so that the rate the client sees is smooth at
the granularity of a chunk; the kernel's socket buffer adds at most its size to what is in flight.

A real link is work-conserving: while it has bytes queued it never idles. The writer's sleeps wake
late (about a millisecond per sleep, against 4 ms per 16 KiB piece at 32 Mbit/s), so within one
object a gap of up to `catch_up_s` after the link's last booking counts as the link still busy (the
writer's lateness, not idle time): the piece is booked from `busy_until` and leaves at once. A longer
gap, or any gap before an object's first piece (the client's request in between), is idle time, so an
object still arrives no earlier than size / rate after it was asked for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from kvlife.store.trace import Trace

UNSHAPED_PIECE_BYTES = 1 << 20


class Shaper:
    def __init__(self, trace: Trace | None, burst_s: float = 0.0, piece_bytes: int = 16 << 10,
                 clock: Callable[[], float] = time.monotonic, catch_up_s: float = 0.02) -> None:
        self.clock = clock
        self.catch_up_s = catch_up_s
        self.piece_bytes = piece_bytes
        self.burst_s = burst_s
        self.reset(trace)

    def reset(self, trace: Trace | None = None, keep_trace: bool = False) -> None:
        """Start the trace again at t = 0 (and switch to `trace` unless `keep_trace`)."""
        if not keep_trace:
            self.trace = trace
        self.origin = self.clock()
        self.busy_until = 0.0  # trace time at which everything handed out so far is through
        self.sent_bytes = 0

    def now(self) -> float:
        return self.clock() - self.origin

    def reserve(self, n_bytes: int, continuing: bool = False) -> float:
        """Book `n_bytes` on the link; returns the seconds to wait before sending them (0 if unshaped).
        `continuing`: the piece follows one of the same object (so a short gap is the writer's lateness)."""
        self.sent_bytes += n_bytes
        if self.trace is None:
            return 0.0
        now = self.now()
        if continuing and 0 <= now - self.busy_until <= self.catch_up_s:
            start = self.busy_until  # the writer woke late; the link was not idle
        else:
            start = max(self.busy_until, now - self.burst_s)
        self.busy_until = self.trace.time_at(start, n_bytes)
        return max(0.0, self.busy_until - now - self.burst_s)

    async def write(self, write: Callable, data: bytes | memoryview, continuing: bool = False) -> None:
        """`await write(piece)` for each piece of `data`, each after its turn on the link. `continuing`:
        `data` follows earlier bytes of the same object (a server that reads a file in parts passes True after
        its first part). Unshaped, the pieces are large: nothing is paced, and small writes only cost time."""
        view = memoryview(data)
        size = self.piece_bytes if self.trace is not None else UNSHAPED_PIECE_BYTES
        for offset in range(0, len(view), size):
            piece = view[offset:offset + size]
            wait = self.reserve(len(piece), continuing=continuing or offset > 0)
            if wait > 0:
                await asyncio.sleep(wait)
            await write(bytes(piece))

    def describe(self) -> dict:
        return {"trace": self.trace.spec if self.trace else None, "t": round(self.now(), 4),
                "sent_bytes": self.sent_bytes}
