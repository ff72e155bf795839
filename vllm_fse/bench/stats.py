"""Paired A/B statistics for interleaved benchmark repeats (standard library only).

Each repeat measures arm A and arm B back to back, so the machine's slow drifts hit both.
The effect is estimated on the paired ratios ``b_i / a_i``: the delta is their geometric mean
minus one, with a two-sided 95% Student-t interval on the mean log ratio. A delta whose
interval contains zero is reported as noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t, by degrees of freedom 1..30; above that the normal's.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


@dataclass(frozen=True)
class PairedDelta:
    """B relative to A over ``n`` paired repeats; percentages are ``100 * (B/A - 1)``."""

    n: int
    median_a: float
    median_b: float
    min_a: float
    max_a: float
    min_b: float
    max_b: float
    delta_pct: float
    ci_low_pct: float | None  # None with a single pair: no interval
    ci_high_pct: float | None

    @property
    def significant(self) -> bool:
        """The 95% interval excludes zero."""
        if self.ci_low_pct is None or self.ci_high_pct is None:
            return False
        return self.ci_low_pct > 0 or self.ci_high_pct < 0

    def verdict(self, lower_is_better: bool) -> str:
        """``better``, ``worse`` or ``noise`` (interval contains zero, or one pair only)."""
        if not self.significant:
            return "noise"
        improved = self.delta_pct < 0 if lower_is_better else self.delta_pct > 0
        return "better" if improved else "worse"

    def ci_text(self) -> str:
        if self.ci_low_pct is None:
            return f"n={self.n}, no CI"
        return f"[{_bounded(self.ci_low_pct)}, {_bounded(self.ci_high_pct)}]"


def _bounded(pct: float) -> str:
    """A percentage for a table; intervals of a few noisy pairs can span orders of magnitude."""
    return ">+999%" if pct > 999 else f"{pct:+.1f}%"


def paired_delta(a: Sequence[float], b: Sequence[float]) -> PairedDelta:
    """Compare paired measurements ``a[i]``, ``b[i]`` (same repeat, both positive)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("no paired samples")
    if min(a) <= 0 or min(b) <= 0:
        raise ValueError(f"ratios need positive values, got a={list(a)} b={list(b)}")
    logs = [math.log(y / x) for x, y in zip(a, b)]
    mean = statistics.fmean(logs)
    low = high = None
    if len(logs) > 1:
        half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
        low, high = _pct(mean - half), _pct(mean + half)
    return PairedDelta(
        n=len(a),
        median_a=statistics.median(a),
        median_b=statistics.median(b),
        min_a=min(a),
        max_a=max(a),
        min_b=min(b),
        max_b=max(b),
        delta_pct=_pct(mean),
        ci_low_pct=low,
        ci_high_pct=high,
    )


def _pct(log_ratio: float) -> float:
    return 100.0 * (math.exp(log_ratio) - 1.0)


@dataclass(frozen=True)
class ProportionDelta:
    """Accuracy of B minus accuracy of A on the same samples, with the paired standard error."""

    n: int
    acc_a: float
    acc_b: float
    stderr_a: float
    stderr_b: float
    delta: float
    stderr_delta: float

    @property
    def within_stderr(self) -> bool:
        """|delta| within two paired standard errors (exactly zero when the error is zero)."""
        if self.stderr_delta == 0:
            return self.delta == 0
        return abs(self.delta) <= 2 * self.stderr_delta


def paired_proportion_delta(a: Sequence[float], b: Sequence[float]) -> ProportionDelta:
    """Per-sample scores (0/1 or in [0, 1]) of two arms on the same items, in the same order."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    if n < 2:
        raise ValueError(f"need at least two samples, got {n}")
    diffs = [y - x for x, y in zip(a, b)]
    return ProportionDelta(
        n=n,
        acc_a=statistics.fmean(a),
        acc_b=statistics.fmean(b),
        stderr_a=statistics.stdev(a) / math.sqrt(n),
        stderr_b=statistics.stdev(b) / math.sqrt(n),
        delta=statistics.fmean(diffs),
        stderr_delta=statistics.stdev(diffs) / math.sqrt(n),
    )


@dataclass(frozen=True)
class GroupRatio:
    """Group B's geometric mean over group A's, one value per independent unit (an engine)."""

    n_a: int
    n_b: int
    ratio: float
    ci_low: float | None  # None with fewer than two values in a group: no interval
    ci_high: float | None
    spread_a_pct: float | None  # standard deviation of a group's log values, in percent
    spread_b_pct: float | None

    @property
    def significant(self) -> bool:
        return self.ci_low is not None and (self.ci_low > 1 or self.ci_high < 1)

    def ci_text(self) -> str:
        if self.ci_low is None:
            return f"n={self.n_a}+{self.n_b}, no CI"
        return f"[{self.ci_low:.3f}, {self.ci_high:.3f}]"


def group_ratio(a: Sequence[float], b: Sequence[float]) -> GroupRatio:
    """Compare two groups of independent positive values (e.g. per-engine median step times):
    the ratio of geometric means with a Welch 95% interval on the difference of mean logs, so
    the unit-to-unit variation (engines of the same configuration that run at different speeds)
    is inside the interval."""
    if not a or not b:
        raise ValueError(f"each group needs a value, got {len(a)} and {len(b)}")
    if min(a) <= 0 or min(b) <= 0:
        raise ValueError(f"ratios need positive values, got a={list(a)} b={list(b)}")
    la, lb = [math.log(x) for x in a], [math.log(x) for x in b]
    diff = statistics.fmean(lb) - statistics.fmean(la)
    spread_a = statistics.stdev(la) if len(la) > 1 else None
    spread_b = statistics.stdev(lb) if len(lb) > 1 else None
    low = high = None
    if spread_a is not None and spread_b is not None:
        va, vb = spread_a**2 / len(la), spread_b**2 / len(lb)
        se = math.sqrt(va + vb)
        if se == 0:
            low = high = math.exp(diff)
        else:
            df = (va + vb) ** 2 / (va**2 / (len(la) - 1) + vb**2 / (len(lb) - 1))
            half = t975(max(1, math.floor(df))) * se
            low, high = math.exp(diff - half), math.exp(diff + half)
    return GroupRatio(
        n_a=len(a),
        n_b=len(b),
        ratio=math.exp(diff),
        ci_low=low,
        ci_high=high,
        spread_a_pct=None if spread_a is None else 100 * spread_a,
        spread_b_pct=None if spread_b is None else 100 * spread_b,
    )
