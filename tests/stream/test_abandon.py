"""When a chunk in flight is given up: the first chunk's probe of its own rate, and a drop mid-chunk."""

import pytest

from kvlife.store.envelope import HEADER
from kvlife.stream.abandon import Abandonment
from kvlife.stream.config import FetchConfig
from kvlife.stream.estimate import SpeedEstimate
from kvlife.stream.fetch import Fetch
from kvlife.stream.planner import Planner

LEVELS = {"high": 500_000, "balanced": 400_000, "extreme": 200_000}
N, TOKENS = 8, 256


PROBE_BYTES = FetchConfig().probe_bytes


class Sizes:
    """What `Abandonment` reads of a manifest: each chunk's size at each level."""

    def size(self, level, index):
        return LEVELS[level]


def wire(level):
    """What arrives of a chunk: its bytes in their envelope."""
    return LEVELS[level] + HEADER.size


def rule(
    level, bandwidth, slo, probe, fetch_started=0.0, allow_recompute=False, recompute_s=1.0, clock=lambda: 0.0
):
    config = FetchConfig(margin=0.0, drop_factor=1.0, discount=1.0)
    planner = Planner({lv: [size] * N for lv, size in LEVELS.items()}, [TOKENS] * N, slo,
                      allow_recompute=allow_recompute, config=config)
    speeds = SpeedEstimate(fp16_chunk_bytes=3e6, recompute_tokens_s=TOKENS / recompute_s, attention_knee=1e18)
    for lv in LEVELS:
        speeds.add_decode(lv, 0.001)
    fetch = Fetch(Sizes(), planner, speeds, config, clock=clock)
    return Abandonment(fetch, 0, level, bandwidth, fetch_started, probe)


def feed(rule, pieces, clock=None):
    """Feed (bytes, seconds) pieces as the transport would (moving `clock`, the client's clock, along);
    the time of the give-up, or None."""
    received, seconds = 0, 0.0
    for size, duration in pieces:
        received, seconds = received + size, seconds + duration
        if clock is not None:
            clock.now = seconds
        if rule(received, seconds):
            return seconds
    return None


