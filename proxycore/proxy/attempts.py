"""Which upstream each try of one exchange goes to, and whether there is another try.

Made by the front end once the route is known (:func:`plan`), handed to the upstream
core (:class:`~proxycore.proxy.upstream.UpstreamCall`), which asks it after every try:

- :meth:`Attempts.first`: the first upstream (the MCP session's, with affinity; else
  the group's choice on the hash key).
- :meth:`Attempts.responded`: a response head came back. Counts the outcome (a 5xx is
  a failure for outlier ejection; ``Retry-After`` on a 429/503 marks the upstream busy)
  and answers the next upstream when the status is one to retry, else None: the
  response goes to the client.
- :meth:`Attempts.errored`: the try failed before a response head. The next upstream,
  or None: the error goes to the client.

The retry rules (README, "Upstream groups"): never the same upstream twice for one
request; at most ``retry.attempts`` tries and within the group's retry budget; only
before any response byte reached the client (the core only asks then). Connect errors
are always retried (nothing was sent); statuses in ``retry.on`` and a ``timeout``
(``per_try_timeout``) only when the whole request body is in hand (``replayable``); a
``reset`` only when it is also idempotent (it may have been acted on).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from typing import Final

import trio

from ..config import RetryPolicy
from ..errors import BadRequest, SessionNotFound
from ..http.headers import Headers
from ..net.pool import Origin
from ..observe.accesslog import ExchangeRecord
from ..upstreams.affinity import SessionIds
from ..upstreams.group import Member, UpstreamGroup

__all__ = ["SESSION_HEADER", "Affinity", "Attempts", "HeadFor", "retry_after_seconds"]

SESSION_HEADER: Final = b"mcp-session-id"

#: What the upstream core asks the front end for each try: the upstream's origin and its
#: serialized head with the body bytes in hand.
HeadFor = Callable[[Member], tuple[Origin, bytes]]
#: Methods a ``reset`` may be retried for (RFC 9110 idempotent methods).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def retry_after_seconds(headers: Headers) -> float | None:
    """``Retry-After`` in seconds (delta or HTTP date), or None when absent or invalid."""
    value = next((v for n, v in headers if n.lower() == b"retry-after"), None)
    if value is None:
        return None
    text = value.strip().decode("latin-1")
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, OverflowError, IndexError):  # years past 2**31 overflow
        return None
    return max(0.0, when.timestamp() - time.time())


def _is_session_field(name: bytes) -> bool:
    return name.lower().replace(b"_", b"-") == SESSION_HEADER


def _identity(route: str, member: Member) -> str:
    """What a session tag names: the route, the upstream's name and its URL."""
    target = member.spec.target
    url = f"{target.scheme}://{target.host_header}{target.base_path}"
    return f"{route}\0{member.name}\0{url}"


def _holds_sessions(member: Member, now: float) -> bool:
    """Up and not ejected (a busy one, ``Retry-After``, still holds its sessions)."""
    return member.healthy and not member.ejected(now)


class Affinity:
    """MCP session affinity of one group: which member minted a session id."""

    __slots__ = ("_by_tag", "_tags", "ids")

    def __init__(self, ids: SessionIds, group: UpstreamGroup, route: str) -> None:
        """``route``: the route's prefix. A tag names the route and the upstream's name and
        URL, so an id minted on one route (or by an upstream whose URL a reload changed)
        is refused on another."""
        self.ids = ids
        tags = {id(m): ids.tag(_identity(route, m)) for m in group.members}
        self._tags = tags
        self._by_tag = {tags[id(m)]: m for m in group.members}

    def pinned(self, headers: Headers, now: float) -> Member | None:
        """The member the request's session belongs to (the header is replaced with the
        upstream's own id), None without a session id. Raises :class:`SessionNotFound`
        for an id that is not ours, or whose upstream is gone or out, and
        :class:`BadRequest` for two ids (one could pin, the other reach the upstream)."""
        # Any spelling (case, ``_`` for ``-``): an upstream may read them all as one.
        found = [i for i, (name, _) in enumerate(headers) if _is_session_field(name)]
        if not found:
            return None
        if len(found) > 1:
            raise BadRequest("the Mcp-Session-Id field appears twice")
        index = found[0]
        unwrapped = self.ids.unwrap(headers[index][1].strip())
        member = self._by_tag.get(unwrapped[0]) if unwrapped else None
        if unwrapped is None or member is None or not _holds_sessions(member, now):
            raise SessionNotFound("no such session: initialize a new one")
        headers[index] = (b"Mcp-Session-Id", unwrapped[1])
        return member

    def wrap_response(self, member: Member, headers: Headers) -> None:
        """Replace the ids ``member`` minted with the ones the client sees."""
        tag = self._tags[id(member)]
        for index, (name, value) in enumerate(headers):
            if name.lower() == SESSION_HEADER:
                headers[index] = (name, self.ids.wrap(tag, value.strip()))


