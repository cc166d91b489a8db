"""Bootstrap intervals over samples: a score's spread, and a method's paired difference from dense.

Samples are the unit of resampling (turns of one sample share a context, so they are not
independent). A paired difference compares a method and dense on the same samples; a cell is
"worse" only when its whole 95% interval lies below 0, "better" only when it lies above, and
anything else is no difference, whatever the point estimate says.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0  # fixed: the same scores always give the same interval


@dataclass(frozen=True)
class Interval:
    """A mean and its percentile-bootstrap interval over `n` samples."""

    mean: float
    low: float
    high: float
    n: int
    lower_is_better: bool = False  # a loss (NLL): an interval above 0 is worse

    @property
    def verdict(self) -> str:
        """"worse" / "better" when the interval excludes 0, else "same" (no difference)."""
        below, above = ("better", "worse") if self.lower_is_better else ("worse", "better")
        if self.high < 0:
            return below
        if self.low > 0:
            return above
        return "same"

    def to_dict(self, digits: int = 4) -> dict[str, float | int | str]:
        return {"diff": round(self.mean, digits), "ci_low": round(self.low, digits),
                "ci_high": round(self.high, digits), "n": self.n, "verdict": self.verdict}


def bootstrap_mean(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = SEED) -> Interval | None:
    """The mean of `values` with a percentile bootstrap interval (None for no values)."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size == 0:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(resamples, data.size))
    means = data[picks].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # the quantiles of a constant are that constant up to rounding; keep the interval around the mean
    mean = float(data.mean())
    return Interval(mean, min(float(low), mean), max(float(high), mean), int(data.size))


def paired_difference(method: Mapping[Hashable, float], dense: Mapping[Hashable, float],
                      resamples: int = RESAMPLES, level: float = LEVEL,
                      lower_is_better: bool = False) -> Interval | None:
    """method - dense over the keys (samples) both have, with a paired bootstrap interval
    (`lower_is_better` for a loss such as NLL: its verdict reads an increase as worse)."""
    keys = [key for key in method if key in dense and method[key] is not None and dense[key] is not None]
    found = bootstrap_mean([method[key] - dense[key] for key in keys], resamples, level)
    return None if found is None else replace(found, lower_is_better=lower_is_better)
