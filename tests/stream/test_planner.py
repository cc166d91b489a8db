"""The planner's choices on synthetic figures: sizes, bandwidths, decode and recompute speeds."""

import pytest

from kvlife.stream.config import FetchConfig, parse_discount
from kvlife.stream.context import RECOMPUTE, StreamError
from kvlife.stream.estimate import SpeedEstimate, ThroughputEstimate
from kvlife.stream.planner import Planner

# 10 chunks of 256 tokens; sizes per chunk as on Qwen2.5-Coder-0.5B (bytes: ~8.5, 2.7, 2.1, 1.1 bits/element)
LEVELS = {"lossless-ish": 1_670_000, "high": 527_000, "balanced": 408_000, "extreme": 222_000}
N, TOKENS = 10, 256


def planner(slo, policy="adaptive", margin=0.0, allow_recompute=True, drop_factor=1.0, **knobs):
    """A planner over LEVELS' sizes; `knobs`: other FetchConfig fields (the discounts default to none
    here)."""
    sizes = {level: [size] * N for level, size in LEVELS.items()}
    config = FetchConfig(**{"margin": margin, "drop_factor": drop_factor, "discount": 1.0, **knobs})
    return Planner(sizes, [TOKENS] * N, slo, policy, allow_recompute, config)


def speeds(decode_s=0.01, recompute_s=1.0):
    """Decode takes `decode_s` per chunk at every level, recompute `recompute_s` per chunk (no prefix
    growth)."""
    s = SpeedEstimate(fp16_chunk_bytes=3e6, recompute_tokens_s=TOKENS / recompute_s, attention_knee=1e18)
    for level in LEVELS:
        s.add_decode(level, decode_s)
    return s


def total(level, bandwidth, decode_s=0.01):
    return N * LEVELS[level] / bandwidth + decode_s


@pytest.mark.parametrize("bandwidth,slo,expected", [
    (100e6, 1.0, "lossless-ish"),   # 16.7 MB in 0.17 s
    (10e6, 1.0, "high"),            # lossless needs 1.67 s, high 0.53 s
    (5e6, 0.9, "balanced"),         # high needs 1.05 s, balanced 0.82 s
    (3e6, 0.9, "extreme"),          # balanced needs 1.36 s, extreme 0.74 s
])
def test_best_level_that_meets_the_deadline(bandwidth, slo, expected):
    decision = planner(slo).choose(0, 0.0, 0.0, bandwidth, speeds())
    assert decision.option == expected and decision.meets
    assert total(expected, bandwidth) <= slo
    better = list(LEVELS)[list(LEVELS).index(expected) - 1] if expected != "lossless-ish" else None
    assert better is None or total(better, bandwidth) > slo


def test_recompute_when_that_is_faster_than_any_level():
    # 0.1 MB/s: extreme needs 22 s; recomputing 10 chunks takes 10 s; together ~ 6-7 s
    decision = planner(slo=1.0).choose(0, 0.0, 0.0, 0.1e6, speeds())
    assert decision.option == RECOMPUTE and not decision.meets
    assert decision.predicted_ready_s < total("extreme", 0.1e6)
    assert decision.predicted_ready_s < N * 1.0  # and faster than recomputing everything


def test_recompute_overlaps_fetching_to_meet_a_deadline_neither_meets_alone():
    # 0.5 MB/s: extreme alone 4.4 s, recompute alone 10 s; recompute the first chunks while fetching the rest
    p = planner(slo=4.0)
    assert p.ready_time(0, "extreme", 0, 0.0, 0.0, 0.5e6, speeds()) > 4.0
    assert p.ready_time(0, None, N, 0.0, 0.0, 0.5e6, speeds()) > 4.0
    decision = p.choose(0, 0.0, 0.0, 0.5e6, speeds())
    assert decision.meets and decision.option == RECOMPUTE and decision.plan_recompute >= 1
    assert decision.plan_level is not None


def test_no_recompute_without_a_model():
    decision = planner(slo=1.0, allow_recompute=False).choose(0, 0.0, 0.0, 0.1e6, speeds())
    assert decision.option == "extreme" and not decision.meets


def test_lower_bandwidth_never_raises_quality():
    order = [*LEVELS, RECOMPUTE]
    previous = 0
    for bandwidth in [200e6, 50e6, 20e6, 8e6, 5e6, 3e6, 2e6, 1e6]:
        rank = order.index(
            planner(slo=1.0, allow_recompute=False).choose(0, 0.0, 0.0, bandwidth, speeds()).option
        )
        assert rank >= previous
        previous = rank


