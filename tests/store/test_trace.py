"""Bandwidth traces and the shaper's bookkeeping (a fake clock: no sleeping)."""

import asyncio

import pytest

from kvlife.store.shaper import Shaper
from kvlife.store.trace import TraceError, parse_rate, parse_trace


def test_rates_are_tc_style_bits():
    assert parse_rate("8mbit") == 1e6
    assert parse_rate("800kbit") == 1e5
    assert parse_rate("1gbit") == 125e6
    assert parse_rate("8000") == 1000
    for bad in ["fast", "-1mbit", "0", "nanmbit"]:
        with pytest.raises(TraceError):
            parse_rate(bad)


def test_step_trace_integrates_and_inverts():
    trace = parse_trace("step:80mbit,8mbit,2")
    assert trace.rate(1.9) == 10e6 and trace.rate(2.0) == 1e6
    assert trace.bytes_until(3.0) == pytest.approx(21e6)
    assert trace.time_at(0.0, 21e6) == pytest.approx(3.0)
    assert trace.time_at(1.5, 6e6) == pytest.approx(3.0)  # 5 MB before the drop, 1 MB after
    assert trace.mean_rate(1.0, 3.0) == pytest.approx(5.5e6)


def test_walk_is_seeded_and_bounded():
    a, b = parse_trace("walk:16mbit,seed=3"), parse_trace("walk:16mbit,seed=3")
    c = parse_trace("walk:16mbit,seed=4")
    assert a.rates == b.rates and a.rates != c.rates
    assert min(a.rates) >= 2e6 / 10 - 1e-6 and max(a.rates) <= 2e6 * 4 + 1e-6
    assert len(set(a.rates[:40])) > 10


def test_file_trace(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# seconds rate\n0 8mbit\n1.5 800kbit\n")
    trace = parse_trace(f"file:{path}")
    assert trace.rate(1.0) == 1e6 and trace.rate(2.0) == 1e5
    path.write_text("0 8mbit 3\n")
    with pytest.raises(TraceError, match="SECONDS RATE"):
        parse_trace(f"file:{path}")


@pytest.mark.parametrize("spec", ["constant", "constant:", "step:8mbit,1mbit", "step:8mbit,1mbit,-1",
                                  "walk:", "walk:8mbit,speed=2", "burst:8mbit", "file:/nonexistent/trace"])
def test_bad_traces_are_refused(spec):
    with pytest.raises(TraceError):
        parse_trace(spec)


def test_shaper_paces_pieces_by_the_trace():
    now = [0.0]
    shaper = Shaper(parse_trace("step:8mbit,800kbit,1"), piece_bytes=100_000, clock=lambda: now[0])
    waits = []

    async def write(piece):
        waits.append((now[0], len(piece)))

    async def fake_sleep(seconds):
        now[0] += seconds

    real_sleep = asyncio.sleep
    asyncio.sleep = fake_sleep
    try:
        asyncio.run(shaper.write(write, b"x" * 1_200_000))
    finally:
        asyncio.sleep = real_sleep
    # 1 MB/s for 1 s (10 pieces), then 0.1 MB/s: the 11th piece leaves at 2 s, the 12th at 3 s
    assert [round(t, 6) for t, _ in waits] == [round(0.1 * (i + 1), 6) for i in range(10)] + [2.0, 3.0]
    assert shaper.sent_bytes == 1_200_000
    shaper.reset(None)
    assert shaper.reserve(10**9) == 0.0  # unshaped


def test_a_late_writer_does_not_lose_link_time():
    """Each sleep wakes 1 ms late: the link still carries the trace's rate (lateness within an object is
    not idle time), but idle time before an object, long or short, is not made up."""
    now = [0.0]
    shaper = Shaper(parse_trace("constant:8mbit"), piece_bytes=10_000, clock=lambda: now[0])
    sent = []

    async def write(piece):
        sent.append(now[0])

    async def late_sleep(seconds):
        now[0] += seconds + 0.001

    real_sleep = asyncio.sleep
    asyncio.sleep = late_sleep
    try:
        asyncio.run(shaper.write(write, b"x" * 1_000_000))  # 1 MB at 1 MB/s
        assert 1.0 <= sent[-1] <= 1.0 + 0.002  # not 1.1 s (100 pieces x 1 ms late)
        for gap in (0.5, 0.005):  # the link idles, long or briefly: the next object is not sent early
            now[0] += gap
            asked = now[0]
            asyncio.run(shaper.write(write, b"x" * 100_000))
            assert sent[-1] >= asked + 0.1 - 1e-9
    finally:
        asyncio.sleep = real_sleep
