"""An HDR-style latency histogram: bounded relative error, fixed memory, O(1) record.

Durations are recorded in seconds into log-linear buckets: every power of two
between :data:`LOWEST` (1 us) and :data:`HIGHEST` (1 hour) is split into
:data:`SUB_BUCKETS` (128) equal-width sub-buckets. A bucket is at most 1/128 of
its lower bound wide, and a percentile is reported as its bucket's midpoint, so
it is within 0.4% of the value it stands for (well inside the 1% promised); the
lowest and highest ranks are exact (``min`` and ``max``).
The layout is fixed (4096 counters), so memory does not depend on how many
values were recorded and any two histograms can be merged.

Values outside ``[LOWEST, HIGHEST]`` (including 0, negatives and infinity) are
clamped into the range and counted in :attr:`Histogram.clamped`; NaN is refused.
``min``, ``max`` and ``mean`` are exact (over the clamped values); percentiles
are clamped into ``[min, max]``, so ``percentile(100) == max``.

An empty histogram reports 0.0 for every percentile, ``min``, ``max`` and
``mean``: that keeps summaries valid JSON (NaN is not) and is unambiguous next to
``count == 0``.

Pure: no trio, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

__all__ = ["HIGHEST", "LOWEST", "SUB_BUCKETS", "SUMMARY_PERCENTILES", "Histogram"]

LOWEST: Final = 1e-6  # seconds: 1 us
HIGHEST: Final = 3600.0  # seconds: 1 hour
SUB_BUCKETS: Final = 128  # linear sub-buckets per power of two

#: The percentiles (and their ``summary_ms`` keys) reported by :meth:`Histogram.summary_ms`.
SUMMARY_PERCENTILES: Final[tuple[tuple[str, float], ...]] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)

# math.frexp(v) -> (m, e) with v == m * 2**e and 0.5 <= m < 1. The bucket of v is
# (e - _E_MIN) * SUB_BUCKETS + int((m - 0.5) * 2 * SUB_BUCKETS), folded below into
# e * SUB_BUCKETS + int(m * 2 * SUB_BUCKETS) - _OFFSET.
_E_MIN: Final = math.frexp(LOWEST)[1]
_E_MAX: Final = math.frexp(HIGHEST)[1]
_SCALE: Final = 2 * SUB_BUCKETS
_OFFSET: Final = _E_MIN * SUB_BUCKETS + SUB_BUCKETS
_N_BUCKETS: Final = (_E_MAX - _E_MIN + 1) * SUB_BUCKETS


def _index(value: float) -> int:
    m, e = math.frexp(value)
    return e * SUB_BUCKETS + int(m * _SCALE) - _OFFSET


def _midpoint(index: int) -> float:
    e, sub = divmod(index, SUB_BUCKETS)
    return math.ldexp(0.5 + (sub + 0.5) / _SCALE, e + _E_MIN)


class Histogram:
    """Durations in seconds, in log-linear buckets (see the module docstring)."""

    __slots__ = ("_count", "_counts", "_max", "_min", "_sum", "clamped")

    def __init__(self) -> None:
        self._counts: list[int] = [0] * _N_BUCKETS
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf
        #: How many recorded values were outside [LOWEST, HIGHEST] and were clamped.
        self.clamped = 0

    def record(self, value: float) -> None:
        """Record one duration in seconds. O(1).

        Raises:
            ValueError: ``value`` is NaN.
        """
        if not LOWEST <= value <= HIGHEST:
            if math.isnan(value):
                raise ValueError("cannot record NaN")
            self.clamped += 1
            value = LOWEST if value < LOWEST else HIGHEST
        m, e = math.frexp(value)
        self._counts[e * SUB_BUCKETS + int(m * _SCALE) - _OFFSET] += 1
        self._count += 1
        self._sum += value
        if value < self._min:
            self._min = value
        if value > self._max:
            self._max = value

    @property
    def count(self) -> int:
        return self._count

    @property
    def min(self) -> float:
        """The smallest recorded (clamped) value; 0.0 if empty."""
        return self._min if self._count else 0.0

    @property
    def max(self) -> float:
        """The largest recorded (clamped) value; 0.0 if empty."""
        return self._max if self._count else 0.0

    @property
    def mean(self) -> float:
        """The exact mean of the recorded (clamped) values; 0.0 if empty."""
        return self._sum / self._count if self._count else 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100, nearest rank) in seconds; 0.0 if empty.

        Within 0.4% of the exact nearest-rank value of the recorded values.

        Raises:
            ValueError: ``q`` is not within 0..100.
        """
        return self.percentiles((q,))[0]

    def percentiles(self, qs: Sequence[float]) -> list[float]:
        """Several percentiles in one pass over the buckets (same rules as :meth:`percentile`)."""
        for q in qs:
            if not 0.0 <= q <= 100.0:
                raise ValueError(f"percentile must be within 0..100, got {q!r}")
        if not self._count:
            return [0.0 for _ in qs]
        # Nearest rank: the smallest value with at least q% of the values at or below it.
        # The first and last ranks are known exactly (min and max); others are midpoints.
        n = self._count
        ranks = [max(1, math.ceil(q * n / 100.0)) for q in qs]
        out = [self._min if r == 1 else self._max if r >= n else 0.0 for r in ranks]
        order = sorted((i for i, r in enumerate(ranks) if 1 < r < n), key=ranks.__getitem__)
        if not order:
            return out
        counts = self._counts
        lo, hi = _index(self._min), _index(self._max)
        cumulative = 0
        pos = 0
        for index in range(lo, hi + 1):
            cumulative += counts[index]
            while pos < len(order) and ranks[order[pos]] <= cumulative:
                out[order[pos]] = min(max(_midpoint(index), self._min), self._max)
                pos += 1
            if pos == len(order):
                break
        return out

    def merge(self, other: Histogram) -> None:
        """Add every value recorded in ``other`` to this histogram."""
        counts = self._counts
        for index, n in enumerate(other._counts):
            if n:
                counts[index] += n
        self._count += other._count
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)
        self.clamped += other.clamped

    def summary_ms(self) -> dict[str, float]:
        """p50, p90, p99, p99.9, max and mean in milliseconds, and count."""
        names = [name for name, _ in SUMMARY_PERCENTILES]
        values = self.percentiles([q for _, q in SUMMARY_PERCENTILES])
        summary = {name: value * 1000.0 for name, value in zip(names, values, strict=True)}
        summary["max"] = self.max * 1000.0
        summary["mean"] = self.mean * 1000.0
        summary["count"] = float(self._count)
        return summary

    def __repr__(self) -> str:
        if not self._count:
            return "Histogram(count=0)"
        p50, p99 = self.percentiles((50.0, 99.0))
        return (
            f"Histogram(count={self._count}, min={self.min:.6g}, p50={p50:.6g}, "
            f"p99={p99:.6g}, max={self.max:.6g})"
        )
