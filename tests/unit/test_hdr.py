"""proxycore.tools.hdr.Histogram against an exact sorted reference (nearest-rank percentiles)."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxycore.tools.hdr import HIGHEST, LOWEST, SUB_BUCKETS, Histogram

QUANTILES = (0.0, 1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 99.9, 99.99, 100.0)


def exact(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% at or below it."""
    rank = max(1, math.ceil(q * len(sorted_values) / 100.0))
    return sorted_values[rank - 1]


def filled(values: list[float]) -> Histogram:
    h = Histogram()
    for v in values:
        h.record(v)
    return h


def assert_close(got: float, want: float, rel: float = 0.01) -> None:
    assert abs(got - want) <= rel * want, f"{got} vs {want}"


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_within_one_percent_of_exact(seed: int) -> None:
    rng = random.Random(seed)
    # Latency-like: log-normal around 2 ms, spanning us to seconds, plus a slow tail.
    values = [rng.lognormvariate(math.log(0.002), 1.5) for _ in range(20_000)]
    values += [rng.uniform(0.5, 30.0) for _ in range(200)]
    values = [min(max(v, LOWEST), HIGHEST) for v in values]
    h = filled(values)
    ref = sorted(values)
    for q in QUANTILES:
        assert_close(h.percentile(q), exact(ref, q))
    assert h.count == len(values)
    assert h.min == ref[0]
    assert h.max == ref[-1]
    assert h.mean == pytest.approx(sum(values) / len(values), rel=1e-9)
    assert h.clamped == 0


@given(
    st.lists(
        st.floats(min_value=LOWEST, max_value=HIGHEST, allow_nan=False), min_size=1, max_size=300
    ),
    st.floats(min_value=0.0, max_value=100.0),
)
def test_any_data_any_quantile(values: list[float], q: float) -> None:
    h = filled(values)
    assert_close(h.percentile(q), exact(sorted(values), q))


def test_resolution_is_bounded_by_the_bucket_layout() -> None:
    # The middle of three values is reported as its bucket's midpoint: within half a
    # bucket, 1/(2 * SUB_BUCKETS) of the value, anywhere in the range.
    rng = random.Random(7)
    for _ in range(500):
        v = math.exp(rng.uniform(math.log(LOWEST), math.log(HIGHEST)))
        h = filled([LOWEST, v, HIGHEST])
        assert_close(h.percentile(50), v, rel=1 / (2 * SUB_BUCKETS))


def test_lowest_and_highest_ranks_are_exact() -> None:
    h = filled([0.0012345, 0.5, 0.0456789])
    assert h.percentile(0) == h.percentile(33.3) == 0.0012345
    assert h.percentile(100) == h.percentile(66.7) == 0.5


def test_percentiles_are_monotonic_and_bounded() -> None:
    rng = random.Random(3)
    h = filled([rng.expovariate(100.0) + LOWEST for _ in range(5000)])
    qs = [i / 10 for i in range(1001)]
    got = h.percentiles(qs)
    assert got == sorted(got)
    assert got[0] == h.min
    assert got[-1] == h.max
    assert [h.percentile(q) for q in (50.0, 99.0)] == h.percentiles([50.0, 99.0])


def test_merge_equals_recording_everything() -> None:
    rng = random.Random(11)
    a_values = [rng.uniform(0.0001, 0.01) for _ in range(3000)]
    b_values = [rng.uniform(0.005, 2.0) for _ in range(1000)] + [0.0, 1e9]
    a, b = filled(a_values), filled(b_values)
    both = filled(a_values + b_values)
    a.merge(b)
    assert a.count == both.count == 4002
    assert a.clamped == both.clamped == 2
    assert (a.min, a.max) == (both.min, both.max)
    assert a.mean == pytest.approx(both.mean)
    assert a.percentiles(QUANTILES) == both.percentiles(QUANTILES)
    assert b.count == 1002  # the merged-in histogram is unchanged


def test_merge_with_empty_either_way() -> None:
    h = filled([0.001, 0.002])
    h.merge(Histogram())
    assert (h.count, h.min, h.max) == (2, 0.001, 0.002)
    empty = Histogram()
    empty.merge(h)
    assert (empty.count, empty.min, empty.max) == (2, 0.001, 0.002)
    assert empty.percentile(100) == 0.002


def test_empty_histogram_reports_zero() -> None:
    h = Histogram()
    assert h.count == 0
    assert (h.min, h.max, h.mean) == (0.0, 0.0, 0.0)
    assert h.percentile(0) == h.percentile(50) == h.percentile(100) == 0.0
    summary = h.summary_ms()
    assert summary == {
        "p50": 0.0,
        "p90": 0.0,
        "p99": 0.0,
        "p99.9": 0.0,
        "max": 0.0,
        "mean": 0.0,
        "count": 0.0,
    }
    json.dumps(summary, allow_nan=False)  # valid JSON: no NaN anywhere
    assert repr(h) == "Histogram(count=0)"


def test_out_of_range_values_are_clamped_and_counted() -> None:
    h = Histogram()
    for v in (0.0, -1.0, 1e-9, -math.inf):
        h.record(v)
    assert h.min == h.max == LOWEST
    assert h.percentile(50) == LOWEST
    for v in (HIGHEST * 2, math.inf):
        h.record(v)
    assert h.max == HIGHEST
    assert h.percentile(100) == HIGHEST
    assert h.clamped == 6
    assert h.count == 6
    h.record(LOWEST)  # the bounds themselves are in range
    h.record(HIGHEST)
    assert h.clamped == 6


def test_nan_and_bad_quantiles_are_refused() -> None:
    h = filled([0.001])
    with pytest.raises(ValueError, match="NaN"):
        h.record(math.nan)
    assert h.count == 1
    for q in (-0.1, 100.1, math.nan):
        with pytest.raises(ValueError, match="percentile"):
            h.percentile(q)


def test_summary_ms() -> None:
    h = filled([i / 1000 for i in range(1, 1001)])  # 1 ms .. 1000 ms
    s = h.summary_ms()
    assert list(s) == ["p50", "p90", "p99", "p99.9", "max", "mean", "count"]
    assert_close(s["p50"], 500.0)
    assert_close(s["p90"], 900.0)
    assert_close(s["p99"], 990.0)
    assert_close(s["p99.9"], 999.0)
    assert s["max"] == pytest.approx(1000.0)
    assert s["mean"] == pytest.approx(500.5)
    assert s["count"] == 1000.0


def test_memory_does_not_grow_with_samples() -> None:
    h = Histogram()
    before = len(h._counts)
    for i in range(100_000):
        h.record((i % 977 + 1) * 1e-5)
    assert len(h._counts) == before
