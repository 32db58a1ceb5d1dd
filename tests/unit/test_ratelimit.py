"""Pure tests of proxycore.security.ratelimit: per-key token buckets and concurrency limits.

The clock is always passed explicitly as ``now`` (seconds)."""

from __future__ import annotations

import math
import random

import pytest

from proxycore.security.ratelimit import ConcurrencyLimit, TokenBucket

# =========================================================================== TokenBucket


def test_burst_then_refusal() -> None:
    bucket = TokenBucket(rate=5, burst=3)
    assert [bucket.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a", 0.0) > 0.0


def test_retry_after_value() -> None:
    bucket = TokenBucket(rate=5, burst=1)
    assert bucket.take("a", 0.0) == 0.0
    assert bucket.take("a", 0.0) == pytest.approx(0.2)
    assert bucket.take("a", 0.05) == pytest.approx(0.15)
    # a refused take consumes nothing: the wait keeps shrinking with time
    assert bucket.take("a", 0.1) == pytest.approx(0.1)
    assert bucket.take("a", 0.2) == 0.0
    assert bucket.take("a", 0.2) == pytest.approx(0.2)


def test_retry_after_slow_rate_for_header() -> None:
    bucket = TokenBucket(rate=0.5, burst=1)
    bucket.take("a", 100.0)
    wait = bucket.take("a", 100.5)
    assert wait == pytest.approx(1.5)
    assert max(1, math.ceil(wait)) == 2


def test_waiting_the_returned_delay_succeeds() -> None:
    rng = random.Random(7)
    for _ in range(200):
        rate = rng.uniform(0.01, 1000.0)
        bucket = TokenBucket(rate=rate, burst=rng.randint(1, 5))
        now = rng.uniform(0.0, 1e6)
        while (wait := bucket.take("k", now)) == 0.0:
            pass
        now += wait
        assert bucket.take("k", now) == 0.0


def test_refill_over_time() -> None:
    bucket = TokenBucket(rate=2, burst=4)
    for _ in range(4):
        assert bucket.take("a", 10.0) == 0.0
    assert bucket.take("a", 10.0) == pytest.approx(0.5)
    # one second later: two tokens back
    assert bucket.take("a", 11.0) == 0.0
    assert bucket.take("a", 11.0) == 0.0
    assert bucket.take("a", 11.0) == pytest.approx(0.5)


def test_refill_capped_at_burst() -> None:
    bucket = TokenBucket(rate=10, burst=2)
    assert bucket.take("a", 0.0) == 0.0
    # a long idle time refills to burst, not beyond
    results = [bucket.take("a", 1000.0) for _ in range(3)]
    assert results[:2] == [0.0, 0.0]
    assert results[2] == pytest.approx(0.1)


def test_steady_rate() -> None:
    bucket = TokenBucket(rate=10, burst=1)
    allowed = sum(bucket.take("a", t / 100) == 0.0 for t in range(1000))  # 100 Hz for 10 s
    assert allowed == pytest.approx(100, abs=1)


def test_clock_going_backwards_does_not_refill() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    assert bucket.take("a", 50.0) == 0.0
    assert bucket.take("a", 49.0) > 0.0
    assert bucket.take("a", 50.5) == pytest.approx(0.5)
    assert bucket.take("a", 51.0) == 0.0


def test_keys_independent() -> None:
    bucket = TokenBucket(rate=1, burst=2)
    assert bucket.take("a", 0.0) == 0.0
    assert bucket.take("a", 0.0) == 0.0
    assert bucket.take("a", 0.0) > 0.0
    assert bucket.take("b", 0.0) == 0.0
    assert bucket.take("b", 0.0) == 0.0
    assert bucket.take("b", 0.0) > 0.0
    assert bucket.take("c", 0.0) == 0.0


def test_idle_keys_forgotten_without_pressure() -> None:
    bucket = TokenBucket(rate=1, burst=2)
    for i in range(50):
        bucket.take(f"k{i}", 0.0)
    assert len(bucket) == 50
    # once refilled, keys are dropped a few per call
    for i in range(50):
        bucket.take("other", 100.0 + i)
    assert len(bucket) == 1


def test_max_keys_evicts_idle_keys_oldest_first() -> None:
    bucket = TokenBucket(rate=1, burst=1, max_keys=3)
    assert bucket.take("a", 0.0) == 0.0  # full again at 1.0
    assert bucket.take("b", 0.5) == 0.0  # full again at 1.5
    assert bucket.take("c", 0.9) == 0.0  # full again at 1.9
    assert len(bucket) == 3
    assert bucket.take("d", 1.6) == 0.0  # a and b are idle: the oldest goes first
    assert len(bucket) <= 3
    # c is still tracked (and still empty): it was not evicted
    assert bucket.take("c", 1.6) == pytest.approx(0.3)
    assert bucket.take("d", 1.6) > 0.0


def test_eviction_is_lossless() -> None:
    bucket = TokenBucket(rate=1, burst=3, max_keys=1)
    assert bucket.take("a", 0.0) == 0.0
    assert bucket.take("b", 5.0) == 0.0  # a is idle: evicted
    # a comes back with a full bucket, exactly as if it had been kept
    assert [bucket.take("a", 10.0) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_max_keys_fails_closed_when_none_idle() -> None:
    bucket = TokenBucket(rate=1, burst=2, max_keys=2)
    assert bucket.take("a", 0.0) == 0.0  # 1 token left: full again at 1.0
    assert bucket.take("b", 0.0) == 0.0
    assert bucket.take("b", 0.0) == 0.0  # empty: full again at 2.0
    wait = bucket.take("new", 0.5)
    assert wait == pytest.approx(0.5)  # until "a" is idle
    assert len(bucket) == 2
    # known keys keep working meanwhile
    assert bucket.take("a", 0.5) == 0.0
    # a took a token: now nothing is idle before 2.0 ("b"); the refusal goes on
    assert bucket.take("new", 1.2) > 0.0
    assert bucket.take("new", 2.0) == 0.0


def test_table_full_of_active_keys_stays_bounded() -> None:
    bucket = TokenBucket(rate=1, burst=1, max_keys=100)
    refused = 0
    for i in range(1000):
        if bucket.take(f"k{i}", i * 0.001) > 0.0:
            refused += 1
        assert len(bucket) <= 100
    assert refused == 900


def test_many_keys_over_time_stay_bounded() -> None:
    rng = random.Random(3)
    bucket = TokenBucket(rate=10, burst=5, max_keys=50)
    now = 0.0
    for _ in range(20_000):
        now += rng.expovariate(2000)
        bucket.take(f"k{rng.randrange(1000)}", now)
        assert len(bucket) <= 50


@pytest.mark.parametrize(
    ("rate", "burst", "max_keys"),
    [
        (0, 1, 10),
        (-1, 1, 10),
        (math.inf, 1, 10),
        (math.nan, 1, 10),
        (1, 0, 10),
        (1, 1.5, 10),
        (1, True, 10),
        (1, 1, 0),
    ],
)
def test_token_bucket_invalid(rate: float, burst: int, max_keys: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, max_keys=max_keys)


# =========================================================================== ConcurrencyLimit


def test_acquire_until_limit_then_release() -> None:
    limit = ConcurrencyLimit(2)
    assert limit.acquire("a")
    assert limit.acquire("a")
    assert not limit.acquire("a")
    assert limit.active("a") == 2  # a refused acquire counts nothing
    limit.release("a")
    assert limit.active("a") == 1
    assert limit.acquire("a")
    assert not limit.acquire("a")


def test_concurrency_keys_independent() -> None:
    limit = ConcurrencyLimit(1)
    assert limit.acquire("a")
    assert not limit.acquire("a")
    assert limit.acquire("b")
    assert limit.active("a") == limit.active("b") == 1
    assert limit.active("c") == 0


def test_release_never_negative() -> None:
    limit = ConcurrencyLimit(1)
    limit.release("never-acquired")
    assert limit.active("never-acquired") == 0
    assert limit.acquire("a")
    limit.release("a")
    limit.release("a")
    assert limit.active("a") == 0
    # the extra release did not buy an extra slot
    assert limit.acquire("a")
    assert not limit.acquire("a")


def test_memory_freed_at_zero() -> None:
    limit = ConcurrencyLimit(3)
    for i in range(100):
        assert limit.acquire(f"k{i}")
        assert limit.acquire(f"k{i}")
    assert len(limit) == 100
    for i in range(100):
        limit.release(f"k{i}")
    assert len(limit) == 100
    for i in range(100):
        limit.release(f"k{i}")
    assert len(limit) == 0
    limit.release("k0")
    assert len(limit) == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_concurrency_invalid(bad: int) -> None:
    with pytest.raises(ValueError):
        ConcurrencyLimit(bad)


def test_concurrency_limit_property() -> None:
    assert ConcurrencyLimit(7).limit == 7
