"""Per-chunk choice of a codec level, or recomputing the chunk from its tokens, to meet a deadline.

CacheGen's streaming adaptation (Liu et al., SIGCOMM 2024, section 5.3), decided again before every
chunk with the latest throughput: for the chunks still to come, predict when the whole context would be
ready under a plan, and take the best-quality plan that is ready by the deadline (`slo` seconds after
the fetch began, less a safety `margin`). The prediction models the client as it runs: one link that
fetches chunks back to back, and one worker that decodes fetched chunks and recomputes the others, in
chunk order (a chunk is recomputed on top of the chunks before it). Recomputing needs no bytes, so the
worker can recompute early chunks while the link fetches later ones: with little bandwidth the two
resources together beat either alone.

Plans considered: the first r remaining chunks recomputed and the rest fetched at a level L, for
r = 0, 1, 2, ..., all and L from best to worst (the manifest's order, which is the codec's measured
quality order: KL from the dense cache grows level by level in benchmarks/results/codec.json). So a
plan fetches the rest at one uniform level: a mix of levels is worse than the uniform level of the same
size (the worst chunks dominate), and re-planning per chunk only changes the level when the measured
throughput says the deadline is at risk (down) or that there is room to spare (up). The plan with the
fewest recomputed chunks that meets the deadline wins, the best level among those (recomputing is the
fallback: its chunks are exact, but it costs compute); the current chunk is then recomputed if r > 0,
else fetched at L.

Three guards against a throughput estimate that is wrong for a while:
- Discount (`discount`; the client's default is "wide"): a plan at level L is made at the predicted
  throughput divided by L's discount. "wide": L's step, the factor by which L's bytes exceed the next
  cheaper level's, where that step is at least `WIDE_STEP` (2), and none elsewhere. With the codec's
  levels only lossless-ish (3.2x high's bytes, for little quality) is discounted: it needs room for its
  whole step, which kept plans from starting at lossless-ish on a 64 Mbit/s link that drops to 8 at
  0.4 s (with no discount, the 2 s deadline ended in extreme chunks: results/stream-policies-relax.json).
  The lossy levels, 1.2-1.3x apart, are planned at the predicted rate, because an estimate that is too
  low costs more quality than one that is too high: a discounted plan starts a level low and moves up
  as measurements allow, leaving the worst chunks first; an optimistic one starts high and moves down,
  leaving the best first, and results/stream-sensitivity.json has a better first chunk buying about a
  level for the rest and a worse one costing more than its bytes. Deadlines stay safe through the
  insurance below, re-planning before every chunk and abandonment (client.py). None ("levels", the
  default until results/stream.json of this version) discounts every level by its step; a number gives
  one discount to every level (1: none), as RobustMPC's discount by the recent prediction error does.
  On `constant:32mbit` with a 0.75 s deadline, "levels" started the 8-chunk contexts at extreme (ppl
  +11.4%), "wide" at compact (+5.9%, as fixed compact's +6.1%); results/stream-policies-wide.json
  compares the two model-free (docs/streaming.md).
- Hysteresis (`step_up_margin`, 10% of `slo`): once the client `commit`s to a level, a better level is
  taken only if its plan is ready that much before the deadline (moving down is never held back). An
  estimate that wobbles around a level's threshold would otherwise alternate levels chunk by chunk. A
  level chosen on the prior rate alone (before any chunk was measured) is not held.
- Insurance (`drop_factor`, 2): a chunk fetched at L must survive a bandwidth drop by `drop_factor`
  while it is in flight: this chunk at the lower rate and then the rest at the fastest level must still
  be ready in time (a big chunk started just before a drop is what misses deadlines; the client also
  abandons such a chunk mid-way, see client.py).

Refinement (`refine`): the guards leave time unused when the link was faster than they allowed for (a
tight deadline's plan starts at the cheapest level and ends with a quarter of the deadline to spare).
Once every chunk is in the cache, the client spends what is left raising the quality floor: the best
level L such that every fetched chunk worse than L, fetched again at L, is predicted done by the deadline
less the margin (at the throughput divided by `refine_discount`: the client's default is 1, none); the
first chunk first, then the worst. All or nothing, since a context's quality is set by its worst chunks;
but when no whole floor fits, the first chunk alone is fetched again at the best level that fits (at the
plans' discounts). Its level weighs most: results/stream-sensitivity.json (9 contexts, KL from the
lossless-ish cache, medians) has `extreme` there among `high` chunks at 0.068 against 0.017 for one
`extreme` chunk elsewhere (0.010 all `high`, 0.141 all `extreme`), and `high` there lifts the rest's
quality about one level (`high` first, `aggressive` rest: 0.030, as all `compact`). A refinement
costs no deadline: the client gives a fetch up as soon as it would end late, and the chunk keeps the
version it has. So the discount, which guards the plans against a throughput estimate that is too high,
would only save refinement fetches that end up given up; without it, refinement lifted the floor in 31
of 81 model-free fetches against 18 (results/stream-policies-lift.json), none given up or late. A plan
that counted fetching the worse earlier chunks again at its level (so the first pass stays uniform) left
floors lower there: the first chunks, planned cheap before the rate is known, held the whole pass down.

If no plan meets the deadline, the plan that is ready soonest wins (so the policy never misses a
deadline the fastest fixed level would meet, up to prediction error: a drop nobody could predict can
still make it miss, when the fixed level finished before the drop and the adaptive plan, using the
time it was given, did not).

Fixed policies (one level, or always recompute) use the same client and report the same figures, for
comparison: `Planner(policy="balanced")`, `Planner(policy="recompute")`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvlife.stream.context import RECOMPUTE, StreamError
from kvlife.stream.estimate import SpeedEstimate

ADAPTIVE = "adaptive"
LEVELS, WIDE = "levels", "wide"  # discounts by the levels' steps: every level's, or only the wide steps'
WIDE_STEP = 2.0  # a level whose bytes are at least this many times the next cheaper level's has a wide step
DISCOUNT: float | str | None = WIDE  # the client's default: the wide steps only (module docstring)
REFINE_DISCOUNT: float | None = 1.0  # the client's default for refinement: none (module docstring)
STEP_UP_MARGIN = 0.1  # of the deadline: the further room a move to a better level needs (hysteresis)


def parse_discount(text: str) -> float | str | None:
    """A discount as the command line writes it: "levels" (None: each level's step), "wide" (the steps of
    at least `WIDE_STEP` only) or a number >= 1; otherwise ValueError, whose message callers prefix with the
    flag's name."""
    if text == LEVELS:
        return None
    if text == WIDE:
        return WIDE
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 1:
        raise ValueError(f"must be a number >= 1, {LEVELS!r} or {WIDE!r}, not {text!r}")
    return value


