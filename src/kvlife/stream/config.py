"""FetchConfig: every knob of a streamed fetch, the planner's and the client's, in one place.

    client.fetch("doc-1", slo=2.0, model=model, config=FetchConfig(drop_factor=1.5, refine=False))

The defaults are the settings that measured best (docs/streaming.md, the experiments behind them in
docs/streaming-experiments.md); benchmarks vary them through this object, never through module state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvlife.stream.context import StreamError

WIDE = "wide"  # the discount by each level's size step where that step is at least WIDE_STEP
WIDE_STEP = 2.0


def parse_discount(text: str) -> float | str:
    """A discount as the command line writes it: "wide" or a number >= 1; otherwise ValueError, whose message
    callers prefix with the flag's name."""
    if text == WIDE:
        return WIDE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 1 or math.isinf(value):
        raise ValueError(f"must be a number >= 1 or {WIDE!r}, not {text!r}")
    return value


@dataclass(frozen=True)
class FetchConfig:
    """The planner's and the client's knobs (the planner reads the first five; `Planner`, `Fetch`).

    margin            fraction of the deadline kept in reserve: a plan meets it if ready by slo x (1 - margin)
    drop_factor       the bandwidth drop a chunk in flight must survive (`Planner.insured`; 1: no insurance)
    discount          plans at a level assume the predicted throughput divided by this: a number >= 1 for
                      every level, or "wide": by the level's size step over the next cheaper level where that
                      step is >= 2 (only lossless-ish with the codec's levels), none elsewhere
    step_up_margin    the further fraction of the deadline a move to a better level needs (hysteresis)
    refine_discount   the same as `discount`, for refinement (1: none, as a refinement that would end late is
                      given up)
    max_attempts      fetches of a chunk that fail in transit before it is recomputed
    levels            the levels the adaptive policy may use (None: the context's)
    abort_after_s     give the fetch up (FetchAborted) once it has taken this long (benchmarks bound hopeless
                      fixed policies)
    refine            spend the time left before the deadline fetching the worst chunks again, better
    throughput_window samples whose harmonic mean (or the last, if lower) predicts the throughput
    detect_s          the window of the rate a chunk in flight is judged by (abandonment)
    recent_s          the window of a chunk's recent rate: its sample when the link slowed during it
    probe_bytes       bytes of the first chunk after which its own rate replaces the prior
    give_up_gain      of the deadline: what giving up a late chunk must gain when no plan meets the deadline
    max_abandons      give-ups of one chunk (the link slowed), after which it is fetched to the end
    """

    margin: float = 0.05
    drop_factor: float = 2.0
    discount: float | str = WIDE
    step_up_margin: float = 0.1
    refine_discount: float | str = 1.0
    max_attempts: int = 2
    levels: tuple[str, ...] | None = None
    abort_after_s: float | None = None
    refine: bool = True
    throughput_window: int = 3
    detect_s: float = 0.05
    recent_s: float = 0.15
    probe_bytes: int = 64 << 10
    give_up_gain: float = 0.02
    max_abandons: int = 3

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.margin < 1, "margin must be in [0, 1)"),
            (self.drop_factor >= 1, "drop_factor must be >= 1"),
            (self.step_up_margin >= 0, "step_up_margin must be >= 0"),
            (self.max_attempts >= 1, "max_attempts must be >= 1"),
            (self.throughput_window >= 1, "the throughput window must be >= 1 sample"),
            (0 < self.detect_s <= 1, "detect_s must be in (0, 1] seconds"),
            (self.recent_s > 0 and self.probe_bytes > 0, "recent_s and probe_bytes must be > 0"),
            (self.abort_after_s is None or self.abort_after_s > 0, "abort_after_s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise StreamError(f"{message} (FetchConfig)")
        for name in ("discount", "refine_discount"):
            value = getattr(self, name)
            if value != WIDE and not (isinstance(value, (int, float)) and value >= 1):
                raise StreamError(f"{name} must be a number >= 1 or {WIDE!r}, not {value!r}")
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(self.levels))
