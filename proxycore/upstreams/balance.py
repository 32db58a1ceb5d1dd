"""The four ways to choose an upstream among candidates. Pure (no I/O, no clock).

Every mode honours weights:

- ``least_connections``: the fewest active streams per unit of weight; ties
  broken by smooth weighted round robin, so an idle group still spreads.
- ``round_robin``: nginx's smooth weighted round robin (weights 5,1,1 give
  ``a a b a c a a``: the heavy one spread out, not in a burst).
- ``random_two``: two candidates drawn by weight, the one with fewer active
  streams per weight wins (power of two choices).
- ``hash``: a consistent-hash ring with ``VNODES`` points per unit of weight;
  a key goes to the first candidate clockwise from its point, so adding or
  removing an upstream moves only the keys of its own points.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import Final, Protocol

__all__ = ["VNODES", "Candidate", "HashRing", "least_connections", "random_two", "smooth_wrr"]

#: Ring points per unit of weight (Envoy's ring_hash uses 1024 in all by default).
VNODES: Final = 160


class Candidate(Protocol):
    """What the balancers read and write of an upstream."""

    weight: int
    #: Streams open on it now.
    active: int
    #: Smooth weighted round robin's running score.
    current: int


def smooth_wrr(candidates: Sequence[Candidate]) -> Candidate:
    """nginx's smooth weighted round robin over ``candidates`` (not empty)."""
    total = 0
    best: Candidate | None = None
    for c in candidates:
        c.current += c.weight
        total += c.weight
        if best is None or c.current > best.current:
            best = c
    assert best is not None
    best.current -= total
    return best


def least_connections(candidates: Sequence[Candidate]) -> Candidate:
    """The fewest active streams per weight; ties by smooth weighted round robin."""
    if len(candidates) == 1:
        return candidates[0]
    low = min(c.active / c.weight for c in candidates)
    tied = [c for c in candidates if c.active / c.weight == low]
    return tied[0] if len(tied) == 1 else smooth_wrr(tied)


def random_two(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    """Two draws by weight; the one with fewer active streams per weight."""
    if len(candidates) == 1:
        return candidates[0]
    weights = [c.weight for c in candidates]
    first = rng.choices(range(len(candidates)), weights)[0]
    rest = [i for i in range(len(candidates)) if i != first]
    second = rng.choices(rest, [weights[i] for i in rest])[0]
    a, b = candidates[first], candidates[second]
    return b if b.active / b.weight < a.active / a.weight else a


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring over named members (``VNODES`` x weight points each)."""

    __slots__ = ("_owners", "_points")

    def __init__(self, members: Sequence[tuple[str, int]]) -> None:
        """``members``: ``(name, weight)`` pairs; lookups answer indexes into it."""
        ring = sorted(
            (_point(f"{name}#{i}".encode()), index)
            for index, (name, weight) in enumerate(members)
            for i in range(VNODES * weight)
        )
        self._points = [p for p, _ in ring]
        self._owners = [i for _, i in ring]

    def lookup(self, key: bytes, allowed: Sequence[bool]) -> int | None:
        """The first member clockwise from ``key``'s point whose ``allowed`` flag is set."""
        points, owners = self._points, self._owners
        n = len(points)
        if not n:
            return None
        start = bisect.bisect(points, _point(key))
        seen: set[int] = set()
        for step in range(n):
            owner = owners[(start + step) % n]
            if allowed[owner]:
                return owner
            seen.add(owner)
            if len(seen) == len(allowed):
                break
        return None
