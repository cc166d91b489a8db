"""Bandwidth traces: a send rate as a function of time, piecewise constant, parsed from a short spec.

    constant:40mbit                          40 Mbit/s for ever
    step:40mbit,4mbit,1.5                    40 Mbit/s, then 4 Mbit/s from t = 1.5 s on
    walk:20mbit,seed=0,every=0.25,sigma=0.35,min=2mbit,max=80mbit
                                             a geometric random walk around 20 Mbit/s, a new rate every
                                             0.25 s (log-rate steps of N(0, sigma), pulled back to the mean)
    file:PATH                                lines "SECONDS RATE" (RATE as above), the last rate holds

Rates are bits per second as `tc` writes them (`bit`, `kbit`, `mbit`, `gbit`); a bare number is bits/s.
`Trace.bytes_until(t)` integrates the rate; `Trace.time_at(t0, n)` inverts it: the time at which a link
that follows the trace, busy from `t0`, has sent `n` more bytes. The server's shaper and the benchmark's
bookkeeping both use these, so a trace means the same on both sides.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from pathlib import Path

from kvlife.errors import KvlifeError

UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
WALK_HORIZON_S = 600.0  # a walk is precomputed this far; its last rate holds afterwards


class TraceError(KvlifeError):
    """A bandwidth trace spec does not parse or asks for a rate <= 0."""


def parse_rate(text: str) -> float:
    """Bytes per second from a tc-style rate ("40mbit", "500kbit", "1e6")."""
    raw = text.strip().lower()
    for unit in sorted(UNITS, key=len, reverse=True):
        if raw.endswith(unit):
            number, scale = raw[: -len(unit)], UNITS[unit]
            break
    else:
        number, scale = raw, 1.0
    try:
        bits = float(number) * scale
    except ValueError:
        raise TraceError(f"bad rate {text!r}: use e.g. 40mbit, 500kbit or 2gbit") from None
    if not (bits > 0 and math.isfinite(bits)):
        raise TraceError(f"rate {text!r} must be > 0")
    return bits / 8.0


@dataclass(frozen=True)
class Trace:
    """Rates in bytes/s: `rates[i]` holds from `starts[i]` (starts[0] = 0) until the next start."""

    starts: tuple[float, ...]
    rates: tuple[float, ...]
    spec: str = ""

    def __post_init__(self) -> None:
        if not self.starts or self.starts[0] != 0.0 or len(self.starts) != len(self.rates):
            raise TraceError("a trace needs rates from t = 0")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:])) or min(self.rates) <= 0:
            raise TraceError("trace times must increase and rates be > 0")
        cumulative = [0.0]
        for i in range(1, len(self.starts)):
            cumulative.append(cumulative[-1] + self.rates[i - 1] * (self.starts[i] - self.starts[i - 1]))
        object.__setattr__(self, "_cumulative", tuple(cumulative))

    def rate(self, t: float) -> float:
        return self.rates[max(0, bisect.bisect_right(self.starts, t) - 1)]

    def bytes_until(self, t: float) -> float:
        """Bytes a link following the trace sends in [0, t]."""
        if t <= 0:
            return 0.0
        i = bisect.bisect_right(self.starts, t) - 1
        return self._cumulative[i] + self.rates[i] * (t - self.starts[i])

    def time_at(self, t0: float, n_bytes: float) -> float:
        """The time at which `n_bytes` sent from `t0` on are through."""
        target = self.bytes_until(max(t0, 0.0)) + n_bytes
        i = bisect.bisect_right(self._cumulative, target) - 1
        i = min(max(i, 0), len(self.starts) - 1)
        return max(t0, self.starts[i] + (target - self._cumulative[i]) / self.rates[i])

    def mean_rate(self, t0: float, t1: float) -> float:
        return (self.bytes_until(t1) - self.bytes_until(t0)) / (t1 - t0) if t1 > t0 else self.rate(t0)


def _options(parts: list[str], allowed: dict[str, str]) -> dict[str, str]:
    out = dict(allowed)
    for part in parts:
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in allowed:
            raise TraceError(f"bad trace option {part!r}; options: {', '.join(f'{k}=' for k in allowed)}")
        out[name.strip()] = value.strip()
    return out


def _seconds(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("s"))
    except ValueError:
        raise TraceError(f"bad time {text!r}: seconds, e.g. 1.5") from None
    if not (value > 0 and math.isfinite(value)):
        raise TraceError(f"time {text!r} must be > 0")
    return value


def parse_trace(spec: str) -> Trace:
    """A Trace from `constant:R`, `step:R1,R2,T`, `walk:R[,seed=..,every=..,sigma=..,min=..,max=..]` or
    `file:PATH`."""
    kind, sep, rest = spec.strip().partition(":")
    if not sep:
        raise TraceError(f"bad trace {spec!r}: use constant:40mbit, step:40mbit,4mbit,1.5, walk:20mbit "
                         "or file:PATH")
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if kind == "constant" and len(parts) == 1:
        return Trace((0.0,), (parse_rate(parts[0]),), spec)
    if kind == "step" and len(parts) == 3:
        return Trace((0.0, _seconds(parts[2])), (parse_rate(parts[0]), parse_rate(parts[1])), spec)
    if kind == "walk" and parts and "=" not in parts[0]:
        mean = parse_rate(parts[0])
        opts = _options(parts[1:], {"seed": "0", "every": "0.25", "sigma": "0.35", "min": "", "max": ""})
        every, sigma = _seconds(opts["every"]), float(opts["sigma"])
        low = parse_rate(opts["min"]) if opts["min"] else mean / 10
        high = parse_rate(opts["max"]) if opts["max"] else mean * 4
        rng = random.Random(int(opts["seed"]))
        starts, rates, log_rate = [], [], math.log(mean)
        for step in range(int(WALK_HORIZON_S / every)):
            starts.append(step * every)
            rates.append(min(high, max(low, math.exp(log_rate))))
            log_rate += rng.gauss(0.0, sigma) + 0.2 * (math.log(mean) - log_rate)  # mean-reverting
        return Trace(tuple(starts), tuple(rates), spec)
    if kind == "file" and rest.strip():
        path = Path(rest.strip()).expanduser()
        try:
            lines = [line.split() for line in path.read_text().splitlines()
                     if line.strip() and not line.startswith("#")]
        except OSError as exc:
            raise TraceError(f"cannot read trace file {path}: {exc.strerror or exc}") from None
        if not lines or any(len(line) != 2 for line in lines):
            raise TraceError(f"trace file {path}: expected lines 'SECONDS RATE', e.g. '0 40mbit'")
        try:
            starts = tuple(float(line[0]) for line in lines)
        except ValueError:
            raise TraceError(f"trace file {path}: bad time in {lines}") from None
        return Trace(starts, tuple(parse_rate(line[1]) for line in lines), spec)
    raise TraceError(f"bad trace {spec!r}: use constant:40mbit, step:40mbit,4mbit,1.5, walk:20mbit "
                     "or file:PATH")
