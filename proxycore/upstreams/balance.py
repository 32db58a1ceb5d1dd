"""The four ways to choose an upstream among candidates. Pure (no I/O, no clock).

Every mode honours weights:

- ``least_connections``: the fewest active streams per unit of weight; ties
  broken by smooth weighted round robin, so an idle group still spreads.
- ``round_robin``: nginx's smooth weighted round robin (weights 5,1,1 give
  ``a a b a c a a``: the heavy one spread out, not in a burst).
- ``random_two``: two candidates drawn by weight, the one with fewer active
  streams per weight wins (power of two choices).
- ``hash``: consistent hashing by weighted rendezvous (highest random weight):
  every key's share follows the weights exactly, and adding or removing an
  upstream moves only the keys that upstream wins or held (a ring's minimum,
  without a ring's uneven arcs).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Final, Protocol

__all__ = ["Candidate", "HashRing", "least_connections", "random_two", "smooth_wrr"]


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


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


_MASK: Final = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit mix of ``x``."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


class HashRing:
    """Consistent hashing by weighted rendezvous (highest random weight) over named members.

    Each member scores ``weight / -ln(u)`` for a key, ``u`` uniform in (0, 1) from the key
    and the member's name; the highest available score wins. A member's share is exactly
    its weight's share (no ring points to be unlucky with), and adding or removing one
    moves only the keys it wins or held: the minimum any consistent hash can move.
    """

    __slots__ = ("_members",)

    def __init__(self, members: Sequence[tuple[str, int]]) -> None:
        """``members``: ``(name, weight)`` pairs; lookups answer indexes into it."""
        self._members = tuple((_hash64(name.encode()), float(weight)) for name, weight in members)

    def lookup(self, key: bytes, allowed: Sequence[bool]) -> int | None:
        """The member with the highest score for ``key`` among those ``allowed``."""
        k = _hash64(key)
        best, best_score = None, -1.0
        for index, (seed, weight) in enumerate(self._members):
            if not allowed[index]:
                continue
            u = ((_mix(k ^ seed) >> 11) + 0.5) / (1 << 53)  # in (0, 1)
            score = weight / -math.log(u)
            if score > best_score:
                best, best_score = index, score
        return best
