"""An upstream group at run time: its members' state and the choice of one. Pure: the
caller passes the time (``now``, trio's clock), so every rule is testable without I/O.

A :class:`Member` is one upstream of a route with what the proxy knows of it: streams
open now, failures in a row, ejected until when, marked down by health checks, busy
(``Retry-After``) until when, and its counters for ``/metrics``. Each member is owned by
its group; a reload that keeps an upstream (same name, URL and TLS settings) hands the
same ``Member`` to the new group, so open streams, ejections and health carry over and a
removed member's open streams finish on the object they started on.

The choice (:meth:`UpstreamGroup.pick`): primaries that are available (up, not ejected,
not busy, not yet tried by this request), by the route's ``balance``; if none, backups
the same way; if none of those either, any member not yet tried (a group with every
upstream out still answers, as Envoy's panic mode does, rather than refusing).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from typing import Final

from ..config import Outlier, RetryPolicy, UpstreamSpec
from ..net.pool import Origin
from ..upstreams.balance import HashRing, least_connections, random_two, smooth_wrr

__all__ = ["BUDGET_WINDOW_S", "MIN_RETRIES", "Member", "RetryBudget", "UpstreamGroup"]

#: The retry budget looks at this many seconds of requests.
BUDGET_WINDOW_S: Final = 10
#: Retries always allowed in a window, whatever the budget (Envoy's min_retry_concurrency).
MIN_RETRIES: Final = 3
#: Longest ``Retry-After`` honoured (seconds).
MAX_RETRY_AFTER_S: Final = 3600.0


class Member:
    """One upstream of a group and what is known of it (see the module docstring)."""

    __slots__ = (
        "active",
        "busy_until",
        "consecutive",
        "current",
        "down_run",
        "eject_count",
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "origin",
        "requests",
        "retries",
        "spec",
        "up_run",
        "weight",
    )

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        target = spec.target
        self.origin = Origin(target.scheme, target.host, target.port, spec.ca_file)
        self.weight = spec.weight
        self.active = 0
        self.current = 0
        #: Attempts sent to it, failed ones, retries it received, times it was ejected.
        self.requests = self.failures = self.retries = self.ejections = 0
        self.consecutive = 0
        self.eject_count = 0
        self.ejected_until = 0.0
        self.busy_until = 0.0
        #: Active health: up until checks say otherwise; successes/failures in a row.
        self.healthy = True
        self.up_run = self.down_run = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def key(self) -> tuple[object, ...]:
        """What must be unchanged for a reload to keep this member's state."""
        return (self.spec.name, self.spec.target, self.spec.ca_file)

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now and self.busy_until <= now

    def status(self, now: float) -> str:
        """``up``, ``down`` (health checks), ``ejected`` (failures) or ``busy`` (Retry-After)."""
        if not self.healthy:
            return "down"
        if self.ejected_until > now:
            return "ejected"
        return "busy" if self.busy_until > now else "up"

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def record_check(self, ok: bool, healthy_threshold: int, unhealthy_threshold: int) -> bool:
        """One active health check's result; True if it changed ``healthy``."""
        if ok:
            self.up_run, self.down_run = self.up_run + 1, 0
            if not self.healthy and self.up_run >= healthy_threshold:
                self.healthy = True
                return True
        else:
            self.down_run, self.up_run = self.down_run + 1, 0
            if self.healthy and self.down_run >= unhealthy_threshold:
                self.healthy = False
                return True
        return False


class RetryBudget:
    """Retries may be at most ``percent`` of the requests of the last ``BUDGET_WINDOW_S``
    seconds (never fewer than ``MIN_RETRIES`` per window): one-second buckets."""

    __slots__ = ("_buckets", "percent")

    def __init__(self, percent: float) -> None:
        self.percent = percent
        #: (second, requests, retries), oldest first.
        self._buckets: deque[list[int]] = deque()

    def _bucket(self, now: float) -> list[int]:
        second = int(now)
        buckets = self._buckets
        while buckets and buckets[0][0] <= second - BUDGET_WINDOW_S:
            buckets.popleft()
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
        return buckets[-1]

    def request(self, now: float) -> None:
        self._bucket(now)[1] += 1

    def allow(self, now: float) -> bool:
        """Whether one more retry fits the budget (and counts it if so)."""
        bucket = self._bucket(now)
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        if retries >= max(MIN_RETRIES, self.percent / 100.0 * requests):
            return False
        bucket[2] += 1
        return True


