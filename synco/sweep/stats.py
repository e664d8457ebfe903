"""Aggregation maths of a sweep: mean, sample standard deviation and a Student-t confidence interval
per point, and paired differences between two levels over the seeds they share. Pure Python plus
``scipy.stats.t`` for the quantile (no torch, no numpy arrays needed).

Conventions:

* ``std`` is the sample standard deviation (ddof=1); with one value it is undefined (NaN).
* The 95 % CI of a mean is ``mean ± t(0.975, n-1) · std / sqrt(n)``; with n < 2 it is NaN, and the
  formatters print ``n/a``.
* A paired difference ``a − b`` uses only the seeds present in both, ``d_s = a_s − b_s``, and the
  same formulas on the ``d_s`` (a paired t interval: the seed-to-seed variation shared by the two
  levels cancels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Optional

NAN = float("nan")


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (NaN when df < 1)."""
    if df < 1:
        return NAN
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass
class Stats:
    n: int
    mean: float
    std: float  # ddof=1
    ci_low: float
    ci_high: float
    confidence: float = 0.95
    values: list = field(default_factory=list)

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["half_width"] = self.half_width
        return {k: _json_number(v) for k, v in d.items()}


@dataclass
class PairedStats(Stats):
    seeds: list = field(default_factory=list)  # the seeds common to both levels, in order


def _json_number(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_number(x) for x in v]
    return v


def _finite(values: Iterable) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def describe(values: Iterable, confidence: float = 0.95) -> Stats:
    """Mean, std (ddof=1) and the Student-t CI of the mean of ``values`` (None/NaN entries are dropped)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return Stats(0, NAN, NAN, NAN, NAN, confidence, [])
    mean = math.fsum(xs) / n
    if n == 1:
        return Stats(1, mean, NAN, NAN, NAN, confidence, xs)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Stats(n, mean, std, mean - half, mean + half, confidence, xs)


def paired_difference(a: Mapping, b: Mapping, confidence: float = 0.95) -> PairedStats:
    """``a − b`` over the seeds (keys) present, with a finite value, in both mappings ``seed -> value``."""
    seeds = sorted(s for s in a if s in b and _finite([a[s]]) and _finite([b[s]]))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    s = describe(diffs, confidence)
    return PairedStats(s.n, s.mean, s.std, s.ci_low, s.ci_high, confidence, s.values, seeds)


# ---------------------------------------------------------------------------------------------
# Formatting


def fmt_number(v: Optional[float], digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def fmt_stats(s: Stats, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std [lo, hi]``; ``n/a`` for what n does not allow (n=1: ``x ± n/a [n/a]``)."""
    if s.n == 0:
        return "n/a"
    mean = f"{s.mean:+.{digits}f}" if signed else fmt_number(s.mean, digits)
    if s.n < 2:
        return f"{mean} ± n/a [n/a]"
    return f"{mean} ± {fmt_number(s.std, digits)} [{fmt_number(s.ci_low, digits)}, {fmt_number(s.ci_high, digits)}]"


def guess_digits(values: Iterable) -> int:
    """2 decimals for percentages and losses, more for small numbers such as cosines near 0."""
    xs = [abs(v) for v in _finite(values)]
    if not xs or max(xs) >= 1:
        return 2
    return 3
