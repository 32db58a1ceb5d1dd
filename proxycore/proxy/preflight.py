"""Everything decided before a byte goes upstream, the same for both front ends.

The order is the one the native server has always used:

1. :func:`request_view`: **the one view of the request**. The target is parsed
   and normalized once (:func:`~proxycore.http.target.parse_target`), the head
   is checked (:func:`~proxycore.http.request_head.check_head`: singleton
   fields, ``Host``) and the client address is settled
   (:func:`~proxycore.http.request_head.client_address`: ``trusted_proxies`` and
   ``X-Forwarded-For``). Route, policy, forward auth, rate limits, hooks, the
   access log and the forwarded target all read this view, never the raw target
   or the peer address.
2. :func:`expect_continue`: only ``Expect: 100-continue`` is supported (417).
3. :func:`admit`: the route (404), the route's guard (inbound auth, policy,
   rate limit, credential: 401/403/405/429/503) and ``max_body_bytes`` against
   the declared body size (413).
4. :func:`upstream_head`: the upstream request head, serialized once, and the
   origin to send it to.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..config import UpstreamSpec
from ..errors import ExpectationFailed, NoRoute, PayloadTooLarge
from ..http.headers import (
    FRAMING_FIELDS,
    Framing,
    Headers,
    serialize_head,
    upstream_request_headers,
)
from ..http.request_head import IPNetwork, check_head, client_address
from ..http.router import Match
from ..http.target import TargetView, parse_target
from ..net.pool import Origin
from ..proxy.attempts import Attempts, HeadFor, hash_key
from ..proxy.hooks import Response
from ..proxy.ledger import Ledger
from ..proxy.state import Snapshot
from ..security.admission import Admission, Credential
from ..upstreams.group import Member

__all__ = [
    "admit",
    "answer_head",
    "expect_continue",
    "heads",
    "plan_attempts",
    "request_view",
    "upstream_head",
]

#: Framing headers of a hook's answer: the proxy frames it itself.


def request_view(
    ledger: Ledger, target: bytes, headers: Headers, peer: str, trusted: Sequence[IPNetwork]
) -> tuple[TargetView, bytes]:
    """The one view of the request: ``(view, X-Forwarded-For value)``.

    Records the decision path and the client address (``ledger.record.client``,
    which every later decision uses). Raises :class:`~proxycore.errors.BadRequest`.
    """
    rec, info = ledger.record, ledger.info
    # The client first (it cannot fail), so that a refusal below is logged against it.
    address = client_address(peer, headers, trusted)
    rec.client = info.client = address.ip
    view = parse_target(target)
    rec.path = info.path = view.path
    check_head(headers)
    return view, address.forwarded_for


def expect_continue(headers: Headers) -> bool:
    """Whether the client sent ``Expect: 100-continue``; any other expectation is a 417."""
    values = [v.strip().lower() for n, v in headers if n.lower() == b"expect"]
    if not values:
        return False
    if any(v != b"100-continue" for v in values):
        raise ExpectationFailed("only 'Expect: 100-continue' is supported")
    return True


async def admit(
    ledger: Ledger,
    snapshot: Snapshot,
    method: bytes,
    view: TargetView,
    headers: Headers,
    declared: int,
) -> tuple[Match, Admission, int | None]:
    """Route and admit the request: ``(match, admission, max_body_bytes)``.

    ``declared`` is the body size the request announced (Content-Length, or the
    chunk sizes read so far). The admission's release is left with the ledger.
    """
    rec = ledger.record
    match = snapshot.router.match(view)
    if match is None:
        raise NoRoute(f"no route for path {rec.path!r}")
    route = ledger.route = match.route
    rec.route = ledger.info.route = route.name
    guard = snapshot.security.guard(route)
    admission = await guard.admit(method, view, headers, rec.client)
    ledger.release = admission.release
    ledger.info.identity = admission.identity
    limit = guard.max_body_bytes
    if limit is not None and declared > limit:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    return match, admission, limit


def upstream_head(
    ledger: Ledger,
    match: Match,
    spec: UpstreamSpec,
    query: bytes,
    method: bytes,
    headers: Headers,
    *,
    forwarded_for: bytes,
    framing: Framing,
    admission: Admission,
    credential: Credential | None,
    proto: bytes,
) -> bytes:
    """The serialized head for the upstream ``spec`` (one of the route's group).

    Client headers are filtered by :func:`~proxycore.http.headers.upstream_request_headers`;
    ``Host`` is the upstream's unless it preserves the client's; ``credential`` (the
    upstream's injected one) is added last. Raises :class:`InternalError` when that
    credential is unavailable.
    """
    up = spec.target
    host = up.host_header.encode("ascii")
    if spec.preserve_host:
        host = next((v for n, v in headers if n.lower() == b"host"), host)
    extra = admission.extra
    if credential is not None:
        extra = [*extra, credential.field()]
    out = upstream_request_headers(
        headers,
        host=host,
        forwarded_for=forwarded_for,
        request_id=ledger.request_id,
        framing=framing,
        identity_encoding=match.route.accept_encoding == "identity",
        drop=admission.drop,
        extra=extra,
        proto=proto,
    )
    start = b"%s %s%s HTTP/1.1\r\n" % (method, match.path_for(spec), query)
    return serialize_head(start, out)


def heads(
    ledger: Ledger,
    match: Match,
    query: bytes,
    method: bytes,
    headers: Headers,
    *,
    forwarded_for: bytes,
    framing: Framing,
    admission: Admission,
    proto: bytes,
    body: bytes,
) -> HeadFor:
    """What the upstream core asks for each try (both front ends): the upstream's origin
    and its head (:func:`upstream_head`, its credential) followed by ``body``, the body
    bytes in hand."""

    def head_for(member: Member) -> tuple[Origin, bytes]:
        head = upstream_head(
            ledger,
            match,
            member.spec,
            query,
            method,
            headers,
            forwarded_for=forwarded_for,
            framing=framing,
            admission=admission,
            credential=admission.credentials.get(member.name),
            proto=proto,
        )
        return member.origin, head + body

    return head_for


def plan_attempts(
    ledger: Ledger,
    snapshot: Snapshot,
    match: Match,
    method: bytes,
    headers: Headers,
    admission: Admission,
) -> Attempts:
    """The tries of this exchange: its route's group, the hash key, the MCP session's
    upstream (the header is rewritten to the upstream's own id). Raises
    :class:`~proxycore.errors.SessionNotFound`. Call :meth:`Attempts.set_body` next."""
    group = snapshot.groups[match.index]
    affinity = snapshot.affinities[match.index]
    pinned = affinity.pinned(headers, trio.current_time()) if affinity is not None else None
    route = match.route
    key = None
    if route.balance == "hash":
        key = hash_key(route.hash_on, headers, ledger.record.client, admission.identity)
    return Attempts(
        group,
        ledger.record,
        method=method,
        key=key,
        pinned=pinned,
        affinity=affinity,
        max_body=route.max_retry_body_bytes,
    )


def answer_head(answer: Response, request_id: bytes, *, close: bool) -> Headers:
    """The headers of a hook's direct answer: its own minus framing, then the proxy's."""
    headers = [(n, v) for n, v in answer.headers if n.lower() not in FRAMING_FIELDS]
    if answer.status not in (204, 304):  # never a body, never a Content-Length of ours
        headers.append((b"Content-Length", b"%d" % len(answer.body)))
    headers.append((b"X-Request-ID", request_id))
    if close:
        headers.append((b"Connection", b"close"))
    return headers