class Attempts:
    """The tries of one exchange (see the module docstring)."""

    __slots__ = (
        "affinity",
        "group",
        "idempotent",
        "key",
        "limit",
        "pinned",
        "policy",
        "record",
        "replayable",
        "tried",
    )

    def __init__(
        self,
        group: UpstreamGroup,
        record: ExchangeRecord,
        *,
        method: bytes,
        replayable: bool = False,
        key: bytes | None = None,
        pinned: Member | None = None,
        affinity: Affinity | None = None,
        max_body: int = 64 * 1024,
    ) -> None:
        self.group, self.record, self.key, self.pinned = group, record, key, pinned
        self.policy: RetryPolicy = group.retry
        self.replayable = replayable
        self.idempotent = method in IDEMPOTENT
        self.affinity = affinity
        self.tried: list[Member] = []
        #: ``max_retry_body_bytes`` of the route.
        self.limit = max_body

    def set_body(self, in_hand: int | None) -> None:
        """The request body is all in hand (``in_hand`` bytes; None: it is still coming):
        replayable on another upstream if within the route's ``max_retry_body_bytes``."""
        self.replayable = in_hand is not None and in_hand <= self.limit

    def gathers(self, length: int | None) -> bool:
        """Read a ``Content-Length`` body of ``length`` whole before the first try?"""
        return gathers_body(self.group, self.pinned is not None, length, self.limit)

    def first(self) -> Member:
        group = self.group
        member = self.pinned or group.single
        if member is None:
            now = trio.current_time()
            group.budget.request(now)
            member = group.pick(now, key=self.key)
            assert member is not None  # a group has members; nothing was tried yet
        self._start(member)
        return member

    def _start(self, member: Member) -> None:
        self.tried.append(member)
        member.requests += 1
        self.record.upstream = member.spec.label

    def _next(self, member: Member, outcome: str, now: float) -> Member | None:
        """Another member for a retry after ``outcome`` on ``member``, or None. A retry
        after a connect error is outside the budget: nothing reached any upstream."""
        if self.pinned is not None or self.group.single is not None:
            return None
        if len(self.tried) >= self.policy.attempts:
            return None
        nxt = self.group.pick(now, key=self.key, tried=self.tried)
        if nxt is None:
            return None
        if outcome != "connect_error" and not self.group.budget.allow(now):
            return None
        record = self.record
        if record.attempts is None:
            record.attempts = []
        record.attempts.append((member.name, outcome))
        nxt.retries += 1
        self._start(nxt)
        return nxt

    def _final(self, member: Member, outcome: str) -> None:
        if self.record.attempts:
            self.record.attempts.append((member.name, outcome))

    def responded(
        self, member: Member, status: int, headers: Headers, *, retry_ok: bool = True
    ) -> Member | None:
        """A response head from ``member``: the member to retry on, or None (relay it).
        ``retry_ok``: no byte went to the client yet."""
        group, now = self.group, trio.current_time()
        if status >= 500:
            group.failed(member, now)
        else:
            group.succeeded(member, now)
        if status in (429, 503):
            seconds = retry_after_seconds(headers)
            if seconds:
                group.busy(member, now, seconds)
        if retry_ok and status in self.policy.statuses and self.replayable:
            nxt = self._next(member, str(status), now)
            if nxt is not None:
                return nxt
        self._final(member, str(status))
        if self.affinity is not None:
            self.affinity.wrap_response(member, headers)
        return None

    def errored(self, member: Member, kind: str, *, retry_ok: bool = True) -> Member | None:
        """A try failed (``kind``: connect_error, reset, timeout, other): the member to
        retry on, or None (the error goes to the client). ``retry_ok``: no byte went to
        the client yet."""
        now = trio.current_time()
        self.group.failed(member, now)
        retry = retry_ok and (
            kind == "connect_error"
            or (
                kind in self.policy.conditions
                and self.replayable
                and (kind == "timeout" or self.idempotent)
            )
        )
        nxt = self._next(member, kind, now) if retry else None
        if nxt is None:
            self._final(member, kind)
        return nxt


def hash_key(spec: str | None, headers: Headers, client_ip: str, identity: str) -> bytes | None:
    """The value ``hash_on`` names for this request (None when the request has none)."""
    if spec is None:
        return None
    if spec == "client_ip":
        return client_ip.encode()
    if spec == "identity":
        return identity.encode() if identity else None
    kind, _, name = spec.partition(":")
    wanted = name.lower().encode("ascii")
    if kind == "header":
        return next((v.strip() for n, v in headers if n.lower() == wanted), None)
    for n, v in headers:  # cookie:NAME
        if n.lower() == b"cookie":
            for pair in v.split(b";"):
                key, eq, value = pair.strip().partition(b"=")
                if eq and key.lower() == wanted:
                    return value
    return None


def gathers_body(group: UpstreamGroup, pinned: bool, length: int | None, limit: int) -> bool:
    """Whether to read a ``Content-Length`` body of ``length`` bytes whole before the first
    try, so that a status, ``reset`` or ``timeout`` can be retried on another upstream
    (nginx's request buffering, bounded by ``max_retry_body_bytes``)."""
    policy = group.retry
    retries_after_sending = policy.statuses or policy.conditions - {"connect_error"}
    return (
        group.single is None
        and not pinned
        and policy.attempts > 1
        and bool(retries_after_sending)
        and length is not None
        and length <= limit
    )