def test_time_already_spent_and_worker_backlog_count():
    p, s = planner(slo=1.0), speeds()
    assert p.choose(5, 0.0, 0.0, 10e6, s).option == "lossless-ish"  # 5 chunks left: 0.84 s
    assert p.choose(5, 0.5, 0.5, 10e6, s).option == "high"  # half the time gone
    # a busy worker makes recomputing (worker time) lose to fetching (link time)
    slow = planner(slo=4.0)
    assert slow.choose(0, 0.0, 0.0, 0.5e6, s).option == RECOMPUTE
    assert slow.choose(0, 0.0, 3.5, 0.5e6, s).option == "extreme"


def test_margin_keeps_a_reserve():
    bandwidth = N * LEVELS["lossless-ish"] / 0.97  # lossless-ish ready at ~0.98 s
    assert planner(slo=1.0, margin=0.0).choose(0, 0.0, 0.0, bandwidth, speeds()).option == "lossless-ish"
    assert planner(slo=1.0, margin=0.1).choose(0, 0.0, 0.0, bandwidth, speeds()).option == "high"


def test_a_fetch_must_survive_a_bandwidth_drop():
    s, tight = speeds(), planner(1.0, drop_factor=4)
    # plenty of slack: lossless-ish (0.42 s at 40 MB/s) survives a drop to 10 MB/s
    assert tight.choose(0, 0.0, 0.0, 40e6, s).option == "lossless-ish"
    # the last chunk with 0.12 s left: lossless-ish takes 0.05 s at 40 MB/s but 0.18 s at 10 MB/s: refused
    assert tight.choose(N - 1, 0.88, 0.88, 40e6, s).option == "high"
    assert planner(1.0, drop_factor=1).choose(N - 1, 0.88, 0.88, 40e6, s).option == "lossless-ish"
    # only the chunk in flight is exposed: at 8 MB/s, high for this chunk (0.26 s at 2 MB/s) and extreme
    # after it (0.25 s) fit; assuming the whole rest at 2 MB/s would have forced extreme everywhere
    assert tight.choose(0, 0.0, 0.0, 8e6, s).option == "high"
    # the fastest level needs no insurance: there is nothing cheaper to fall back to
    assert tight.choose(N - 1, 0.98, 0.98, 40e6, s).option == "extreme"


def test_plans_are_made_at_the_discounted_throughput():
    """A discount of 2 plans as if the link gave half the predicted rate: at 10 MB/s and 1 s, high (0.53 s
    at 10 MB/s, 1.05 s at 5 MB/s) gives way to balanced (0.82 s at 5 MB/s)."""
    discounted = planner(1.0, discount=2.0)
    assert planner(1.0).choose(0, 0.0, 0.0, 10e6, speeds()).option == "high"
    assert discounted.choose(0, 0.0, 0.0, 10e6, speeds()).option == "balanced"
    # the same plan at twice the rate: a discount only scales the prediction
    assert discounted.choose(0, 0.0, 0.0, 20e6, speeds()).option == "high"
    # a fixed level ignores it
    assert planner(1.0, "high", discount=2.0).choose(0, 0.0, 0.0, 10e6, speeds()).option == "high"
    with pytest.raises(StreamError, match="discount must be a number >= 1"):
        FetchConfig(discount=0.5)


def test_the_wide_discount_keeps_only_the_wide_steps():
    """"wide": a level whose bytes are at least twice the next cheaper level's (lossless-ish, 3.2x high) is
    discounted by that step, the lossy levels (1.3x and 1.8x here) not at all; a number: every level alike."""
    wide = planner(1.0, discount="wide")
    assert wide.discounts == pytest.approx({"lossless-ish": 1_670_000 / 527_000, "high": 1.0, "balanced": 1.0,
                                            "extreme": 1.0})
    uniform = planner(1.0, discount=1.3)
    assert set(uniform.discounts.values()) == {1.3}
    # at 6 MB/s high takes 0.89 s: on time as predicted, not at the rate over a 1.3x discount (1.15 s)
    assert wide.choose(0, 0.0, 0.0, 6e6, speeds()).option == "high"
    assert uniform.choose(0, 0.0, 0.0, 6e6, speeds()).option == "balanced"
    # lossless-ish keeps its room: 0.17 s at 100 MB/s is 0.53 s at the rate over its step; 0.4 s at 40 MB/s is
    # not
    assert wide.choose(0, 0.0, 0.0, 100e6, speeds()).option == "lossless-ish"
    assert wide.choose(0, 0.0, 0.0, 40e6, speeds()).option == "high"
    assert parse_discount("wide") == "wide" and parse_discount("1.5") == 1.5
    for bad in ("levels", "0.5", "steps"):
        with pytest.raises(ValueError, match="must be a number >= 1 or 'wide'"):
            parse_discount(bad)
    with pytest.raises(StreamError, match="discount must be a number >= 1 or 'wide'"):
        FetchConfig(discount="steps")


