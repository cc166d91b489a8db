"""Per chunk, a codec level or recomputing the chunk from its tokens, to have the context ready by a deadline.

CacheGen's streaming adaptation (Liu et al., SIGCOMM 2024, section 5.3), decided again before every
chunk. `choose` predicts when the whole context would be ready under each plan, modelling one link that
fetches chunks back to back and one worker that decodes fetched chunks and recomputes the others in
chunk order (`ready_time`). A plan recomputes the first r remaining chunks and fetches the rest at one
uniform level L (r = 0, 1, 2, ..., all; L best to worst, the manifest's order). The plan with the fewest
recomputed chunks that is ready by `slo x (1 - margin)` wins, the best level among those; if none is,
the plan ready soonest. Three guards (FetchConfig): a plan at L assumes the predicted throughput divided
by L's `discount`; a move up from the level being fetched (`commit`) needs `step_up_margin` more room;
a chunk is fetched at L only if it is `insured` against a drop by `drop_factor` while in flight.
`refine`, once every chunk is in: the best level L such that every fetched chunk worse than L, fetched
again at L (the first chunk first, then the worst), is ready by the deadline; if no whole floor fits,
the first chunk alone. Fixed policies (one level, or "recompute") are planned the same way, for
comparison. Why each rule, and what it was measured against: docs/streaming.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvlife.stream.config import WIDE, WIDE_STEP, FetchConfig
from kvlife.stream.context import RECOMPUTE, StreamError
from kvlife.stream.estimate import SpeedEstimate

ADAPTIVE = "adaptive"


@dataclass
class Refinement:
    level: str  # the level to fetch the chunks at again
    chunks: list[int]  # the chunks below that level: the first chunk first, then worst first, then in order
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
                 policy: str = ADAPTIVE, allow_recompute: bool = True,
                 config: FetchConfig | None = None) -> None:
        """`sizes`: level -> bytes of each chunk, levels best quality first; `chunk_tokens`: tokens of each
        chunk; `slo`: seconds for the whole context; `config`: margin, discounts, hysteresis, insurance."""
        config = config or FetchConfig()
        self.levels = list(sizes)
        self.sizes = {level: list(values) for level, values in sizes.items()}
        self.tokens = list(chunk_tokens)
        if not self.levels and policy != RECOMPUTE:
            raise StreamError("nothing to plan with: no levels")
        if any(len(v) != len(self.tokens) for v in self.sizes.values()):
            raise StreamError("every level needs one size per chunk")
        if policy not in (ADAPTIVE, RECOMPUTE) and policy not in self.sizes:
            raise StreamError(
                f"unknown policy {policy!r}: adaptive, recompute or a level ({', '.join(self.levels)})"
            )
        if not slo > 0:
            raise StreamError(f"the deadline (slo) must be > 0 seconds, not {slo}")
        self.slo, self.policy, self.allow_recompute, self.config = slo, policy, allow_recompute, config
        self.budget = slo * (1.0 - config.margin)  # a plan meets the deadline if it is ready by this
        self.discounts = self._discounts(config.discount)
        self.refine_discounts = self._discounts(config.refine_discount)
        self.full_tokens = max(self.tokens) if self.tokens else 1
        self.current: str | None = None  # the level the plan is fetching at (set by `commit`)

    def _discounts(self, discount: float | str) -> dict[str, float]:
        """Each level's discount: `discount` for every level, or, if "wide", the level's step over the next
        cheaper level where that is at least `WIDE_STEP`, and 1 elsewhere."""
        if discount != WIDE:
            return dict.fromkeys(self.levels, float(discount))
        totals = [sum(self.sizes[level]) for level in self.levels]
        steps = [size / cheaper if cheaper > 0 else 1.0 for size, cheaper in zip(totals, totals[1:])]
        return dict(zip(self.levels, [*(step if step >= WIDE_STEP else 1.0 for step in steps), 1.0]))

    def rank(self, level: str) -> int:
        """A level's place in the quality order (0: the best)."""
        return self.levels.index(level)

    def commit(self, decision: Decision, measured: bool = True) -> None:
        """The client acted on `decision`: later choices move up from its level only with room to spare. Not
        if the decision was made on a prior rate alone (`measured` False: before any chunk's throughput was
        measured): the first measurement replaces that rate, and the first chunk's probe may then move up."""
        if decision.option != RECOMPUTE and measured:
            self.current = decision.option

    def _fetched(self, level: str, j: int, link: float, worker: float, rate: float,
                 speeds: SpeedEstimate) -> tuple[float, float]:
        """(link, worker) free times after chunk j is fetched at `level` at `rate` (the link busy for its
        bytes) and then decoded (the worker starts it once it has arrived and the worker is free)."""
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
        first chunk, whose level weighs most (docs/streaming.md): if no whole floor fits, it alone at the best
        level that fits at the plans' discounts. None if nothing fits. Only the adaptive policy refines;
        recomputed chunks are exact and never fetched."""
        if self.policy != ADAPTIVE:
            return None
        # fetched chunks: the first chunk first (a refinement cut short has lifted it), then worst first, in
        # order
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
        # no whole floor fits: the first chunk alone, at the plans' discounts (a level that buys little
        # quality for many bytes needs that much more room)
        if held and held[0] in self.sizes:
            for level in self.levels[:self.rank(held[0])]:
                done = ready(level, [0], bandwidth / self.discounts[level])
                if done <= self.budget:
                    return Refinement(level, [0], done)
        return None

    def insured(self, index: int, level: str, now: float, worker_free: float, bandwidth: float,
                speeds: SpeedEstimate, budget: float) -> bool:
        """Fetching chunk `index` at `level` leaves a way out if the link drops by `drop_factor` while this
        chunk is in flight: this chunk at the lower rate, then the rest at the fastest level, is still ready
        in time (the rest at the estimated rate: by then the client has measured the drop and the next
        decisions adapt to it; abandonment covers a longer drop)."""
        fastest = self.levels[-1]
        if level == fastest or self.config.drop_factor <= 1:
            return True
        return self.ready_time(index, level, 0, now, worker_free, bandwidth, speeds, tail_level=fastest,
                               first_bandwidth=bandwidth / self.config.drop_factor) <= budget

    def choose(self, index: int, now: float, worker_free: float, bandwidth: float | None,
               speeds: SpeedEstimate) -> Decision:
        """The option for chunk `index`, given the time since the fetch began and the worker's backlog."""
        bandwidth = max(bandwidth or 1.0, 1.0)
        budget = self.budget
        if self.policy == RECOMPUTE:
            ready = self.ready_time(
                index, None, len(self.tokens) - index, now, worker_free, bandwidth, speeds
            )
            return Decision(RECOMPUTE, ready, None, len(self.tokens) - index, ready <= budget)
        if self.policy != ADAPTIVE:
            ready = self.ready_time(index, self.policy, 0, now, worker_free, bandwidth, speeds)
            return Decision(self.policy, ready, self.policy, 0, ready <= budget)
        rest = len(self.tokens) - index
        counts = _candidate_counts(rest) if self.allow_recompute else [0]
        current = self.levels.index(self.current) if self.current in self.levels else 0  # 0: no level yet
        step_up_budget = budget - self.slo * self.config.step_up_margin
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
                    return decision
                if soonest is None or ready < soonest.predicted_ready_s:
                    soonest = decision
        assert soonest is not None
        return soonest
