"""When a chunk in flight is given up: the first chunk's probe of its own rate, and a drop mid-chunk."""

import pytest

from kvlife.stream.client import PROBE_BYTES, _Abandonment, _Backlog
from kvlife.stream.estimate import SpeedEstimate
from kvlife.stream.planner import Planner

LEVELS = {"high": 500_000, "balanced": 400_000, "extreme": 200_000}
N, TOKENS = 8, 256


class Sizes:
    """What `_Abandonment` reads of a manifest: each chunk's size at each level."""

    def size(self, level, index):
        return LEVELS[level]


def rule(level, bandwidth, slo, probe, fetch_started=0.0, allow_recompute=False):
    planner = Planner({lv: [size] * N for lv, size in LEVELS.items()}, [TOKENS] * N, slo, margin=0.0,
                      allow_recompute=allow_recompute, drop_factor=1.0)
    speeds = SpeedEstimate(fp16_chunk_bytes=3e6, recompute_tokens_s=TOKENS / 1.0, attention_knee=1e18)
    for lv in LEVELS:
        speeds.add_decode(lv, 0.001)
    return _Abandonment(0, level, Sizes(), planner, speeds, _Backlog(), lambda: 0.0, bandwidth, [TOKENS] * N,
                        fetch_started, probe)


def test_the_first_chunk_moves_up_when_its_own_rate_beats_the_prior(monkeypatch):
    # the prior (0.5 MB/s) chose extreme for 8 chunks in 4 s (high would need 8 s); the body arrives at
    # 4 MB/s after a 10 ms request: ~4 MB/s for the whole chunk, at which high fits (1 s)
    monkeypatch.setattr("kvlife.stream.client.time.perf_counter", lambda: 0.010 + PROBE_BYTES / 4e6)
    first = rule("extreme", 0.5e6, 4.0, probe=True)
    assert not first(PROBE_BYTES // 2, PROBE_BYTES / 2 / 4e6)  # too little to judge
    assert first(PROBE_BYTES, PROBE_BYTES / 4e6)
    assert first.probed_rate == pytest.approx(200_000 / (0.010 + 200_000 / 4e6))


def test_the_first_chunk_moves_down_when_its_own_rate_falls_short(monkeypatch):
    # the prior (4 MB/s) chose high; the body arrives at 0.5 MB/s: extreme is what fits
    monkeypatch.setattr("kvlife.stream.client.time.perf_counter", lambda: PROBE_BYTES / 0.5e6)
    first = rule("high", 4e6, 4.0, probe=True)
    assert first(PROBE_BYTES, PROBE_BYTES / 0.5e6)
    assert first.probed_rate == pytest.approx(0.5e6)


def test_the_probe_keeps_a_chunk_its_rate_confirms_and_judges_once(monkeypatch):
    monkeypatch.setattr("kvlife.stream.client.time.perf_counter", lambda: PROBE_BYTES / 4e6)
    first = rule("high", 4e6, 4.0, probe=True)
    assert not first(PROBE_BYTES, PROBE_BYTES / 4e6)
    assert first.probed_rate is None
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