def test_the_first_chunk_moves_up_when_its_own_rate_beats_the_prior(monkeypatch):
    # the prior (0.5 MB/s) chose extreme for 8 chunks in 4 s (high would need 8 s); the body arrives at
    # 4 MB/s after a 10 ms request: ~4 MB/s for the whole chunk, at which high fits (1 s)
    monkeypatch.setattr("kvlife.stream.abandon.time.perf_counter", lambda: 0.010 + PROBE_BYTES / 4e6)
    first = rule("extreme", 0.5e6, 4.0, probe=True)
    assert not first(PROBE_BYTES // 2, PROBE_BYTES / 2 / 4e6)  # too little to judge
    assert first(PROBE_BYTES, PROBE_BYTES / 4e6)
    assert first.next_rate == pytest.approx(wire("extreme") / (0.010 + wire("extreme") / 4e6))


def test_the_first_chunk_moves_down_when_its_own_rate_falls_short(monkeypatch):
    # the prior (4 MB/s) chose high; the body arrives at 0.5 MB/s: extreme is what fits
    monkeypatch.setattr("kvlife.stream.abandon.time.perf_counter", lambda: PROBE_BYTES / 0.5e6)
    first = rule("high", 4e6, 4.0, probe=True)
    assert first(PROBE_BYTES, PROBE_BYTES / 0.5e6)
    assert first.next_rate == pytest.approx(0.5e6)


def test_the_probe_keeps_a_chunk_its_rate_confirms_and_judges_once(monkeypatch):
    monkeypatch.setattr("kvlife.stream.abandon.time.perf_counter", lambda: PROBE_BYTES / 4e6)
    first = rule("high", 4e6, 4.0, probe=True)
    assert first.fetch.planner.current is None  # chosen on the prior: not held yet
    assert not first(PROBE_BYTES, PROBE_BYTES / 4e6)
    assert first.next_rate is None
    assert first.fetch.planner.current == "high"  # confirmed by the chunk's own rate: held from here
    # judged once: later pieces are judged only by the drop rule (which sees nothing wrong at this rate)
    assert not first(2 * PROBE_BYTES, 2 * PROBE_BYTES / 4e6)
    # without the probe (a chunk after the first) the same bytes at a rate that would change the plan do not
    # end the chunk while it is on time
    later = rule("extreme", 0.5e6, 4.0, probe=False)
    assert not later(PROBE_BYTES, PROBE_BYTES / 4e6)


def test_a_drop_mid_chunk_is_seen_at_the_recent_rate_before_the_average_sinks():
    # high (500 KB) predicted at 1 MB/s (0.5 s): 96 KB arrive at that rate, then 16 KB pieces every 0.13 s
    # (the link fell to 1 Mbit/s). Finishing would take ~3 s more, extreme ~1.6 s: give up, and do so
    # once the recent rate shows the drop, not only at twice the prediction (1 s) as the average would
    drop = rule("high", 1e6, 4.0, probe=False)
    received, seconds = 0, 0.0
    while received < 96_000:
        received, seconds = received + 16_000, seconds + 0.016
        assert not drop(received, seconds)
    abandoned_at = None
    for _ in range(8):
        received, seconds = received + 16_000, seconds + 0.13
        if drop(received, seconds):
            abandoned_at = seconds
            break
    assert abandoned_at is not None and abandoned_at < 0.5
    assert received < 200_000


def test_a_chunk_on_time_is_never_given_up():
    steady = rule("high", 4e6, 4.0, probe=False, allow_recompute=True)
    received, seconds = 0, 0.0
    while received < LEVELS["high"]:
        received, seconds = received + 16_000, seconds + 16_000 / 4e6
        assert not steady(received, seconds)


def test_a_slow_chunk_the_plan_would_choose_again_is_kept():
    # extreme at 20 KB/s, far past twice its prediction: re-planned at that rate, extreme is still the choice
    slow = rule("extreme", 4e6, 100.0, probe=False)
    received, seconds = 0, 0.0
    for _ in range(20):
        received, seconds = received + 2_000, seconds + 0.1  # 20 KB/s, projected far past twice 0.05 s
        assert not slow(received, seconds)


class Clock:
    """The client's clock (seconds since the fetch began), moved by `feed`."""

    now = 0.0

    def __call__(self):
        return self.now


def test_a_chunk_caught_by_a_drop_is_given_up_when_the_whole_plan_is_sooner_without_it():
    # high (500 KB) at 4 MB/s; after 256 KB the link falls to 125 KB/s. Finishing takes ~1.9 s of link
    # time, recomputing the chunk 1.8 s of the (idle) worker: by the chunk's own cost, keep it. But the
    # whole plan without it (4 chunks recomputed while the link fetches 4 at extreme) is ready by 8 s,
    # and with it (then 3 recomputed, 4 fetched) only at 8.5 s: give it up.
    clock = Clock()
    drop = rule("high", 4e6, 8.0, probe=False, allow_recompute=True, recompute_s=1.8, clock=clock)
    pieces = [(16_000, 0.004)] * 16 + [(16_000, 0.128)] * 10
    at = feed(drop, pieces, clock)
    assert at is not None and at < 0.5
    assert drop.next_rate == pytest.approx(125_000, rel=0.01)


def test_when_both_plans_meet_the_chunk_is_kept_unless_the_rest_gets_a_better_level():
    # the same drop with a 30 s deadline: both plans meet at extreme-or-better; keeping the chunk
    # leaves the rest at the same level as giving it up would, so it is kept
    clock = Clock()
    drop = rule("high", 4e6, 30.0, probe=False, allow_recompute=True, recompute_s=1.8, clock=clock)
    pieces = [(16_000, 0.004)] * 16 + [(16_000, 0.128)] * 10
    assert feed(drop, pieces, clock) is None


def test_a_chunk_that_slowed_down_reports_its_recent_rate():
    steady = rule("extreme", 4e6, 100.0, probe=False)
    assert feed(steady, [(16_000, 0.004)] * 12 + [(8_000, 0.002)]) is None
    assert steady.recent_rate() is None  # it lasted less than the window: the whole chunk is the sample
    slowed = rule("extreme", 4e6, 100.0, probe=False)
    assert feed(slowed, [(16_000, 0.004)] * 6 + [(16_000, 0.128)] * 6 + [(8_000, 0.064)]) is None
    got, seconds = slowed.recent_rate()
    assert got / seconds == pytest.approx(125_000, rel=0.01)


def test_an_8x_drop_is_judged_by_the_last_pieces_and_believed_after_the_give_up():
    # high (500 KB) predicted at 8 MB/s; after 4 pieces the link falls to 1 MB/s (16 KB every 16 ms).
    # Finishing it and fetching 7 at extreme would be ready at ~1.85 s, giving it up (8 at extreme) at
    # ~1.69 s: by 1.75 s only giving up meets. The judging window (detect_s, 0.05 s) sees the new rate
    # within a few pieces, where a 0.15 s window judged nothing before 0.15 s; the rate believed after it
    # is the last pieces' (1 MB/s), not the window's mix of both rates (which planned the next try too high)
    clock = Clock()
    drop = rule("high", 8e6, 1.75, probe=False, clock=clock)
    at = feed(drop, [(16_000, 0.002)] * 4 + [(16_000, 0.016)] * 20, clock)
    assert at is not None and at < 0.1
    assert drop.next_rate == pytest.approx(1e6, rel=0.01)