def test_fixed_policies_and_bad_input():
    assert planner(1.0, "balanced").choose(0, 0.0, 0.0, 1.0, speeds()).option == "balanced"
    assert planner(1.0, RECOMPUTE).choose(3, 0.0, 0.0, 1e9, speeds()).option == RECOMPUTE
    with pytest.raises(StreamError, match="unknown policy"):
        planner(1.0, "fastest")
    with pytest.raises(StreamError, match="must be > 0"):
        planner(0.0)


def test_throughput_believes_drops_at_once_and_rises_slowly():
    link = ThroughputEstimate()
    assert link.predict() is None
    for _ in range(3):
        link.add(1_000_000, 0.1)  # 10 MB/s
    assert link.predict() == pytest.approx(10e6)
    link.add(1_000_000, 1.0)  # drop to 1 MB/s
    assert link.predict() == pytest.approx(1e6)
    link.add(1_000_000, 0.01)  # one spike of 100 MB/s
    assert link.predict() < 5e6
    # the window: how many samples the harmonic mean spans (1: the last sample alone)
    last = ThroughputEstimate(window=1)
    for seconds in (1.0, 0.1, 0.25):
        last.add(1_000_000, seconds)
    assert last.predict() == pytest.approx(4e6)
    wide = ThroughputEstimate(window=2)
    wide.add(1_000_000, 1.0)
    wide.add(1_000_000, 0.1)
    assert wide.predict() == pytest.approx(2 / (1 / 1e6 + 1 / 10e6))
    with pytest.raises(StreamError, match="window"):
        ThroughputEstimate(window=0)


def test_recompute_estimate_learns_and_grows_with_the_prefix():
    s = SpeedEstimate(3e6, recompute_tokens_s=100.0, attention_knee=1000.0)
    s.add_recompute(256, 0, 0.5)
    assert s.recompute_s(256, 0) == pytest.approx(0.5)
    assert s.recompute_s(256, 1000) == pytest.approx(1.0)
    # a short last chunk (20 of 256 tokens) that ran slow per token (fixed cost per pass) moves it a little
    s.add_recompute(20, 0, 0.1, fraction=20 / 256)
    after_short = s.recompute_s(256, 0)
    # 0.1 s / 20 tokens = 1.28 s a chunk
    assert after_short == pytest.approx(0.5 + 0.5 * 20 / 256 * (1.28 - 0.5))
    assert after_short < 0.55
    s.add_recompute(256, 0, 0.7)  # a full chunk moves it halfway
    assert s.recompute_s(256, 0) == pytest.approx(0.5 * after_short + 0.5 * 0.7)
    s.add_decode("balanced", 0.2)
    assert s.decode_s("balanced") == pytest.approx(0.2)
    assert s.decode_s("high") > 0.1  # unmeasured levels scale with what the machine showed


def test_the_plan_moves_up_only_with_room_to_spare():
    s = speeds()
    # 10 MB/s, 1 s: high needs 0.54 s, lossless-ish 1.68 s; 5 chunks left after 0.25 s: lossless-ish needs
    # 0.84 s more (ready at 1.09 s), high 0.27 s; at 0.12 s it would be ready at 0.96 s: inside the deadline
    # but not by the step-up margin (10% of it)
    p = planner(1.0)
    first = p.choose(0, 0.0, 0.0, 10e6, s)
    assert first.option == "high"  # the first choice is not held back: there is no level to move up from
    p.commit(first)
    fresh = planner(1.0)
    assert fresh.choose(5, 0.12, 0.12, 10e6, s).option == "lossless-ish"  # without a level being fetched
    assert p.choose(5, 0.12, 0.12, 10e6, s).option == "high"  # 0.96 s > 0.9 s: stays
    assert p.choose(5, 0.0, 0.0, 10e6, s).option == "lossless-ish"  # 0.84 s: room to spare, moves up
    # moving down is never held back: at 2.5 MB/s high no longer fits and balanced does
    assert p.choose(5, 0.0, 0.0, 2.5e6, s).option in ("balanced", "extreme")
    # a recompute decision leaves the level being fetched as it was
    recompute = p.choose(0, 0.0, 0.0, 0.1e6, s)
    assert recompute.option == RECOMPUTE
    p.commit(recompute)
    assert p.current == "high"
    # a level chosen on a prior rate alone (no chunk measured yet) holds nothing back
    prior = planner(1.0)
    prior.commit(prior.choose(5, 0.12, 0.12, 1e6, s), measured=False)
    assert prior.current is None
    assert prior.choose(5, 0.12, 0.12, 10e6, s).option == "lossless-ish"


def test_the_prior_gives_way_to_the_first_measurement():
    link = ThroughputEstimate(prior_bytes_s=1e6)
    assert link.predict() == pytest.approx(1e6)
    link.add(3_000_000, 1.0)
    assert link.predict() == pytest.approx(3e6)  # the prior is not averaged in


