"""In-process rate and concurrency limits per key. Pure module: no trio, stdlib only.

The clock is passed in (``now``, seconds, e.g. ``trio.current_time()``), which keeps the module
deterministic to test. Both classes are meant to be used from one thread (one trio run), so there
is no locking.

Several replicas
----------------
These limits are per process. With ``[state] redis`` set, each route's limits are shared by
every replica instead (:mod:`proxycore.store.limits`: the same bucket as GCRA in one Lua
script per request, concurrent streams as per-replica leases that expire), and these classes
are the fallback while the backend is away (``on_unavailable = "local"``). Without ``[state]``,
give each of N replicas ``rate / N`` (and ``burst / N``, ``limit / N``) behind an L4 balancer
that spreads one client's connections evenly: approximate, and re-tuned when N changes.
"""

from __future__ import annotations

import heapq
import itertools
import math

__all__ = ["ConcurrencyLimit", "TokenBucket"]

#: Tolerance, in tokens, for float drift: a caller that waits exactly the returned delay gets its
#: token even with a large ``now`` (the clock's absolute value costs precision).
_EPSILON = 1e-6


class TokenBucket:
    """Per-key token buckets: ``rate`` tokens/s refill, capacity ``burst``, starting full.

    A refused :meth:`take` consumes nothing (no debt). Memory is bounded: at most ``max_keys``
    keys are tracked. A key whose bucket has refilled to ``burst`` (idle) behaves exactly like an
    unknown key, so it can be forgotten at no cost: such keys are evicted a few at a time on every
    call, and on demand when the table is full, the one that has been full longest first. If the
    table is full and no key is idle, a new key is refused (fail closed: ``take`` returns the time
    until some key becomes idle) rather than letting a flood of new keys reset everyone's limits.
    Each call costs amortized O(log n).
    """

    __slots__ = ("_buckets", "_burst", "_heap", "_max_keys", "_rate", "_seq")

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of tokens per second, got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be an integer >= 1, got {max_keys!r}")
        self._rate = float(rate)
        self._burst = burst
        self._max_keys = max_keys
        #: key -> [tokens, time of last update]
        self._buckets: dict[str, list[float]] = {}
        #: (lower bound of the time the key's bucket is full again, insertion order, key); exactly
        #: one entry per tracked key. Takes only move that time later, so the bound is refreshed
        #: lazily when the entry reaches the top.
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Number of keys currently tracked."""
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """Consume one token. Returns 0.0 if allowed, else the seconds until a token is available
        (for Retry-After: the caller rounds up to an integer >= 1)."""
        self._evict(now, budget=2)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys and not self._evict(now, budget=None):
                return max(self._heap[0][0] - now, _EPSILON / self._rate)
            self._buckets[key] = [self._burst - 1.0, now]
            heapq.heappush(self._heap, (now + 1.0 / self._rate, next(self._seq), key))
            return 0.0
        tokens, last = bucket
        if now > last:
            tokens = min(float(self._burst), tokens + (now - last) * self._rate)
            bucket[1] = now
        if tokens >= 1.0 - _EPSILON:
            bucket[0] = max(tokens - 1.0, 0.0)
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self._rate

    def _full_at(self, bucket: list[float]) -> float:
        return bucket[1] + (self._burst - bucket[0]) / self._rate

    def _evict(self, now: float, budget: int | None) -> bool:
        """Forget idle keys from the top of the heap; with ``budget=None`` go on until one key
        is evicted or the top is not idle. True if a key was evicted."""
        heap = self._heap
        evicted = False
        while heap and heap[0][0] <= now and (budget is None or budget > 0):
            if budget is not None:
                budget -= 1
            _, seq, key = heap[0]
            full_at = self._full_at(self._buckets[key])
            if full_at <= now + _EPSILON / self._rate:
                heapq.heappop(heap)
                del self._buckets[key]
                evicted = True
                if budget is None:
                    break
            else:
                heapq.heapreplace(heap, (full_at, seq, key))
        return evicted


class ConcurrencyLimit:
    """At most ``limit`` concurrent streams per key.

    Only keys with at least one active stream are stored, so memory is bounded by the number of
    streams in flight. Call :meth:`release` exactly once per successful :meth:`acquire` (in a
    ``finally``); an extra release is ignored rather than letting the count go negative.
    """

    __slots__ = ("_active", "_limit")

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
        self._limit = limit
        self._active: dict[str, int] = {}

    def __len__(self) -> int:
        """Number of keys with at least one active stream."""
        return len(self._active)

    @property
    def limit(self) -> int:
        return self._limit

    def acquire(self, key: str) -> bool:
        """Count one more stream for ``key``; False (nothing counted) when it is at its limit."""
        count = self._active.get(key, 0)
        if count >= self._limit:
            return False
        self._active[key] = count + 1
        return True

    def release(self, key: str) -> None:
        """Count one stream less for ``key``; the key is dropped when it reaches 0."""
        count = self._active.get(key, 0)
        if count > 1:
            self._active[key] = count - 1
        else:
            self._active.pop(key, None)

    def active(self, key: str) -> int:
        """Streams currently counted for ``key``."""
        return self._active.get(key, 0)