@dataclass
class Refinement:
    level: str  # the level to fetch the chunks at again
    chunks: list[int]  # the chunks below that level, the first chunk first, then worst first (then in order): the next to fetch is chunks[0]
    predicted_ready_s: float  # when all of them would be fetched and decoded


@dataclass
class Decision:
    option: str  # a level name or "recompute"
    predicted_ready_s: float  # when the plan it belongs to predicts the whole context ready
    plan_level: str | None  # the level the plan fetches the remaining chunks at
    plan_recompute: int  # how many of the remaining chunks (from this one) the plan recomputes
    meets: bool  # the plan is predicted ready by the deadline less the margin


def _candidate_counts(rest: int) -> list[int]:
    counts, step = set(range(min(rest, 4) + 1)), 4
    while step < rest:
        step = int(step * 1.5) + 1
        counts.add(min(step, rest))
    counts.add(rest)
    return sorted(counts)


class Planner:
    def __init__(self, sizes: dict[str, Sequence[int]], chunk_tokens: Sequence[int], slo: float,
                 policy: str = ADAPTIVE, margin: float = 0.05, allow_recompute: bool = True,
                 drop_factor: float = 2.0, step_up_margin: float = STEP_UP_MARGIN, discount: float | str | None = 1.0,
                 refine_discount: float | str | None = None, first_lift: bool = False) -> None:
        """`sizes`: level -> bytes of each chunk, levels best quality first; `chunk_tokens`: tokens of each
        chunk; `slo`: seconds for the whole context; `margin`: fraction of `slo` kept in reserve;
        `drop_factor`: the bandwidth drop a fetch must survive (`insured`; 1 turns the check off);
        `step_up_margin`: the further fraction of `slo` a better level than the one being fetched must leave
        in reserve before the plan moves up to it (hysteresis: see `commit`); `discount`: a plan at a level is made at
        the predicted throughput divided by this (>= 1), or, if None, by that level's size over the next
        cheaper level's (its step; see the module's docstring); `refine_discount`: the same for refinement
        (None: as `discount`); `first_lift`: fetch the first chunk one level above its plan's level where
        that plan still meets the deadline (an experiment, off by default: `choose`)."""
        self.levels = list(sizes)
        self.sizes = {level: list(values) for level, values in sizes.items()}
        self.tokens = list(chunk_tokens)
        if not self.levels and policy != RECOMPUTE:
            raise StreamError("nothing to plan with: no levels")
        if any(len(v) != len(self.tokens) for v in self.sizes.values()):
            raise StreamError("every level needs one size per chunk")
        if policy not in (ADAPTIVE, RECOMPUTE) and policy not in self.sizes:
            raise StreamError(f"unknown policy {policy!r}: adaptive, recompute or a level ({', '.join(self.levels)})")
        if not slo > 0:
            raise StreamError(f"the deadline (slo) must be > 0 seconds, not {slo}")
        self.slo, self.policy, self.margin, self.allow_recompute = slo, policy, margin, allow_recompute
        self.budget = slo * (1.0 - margin)  # a plan meets the deadline if it is ready by this
        self.drop_factor, self.step_up_margin = drop_factor, step_up_margin
        self.discounts = self._discounts(discount, "the throughput discount")
        self.refine_discounts = self.discounts if refine_discount is None else \
            self._discounts(refine_discount, "the refinement's throughput discount")
        self.first_lift = first_lift
        self.full_tokens = max(self.tokens) if self.tokens else 1
        self.current: str | None = None  # the level the plan is fetching at (set by `commit`)

    def _discounts(self, discount: float | str | None, name: str) -> dict[str, float]:
        """Each level's discount: `discount` (>= 1, else StreamError naming it `name`), or, if None, its step,
        or, if "wide", its step where that is at least `WIDE_STEP` and none elsewhere."""
        if discount in (None, WIDE):  # each level's step over the next cheaper one; none for the cheapest
            totals = [sum(self.sizes[level]) for level in self.levels]
            steps = [max(1.0, size / cheaper) if cheaper > 0 else 1.0 for size, cheaper in zip(totals, totals[1:])]
            if discount == WIDE:
                steps = [step if step >= WIDE_STEP else 1.0 for step in steps]
            return dict(zip(self.levels, [*steps, 1.0]))
        if not isinstance(discount, (int, float)) or not discount >= 1:
            raise StreamError(f"{name} must be >= 1, {LEVELS!r} or {WIDE!r}, not {discount!r}")
        return dict.fromkeys(self.levels, float(discount))

    def rank(self, level: str) -> int:
        """A level's place in the quality order (0: the best)."""
        return self.levels.index(level)

    def commit(self, decision: Decision, measured: bool = True) -> None:
        """The client acted on `decision`: later choices move up from its level only with room to spare. Not
        if the decision was made on a prior rate alone (`measured` False: before any chunk's throughput was
        measured), which the first measurement replaces: holding a plan at a level chosen that way kept the
        first chunk's probe from moving up (a `constant:32mbit` link measured at 3.8 MB/s after a prior of
        2.3 MB/s: `aggressive`, not `compact`)."""
        if decision.option != RECOMPUTE and measured:
            self.current = decision.option

    def _fetched(self, level: str, j: int, link: float, worker: float, rate: float,
                 speeds: SpeedEstimate) -> tuple[float, float]:
        """(link, worker) free times after chunk j is fetched at `level` at `rate` (the link busy for its bytes)
        and then decoded (the worker starts it once it has arrived and the worker is free)."""
        link += self.sizes[level][j] / rate
        return link, max(worker, link) + speeds.decode_s(level, self.tokens[j] / self.full_tokens)

    def ready_time(self, index: int, level: str | None, recompute: int, now: float, worker_free: float,
                   bandwidth: float, speeds: SpeedEstimate, tail_level: str | None = None,
                   first_bandwidth: float | None = None) -> float:
        """Predicted time the context is ready if chunks index.. are: the first `recompute` recomputed,
        the others fetched at `level` (after the first fetched one at `tail_level`, if given; the first
        fetched one at `first_bandwidth`, if given; fetches start at `now`; the worker is free at
        `worker_free`)."""
        link, worker = now, max(now, worker_free)
        prefix = sum(self.tokens[:index])
        for k, j in enumerate(range(index, len(self.tokens))):
            if k < recompute or level is None:
                worker += speeds.recompute_s(self.tokens[j], prefix)
            else:
                fetched = tail_level if tail_level is not None and k > recompute else level
                rate = first_bandwidth if first_bandwidth is not None and k == recompute else bandwidth
                link, worker = self._fetched(fetched, j, link, worker, rate, speeds)
            prefix += self.tokens[j]
        return worker

    def refine(self, held: Sequence[str], now: float, worker_free: float, bandwidth: float | None,
               speeds: SpeedEstimate) -> Refinement | None:
        """Once every chunk has been fetched or recomputed once (`held`: each chunk's level or "recompute"),
        the time left before the deadline can raise the quality floor: the best level L such that every
        fetched chunk worse than L, fetched again at L (the first chunk first, then the worst, at the
        throughput divided by L's refinement discount, `refine_discount`), is predicted decoded by the
        deadline less the margin. All or nothing: a context's quality is set by its worst chunks, so
        fetching some of them again only spends time (the client gives a fetch up as soon as it would end
        late, keeping the chunk it replaces, so a refinement never costs the deadline). The exception is the
        first chunk, whose level weighs most (module docstring): if no whole floor fits, it alone at the best
        level that fits at the plans' discounts. None if nothing fits. Only the adaptive policy refines;
        recomputed chunks are exact and never fetched."""
        if self.policy != ADAPTIVE:
            return None
        # fetched chunks: the first chunk first (a refinement cut short has lifted it), then worst first, in order
        fetched = sorted(((self.rank(level), i) for i, level in enumerate(held) if level in self.sizes),
                         key=lambda item: (item[1] != 0, -item[0], item[1]))
        if not fetched:
            return None
        floor = max(rank for rank, _ in fetched)
        bandwidth = max(bandwidth or 1.0, 1.0)

        def ready(level: str, chunks: list[int], rate: float) -> float:
            link, worker = now, max(now, worker_free)
            for i in chunks:
                link, worker = self._fetched(level, i, link, worker, rate, speeds)
            return worker

        for rank, level in enumerate(self.levels[:floor]):
            chunks = [i for r, i in fetched if r > rank]
            done = ready(level, chunks, bandwidth / self.refine_discounts[level])
            if done <= self.budget:
                return Refinement(level, chunks, done)
        # no whole floor fits: the first chunk alone, whose level weighs most (module docstring), at the plans' discounts (a
        # level that buys little quality for many bytes needs that much more room)
        if held and held[0] in self.sizes:
            for level in self.levels[:self.rank(held[0])]:
                done = ready(level, [0], bandwidth / self.discounts[level])
                if done <= self.budget:
                    return Refinement(level, [0], done)
        return None

    def _lift_first(self, decision: Decision, now: float, worker_free: float, bandwidth: float,
                    speeds: SpeedEstimate, limit: float) -> Decision:
        """With `first_lift`: the first chunk one level above `decision`'s plan level, the rest at that level,
        if that is predicted ready by `limit` and insured; else `decision`. The first chunk's level weighs
        most (module docstring), and refinement can lift it only with time left at the end."""
        level = decision.plan_level
        assert level is not None
        better = self.levels[self.rank(level) - 1]
        first_rate, rate = bandwidth / self.discounts[better], bandwidth / self.discounts[level]
        ready = self.ready_time(0, better, 0, now, worker_free, rate, speeds, tail_level=level,
                                first_bandwidth=first_rate)
        if ready <= limit and self.insured(0, better, now, worker_free, first_rate, speeds, limit):
            return Decision(better, ready, level, 0, True)
        return decision

    def insured(self, index: int, level: str, now: float, worker_free: float, bandwidth: float,
                speeds: SpeedEstimate, budget: float) -> bool:
        """Fetching chunk `index` at `level` leaves a way out if the link drops by `drop_factor` while this
        chunk is in flight: this chunk at the lower rate, then the rest at the fastest level, is still ready
        in time (the rest at the estimated rate: by then the client has measured the drop and the next
        decisions adapt to it; abandonment covers a longer drop)."""
        fastest = self.levels[-1]
        if level == fastest or self.drop_factor <= 1:
            return True
        return self.ready_time(index, level, 0, now, worker_free, bandwidth, speeds, tail_level=fastest,
                               first_bandwidth=bandwidth / self.drop_factor) <= budget

    def choose(self, index: int, now: float, worker_free: float, bandwidth: float | None,
               speeds: SpeedEstimate) -> Decision:
        """The option for chunk `index`, given the time since the fetch began and the worker's backlog."""
        bandwidth = max(bandwidth or 1.0, 1.0)
        budget = self.budget
        if self.policy == RECOMPUTE:
            ready = self.ready_time(index, None, len(self.tokens) - index, now, worker_free, bandwidth, speeds)
            return Decision(RECOMPUTE, ready, None, len(self.tokens) - index, ready <= budget)
        if self.policy != ADAPTIVE:
            ready = self.ready_time(index, self.policy, 0, now, worker_free, bandwidth, speeds)
            return Decision(self.policy, ready, self.policy, 0, ready <= budget)
        rest = len(self.tokens) - index
        counts = _candidate_counts(rest) if self.allow_recompute else [0]
        current = self.levels.index(self.current) if self.current in self.levels else 0  # 0: no level yet
        step_up_budget = budget - self.slo * self.step_up_margin
        soonest: Decision | None = None
        for count in counts:
            for rank, level in enumerate(self.levels):
                rate = bandwidth / self.discounts[level]
                ready = self.ready_time(index, level, count, now, worker_free, rate, speeds)
                # moving above the level being fetched needs more room: a throughput estimate that wobbles
                # around a level's threshold would otherwise alternate levels chunk by chunk, and a mix of
                # levels is worse than the lower level's uniform quality whenever the next dip lands lower
                limit = step_up_budget if count == 0 and rank < current else budget
                meets = ready <= limit and (count > 0 or self.insured(index, level, now, worker_free, rate,
                                                                       speeds, limit))
                decision = Decision(RECOMPUTE if count else level, ready, level, count, meets)
                if decision.meets:
                    if self.first_lift and index == 0 and count == 0 and rank > 0:
                        return self._lift_first(decision, now, worker_free, bandwidth, speeds, limit)
                    return decision
                if soonest is None or ready < soonest.predicted_ready_s:
                    soonest = decision
        assert soonest is not None
        return soonest