def test_refinement_raises_the_whole_floor_to_the_best_level_that_fits():
    p = planner(slo=1.0)
    s = speeds()
    held = ["extreme"] * N
    # 0.7 s left at 10 MB/s: every chunk again at high is 5.27 MB (0.53 s), at lossless-ish 16.7 MB (1.67 s)
    plan = p.refine(held, 0.3, 0.3, 10e6, s)
    assert plan.level == "high" and plan.chunks == list(range(N))
    assert plan.predicted_ready_s == pytest.approx(0.3 + N * LEVELS["high"] / 10e6 + 0.01)
    # worst chunks first; chunks already at the level or better are not fetched again
    held = ["high", "extreme", "balanced", *["high"] * (N - 3)]
    plan = p.refine(held, 0.3, 0.3, 10e6, s)
    assert plan.level == "high" and plan.chunks == [1, 2]
    assert p.refine(["lossless-ish"] * N, 0.0, 0.0, 10e6, s) is None  # nothing better to fetch


def test_refinement_is_all_or_nothing_and_never_touches_recomputed_chunks():
    p = planner(slo=1.0)
    s = speeds()
    # 0.2 s left at 10 MB/s: raising all ten extreme chunks to balanced needs 0.41 s; the floor stays, and
    # only the first chunk, whose level weighs most, is fetched again (at lossless-ish: 0.177 s with no
    # discount)
    plan = p.refine(["extreme"] * N, 0.8, 0.8, 10e6, s)
    assert plan.level == "lossless-ish" and plan.chunks == [0]
    assert p.refine(["lossless-ish", *["extreme"] * (N - 1)], 0.8, 0.8, 10e6, s) is None
    # the same time raises two of them when the others are already better
    held = [RECOMPUTE, "extreme", "extreme", *["high"] * (N - 3)]
    plan = p.refine(held, 0.8, 0.8, 10e6, s)
    assert plan.level == "high" and plan.chunks == [1, 2]
    assert p.refine([RECOMPUTE] * N, 0.0, 0.0, 10e6, s) is None
    # the worker's backlog and the margin count; fixed policies never refine
    assert p.refine(held, 0.8, 0.99, 10e6, s) is None  # the worker is busy until 0.99 s: two decodes end late
    assert planner(slo=1.0, margin=0.1).refine(held, 0.8, 0.8, 10e6, s).level == "balanced"  # high: 0.915 s
    assert planner(slo=1.0, policy="extreme").refine(["extreme"] * N, 0.0, 0.0, 10e6, s) is None


def test_refinement_plans_at_the_discounted_throughput():
    s = speeds()
    held = ["extreme"] * N
    # all ten at high: 0.527 s at 10 MB/s, 0.79 s at 10 MB/s / 1.5
    assert planner(1.0, refine_discount=1.0).refine(held, 0.3, 0.3, 10e6, s).level == "high"
    assert planner(1.0, refine_discount=1.5).refine(held, 0.3, 0.3, 10e6, s).level == "balanced"


def test_refinement_can_plan_at_its_own_discount():
    s = speeds()
    held = ["extreme"] * N
    # the plans discounted by 1.5, refinement not: all ten at high fits in 0.7 s at the predicted 10 MB/s
    own = planner(1.0, discount=1.5, refine_discount=1.0)
    assert own.refine(held, 0.3, 0.3, 10e6, s).level == "high"
    assert own.discounts["high"] == 1.5 and own.refine_discounts["high"] == 1.0
    assert planner(1.0, refine_discount="wide").refine_discounts == planner(1.0, discount="wide").discounts
    with pytest.raises(StreamError, match="refine_discount must be a number >= 1"):
        FetchConfig(refine_discount=0.5)


def test_refinement_lifts_the_first_chunk_first():
    p = planner(slo=1.0)
    s = speeds()
    # the first chunk goes first in a whole-floor lift (a refinement cut short has lifted it)
    held = ["balanced", "extreme", "extreme", *["high"] * (N - 3)]
    plan = p.refine(held, 0.3, 0.3, 10e6, s)
    assert plan.level == "high" and plan.chunks == [0, 1, 2]
    # when no floor fits, the first chunk alone, at the plans' discounts: at 10 MB/s / 1.29, lossless-ish
    # needs 0.22 s, high 0.07 s: 0.2 s left
    steps = planner(1.0, discount=527_000 / 408_000, refine_discount=1.0)
    plan = steps.refine(["extreme"] * N, 0.8, 0.8, 10e6, s)
    assert plan.level == "high" and plan.chunks == [0]
    # a recomputed first chunk is exact: nothing to lift
    assert steps.refine([RECOMPUTE, *["extreme"] * (N - 1)], 0.8, 0.8, 10e6, s) is None
