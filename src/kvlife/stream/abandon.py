"""When to give a chunk in flight up, asked by the transport as its bytes arrive (as DASH players abandon a
segment): `Abandonment` for the first pass's chunks, `Cutoff` for refinement's.

Both are callables `give_up(bytes received, seconds since the request)`; True drops the request. What
they judge by (the planner, the speeds, the worker's backlog, the clock, the knobs) is the fetch's state
(`kvlife.stream.fetch.Fetch`), read through the attributes listed on `Abandonment`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from kvlife.store.envelope import HEADER


class Abandonment:
    """Gives up a chunk of the first pass whose level the link no longer supports.

    - The first chunk (`probe`: no chunk measured yet) is chosen on the prior rate. Once `probe_bytes` of
      it have arrived, the rate it would average over the whole chunk (its request latency plus its size
      at the rate its body arrives) replaces the prior: if the planner, at that rate, would choose another
      option (better or worse), the chunk is given up; otherwise its level is committed (held by the
      planner's hysteresis from then on).
    - Any chunk: once it is projected to take more than twice its predicted time (what is left at the rate
      of its last `detect_s` seconds), the whole plan is made again at that rate, twice: keeping this chunk
      (the link busy until the rest of it has come, the next chunks planned after it) and giving it up
      (this chunk planned again with the rest). It is given up if only giving it up meets the deadline; if
      both do, if giving it up lets the remaining chunks be fetched at a better level; if neither does, if
      giving it up is ready sooner by more than `give_up_gain` of the deadline.
    `next_rate`: the rate the client should believe after a give-up (the probe's or the recent rate);
    `recent_rate()`: after the chunk, the rate of its last `recent_s` seconds if the chunk lasted longer.

    `fetch` provides `planner`, `speeds`, `backlog` (`free_at(now)`), `clock()` (seconds since the fetch
    began), `config` (a FetchConfig) and `manifest.size(level, index)`.
    """

    def __init__(self, fetch: Any, index: int, level: str, bandwidth: float | None, fetch_started: float,
                 probe: bool) -> None:
        self.fetch, self.index, self.level, self.probe = fetch, index, level, probe
        self.fetch_started = fetch_started
        self.config = fetch.config
        self.size = fetch.manifest.size(level, index) + HEADER.size  # what arrives: the chunk in its envelope
        self.expected = self.size / max(bandwidth or 1.0, 1.0)
        self.checked = 0.0
        # (seconds, bytes received) of the recent pieces
        self.arrivals: deque[tuple[float, int]] = deque([(0.0, 0)])
        self.next_rate: float | None = None

    def recent_rate(self) -> tuple[int, float] | None:
        """(bytes, seconds) of the chunk's last `recent_s` seconds, if it lasted longer than that (None
        otherwise: its whole transfer is the sample)."""
        since, before = self.arrivals[0]
        seconds, received = self.arrivals[-1]
        if since <= 0.0 or seconds <= since:
            return None
        return received - before, seconds - since

    def __call__(self, received: int, seconds: float) -> bool:
        self.arrivals.append((seconds, received))
        while len(self.arrivals) > 2 and seconds - self.arrivals[1][0] >= self.config.recent_s:
            self.arrivals.popleft()
        if received >= self.size:
            return False
        if self.probe and received >= min(self.config.probe_bytes, self.size // 2):
            return self._probe(received, seconds)
        detect = self.config.detect_s
        if seconds - self.checked < detect / 2:
            return False
        # the rate since the last piece at least `detect` ago; never from the request (the first piece's wait
        # is latency), so nothing is judged before `detect` after the first piece
        start = next(((since, before) for since, before in reversed(self.arrivals)
                      if since > 0.0 and seconds - since >= detect), None)
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

    def _probe(self, received: int, seconds: float) -> bool:
        """The first chunk's own rate replaces the prior: give it up if the planner would choose otherwise at
        that rate, else commit its level."""
        self.probe = False
        latency = max(0.0, time.perf_counter() - self.fetch_started - seconds)
        rate = self.size / (latency + self.size * max(seconds, 1e-6) / received)
        fetch, now = self.fetch, self.fetch.clock()
        decision = fetch.planner.choose(self.index, now, fetch.backlog.free_at(now), rate, fetch.speeds)
        if decision.option != self.level:
            self.next_rate = rate
            return True
        fetch.planner.commit(decision)  # the level holds from here, measured
        return False

    def _give_up(self, received: int, rate: float) -> bool:
        fetch, planner, now = self.fetch, self.fetch.planner, self.fetch.clock()
        tokens = planner.tokens
        free = fetch.backlog.free_at(now)
        leave = planner.choose(self.index, now, free, rate, fetch.speeds)
        if leave.option == self.level:
            return False
        arrives = now + (self.size - received) / rate
        done = max(free, arrives) + fetch.speeds.decode_s(self.level, tokens[self.index] / max(tokens))
        if self.index + 1 < len(tokens):
            stay = planner.choose(self.index + 1, arrives, done, rate, fetch.speeds)
            stay_ready, stay_meets, stay_level = stay.predicted_ready_s, stay.meets, stay.plan_level
        else:
            stay_ready, stay_level = done, self.level
            stay_meets = done <= planner.budget
        if leave.meets != stay_meets:
            return leave.meets
        if leave.meets:
            return planner.rank(leave.plan_level) < planner.rank(stay_level)
        return leave.predicted_ready_s < stay_ready - self.config.give_up_gain * planner.slo


class Cutoff:
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
