"""A route's rate limit and concurrent-stream limit, shared by every replica through the
backend: one :data:`~proxycore.store.scripts.ADMIT` call per admitted request (one round
trip), keys ``<key_prefix>rl:<route>:<client>`` and ``<key_prefix>cs:<route>:<client>``.

The client part of a key is a hash of the caller's key (an address, ``bearer:<n>``, a
forward-auth identity): no identity is stored in the backend in clear. Raises
:class:`~proxycore.store.backend.Unavailable` when the backend can't answer within
``[state] timeout``; the route's guard then follows ``on_unavailable``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from ..config import RateLimit
from ..store.backend import StateBackend, StateUnavailable, Unavailable
from ..store.leases import Leases
from ..store.scripts import ADMIT

__all__ = ["Decision", "SharedLimits"]


@dataclass(frozen=True, slots=True)
class Decision:
    """``wait`` > 0: refused by the rate (seconds until a token); ``streams_full``: refused by
    the stream limit; else admitted, ``release`` frees the stream's lease (if one was held)."""

    wait: float = 0.0
    streams_full: bool = False
    release: Callable[[], None] | None = None


class SharedLimits:
    """One route's shared limits (see the module docstring)."""

    def __init__(self, backend: StateBackend, leases: Leases, route: str, limit: RateLimit) -> None:
        self.backend, self.leases, self.limit = backend, leases, limit
        self._rate_stem = f"{backend.prefix}rl:{route}:"
        self._streams_stem = f"{backend.prefix}cs:{route}:"

    @property
    def closed(self) -> bool:
        """``on_unavailable = "closed"``: refuse when the backend is away."""
        return self.backend.closed_mode

    def refusal(self) -> StateUnavailable:
        return self.backend.unavailable()

    async def admit(self, key: str) -> Decision:
        """Take a token and a stream lease for ``key`` atomically (one round trip)."""
        limit = self.limit
        digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        bucket = self._rate_stem + digest
        streams = self._streams_stem + digest if limit.max_concurrent_streams else ""
        lease = self.leases.new_id() if streams else ""
        try:
            wait_us, held = await self._admit(bucket, streams, lease)
        except Unavailable:
            if lease:
                self.leases.abandon(lease, streams)
            raise
        if wait_us > 0:
            return Decision(wait=wait_us / 1e6)
        if not held:
            return Decision(streams_full=True)
        if not streams:
            return Decision()
        leases = self.leases
        leases.hold(lease, streams)
        return Decision(release=lambda: leases.release(lease))

    async def _admit(self, bucket: str, streams: str, lease: str) -> tuple[int, int]:
        """``(microseconds to wait, 1 if the stream lease was granted)``."""
        limit = self.limit
        result = await self.backend.script(
            ADMIT,
            [bucket, streams],
            [
                limit.requests_per_second,
                limit.burst,
                lease,
                limit.max_concurrent_streams or 0,
                self.leases.lease_ms,
            ],
        )
        wait_us, held = result
        return int(wait_us), int(held)