class UpstreamGroup:
    """The members of one route and the rules to choose among them."""

    def __init__(
        self,
        route: str,
        specs: Sequence[UpstreamSpec],
        *,
        balance: str = "least_connections",
        retry: RetryPolicy,
        outlier: Outlier | None = None,
        checked: bool = False,
        previous: UpstreamGroup | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``checked``: active health checks run on this group (else every member is up).
        ``previous``: this route's group in the snapshot being replaced (members with the
        same key keep their state)."""
        self.route = route
        kept = {m.key(): m for m in previous.members} if previous is not None else {}
        members: list[Member] = []
        for spec in specs:
            member = Member(spec)
            old = kept.get(member.key())
            if old is not None:
                old.spec, old.weight = spec, spec.weight
                member = old
            if not checked:  # nothing would ever mark it up again
                member.healthy, member.up_run, member.down_run = True, 0, 0
            members.append(member)
        self.members: tuple[Member, ...] = tuple(members)
        self.single = members[0] if len(members) == 1 else None
        self.primaries = tuple(m for m in members if not m.spec.backup)
        self.backups = tuple(m for m in members if m.spec.backup)
        self.balance = balance
        self.retry = retry
        self.outlier = outlier
        same_budget = previous is not None and previous.retry.budget_percent == retry.budget_percent
        self.budget: RetryBudget = (
            previous.budget
            if previous is not None and same_budget
            else RetryBudget(retry.budget_percent)
        )
        self._rng = rng or random.Random()
        self._rings = (
            (HashRing([(m.name, m.weight) for m in self.primaries]), self.primaries),
            (HashRing([(m.name, m.weight) for m in self.backups]), self.backups),
        )

    def by_name(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    # -- the choice ------------------------------------------------------------

    def pick(
        self, now: float, *, key: bytes | None = None, tried: Sequence[Member] = ()
    ) -> Member | None:
        """The member for the next attempt (None: every member was tried)."""
        single = self.single
        if single is not None:
            return None if tried else single
        for ring, tier in self._rings:
            allowed = [m.available(now) and m not in tried for m in tier]
            if any(allowed):
                return self._choose(tier, allowed, key, ring)
        for ring, tier in self._rings:  # everything is out: anything not tried yet
            allowed = [m not in tried for m in tier]
            if any(allowed):
                return self._choose(tier, allowed, key, ring)
        return None

    def _choose(
        self, tier: Sequence[Member], allowed: list[bool], key: bytes | None, ring: HashRing
    ) -> Member:
        if self.balance == "hash" and key is not None:
            index = ring.lookup(key, allowed)
            if index is not None:
                return tier[index]
        candidates = [m for m, ok in zip(tier, allowed, strict=True) if ok]
        if self.balance == "round_robin":
            chosen = smooth_wrr(candidates)
        elif self.balance == "random_two":
            chosen = random_two(candidates, self._rng)
        else:  # least_connections, and hash without a key
            chosen = least_connections(candidates)
        assert isinstance(chosen, Member)
        return chosen

    # -- outcomes --------------------------------------------------------------

    def succeeded(self, member: Member, now: float) -> None:
        """An attempt got a response that is not a failure. A member back for longer than
        ``base_eject_seconds`` since its last ejection ended has its multiplier lowered."""
        member.consecutive = 0
        outlier = self.outlier
        if (
            member.eject_count
            and outlier is not None
            and now > member.ejected_until + outlier.base_eject_seconds
        ):
            member.eject_count -= 1
            member.ejected_until = now  # the next step one period later

    def failed(self, member: Member, now: float) -> bool:
        """An attempt failed (connect error, reset, timeout, 5xx); True if that ejected it."""
        member.failures += 1
        member.consecutive += 1
        outlier = self.outlier
        if outlier is None or not outlier.consecutive_failures:
            return False
        if member.consecutive < outlier.consecutive_failures or member.ejected(now):
            return False
        ejected = sum(1 for m in self.members if m.ejected(now))
        cap = max(1, int(outlier.max_ejected_percent / 100.0 * len(self.members)))
        if not outlier.max_ejected_percent or ejected + 1 > cap:
            return False
        member.eject_count += 1
        member.ejections += 1
        member.consecutive = 0
        seconds = min(outlier.base_eject_seconds * member.eject_count, outlier.max_eject_seconds)
        member.ejected_until = now + seconds
        return True

    def busy(self, member: Member, now: float, seconds: float) -> None:
        """``Retry-After``: leave ``member`` alone for ``seconds`` (capped)."""
        member.busy_until = max(member.busy_until, now + min(seconds, MAX_RETRY_AFTER_S))
