"""Forward authentication: ask an auth service whether a request may pass.

For each request the proxy sends ``GET <url>`` to the auth service with the
client's ``Cookie`` and ``Authorization`` and ``X-Forwarded-{Method,Uri,Host,
Proto,For}``. A 2xx answer admits the request and names the caller in the
headers listed in ``identity_headers``; 401/403 refuse it; anything else
(unreachable, slower than ``timeout``, 5xx, a malformed answer) fails closed
with 503.

Decisions can be cached for ``cache_seconds``, keyed by a SHA-256 of the
exact header list sent to the service (credentials, client address, method,
host and URI; never the credentials themselves), in a bounded dict. "Could
not decide" is never cached, nor (unless ``cache_anonymous``) the decision on
a request that carried no credential (no Cookie, no Authorization).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Final

import h11
import trio

from ..config import Inbound
from ..config.checks import parse_upstream as _parse_upstream
from ..http.headers import Headers
from ..net.pool import Origin, Pool, StaleConnection, UpstreamConnection, with_stale_retry
from ..net.stream import StreamBroken

__all__ = ["Decision", "ForwardAuth"]

MAX_CACHE_ENTRIES: Final = 10_000
MAX_AUTH_RESPONSE_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Decision:
    #: 2xx: allowed; 401/403: refused with that status; 0: the service could not decide.
    status: int
    #: ``(upstream header name, value)`` pairs to add to the upstream request.
    identity: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def allowed(self) -> bool:
        return 200 <= self.status < 300


UNDECIDED: Final = Decision(0)

#: Headers of the auth request that carry the caller's credentials.
CREDENTIAL_HEADERS: Final = frozenset({b"cookie", b"authorization"})


def _has_credential(request: Headers) -> bool:
    return any(name.lower() in CREDENTIAL_HEADERS for name, _ in request)


def _cache_key(request: Headers) -> bytes:
    """SHA-256 of the whole auth request head (every name and value, length-prefixed):
    whatever the service may decide on is in the key, and the credentials are not kept."""
    digest = hashlib.sha256()
    for name, value in request:
        digest.update(b"%d:%s%d:%s" % (len(name), name, len(value), value))
    return digest.digest()


class ForwardAuth:
    def __init__(self, settings: Inbound, pool: Pool) -> None:
        assert settings.url is not None
        target = _parse_upstream(settings.url)
        self._origin = Origin(target.scheme, target.host, target.port, None)
        self._host = target.host_header.encode()
        self._target = target.base_path.encode()
        self._timeout = settings.timeout
        self._cache_s = settings.cache_seconds
        self._cache_anonymous = settings.cache_anonymous
        self._wanted = {
            src.lower().encode(): dst.encode() for src, dst in settings.identity_headers
        }
        self._pool = pool
        self._cache: OrderedDict[bytes, tuple[float, Decision]] = OrderedDict()

    async def check(
        self, headers: Headers, method: bytes, target: bytes, host: bytes, client_ip: bytes
    ) -> Decision:
        """Ask the auth service (or the cache). A checkpoint; never raises for I/O errors."""
        request = self._auth_request(headers, method, target, host, client_ip)
        key = b""
        if self._cache_s and (self._cache_anonymous or _has_credential(request)):
            key = _cache_key(request)
            hit = self._cache.get(key)
            if hit is not None and hit[0] > trio.current_time():
                return hit[1]
        decision = UNDECIDED
        with trio.move_on_after(self._timeout):
            decision = await self._ask(request)
        if key and decision.status:  # never cache "could not decide"
            self._remember(key, decision)
        return decision

    def _auth_request(
        self, headers: Headers, method: bytes, target: bytes, host: bytes, client_ip: bytes
    ) -> Headers:
        """The header list of the auth request (also the source of the cache key)."""
        cookie = b"; ".join(v for n, v in headers if n.lower() == b"cookie")
        authorization = next((v for n, v in headers if n.lower() == b"authorization"), b"")
        request = [
            (b"Host", self._host),
            (b"X-Forwarded-Method", method),
            (b"X-Forwarded-Uri", target),
            (b"X-Forwarded-Host", host),
            (b"X-Forwarded-Proto", b"http"),
            (b"X-Forwarded-For", client_ip),
        ]
        if cookie:
            request.append((b"Cookie", cookie))
        if authorization:
            request.append((b"Authorization", authorization))
        return request

    def _remember(self, key: bytes, decision: Decision) -> None:
        self._cache[key] = (trio.current_time() + self._cache_s, decision)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CACHE_ENTRIES:
            self._cache.popitem(last=False)

    async def _ask(self, request: Headers) -> Decision:
        """One GET to the auth service; a pooled connection that turns out dead
        before any response byte is retried once on a fresh one (an idle
        keep-alive connection the service closed is not its answer)."""
        try:
            return await with_stale_retry(self._pool, self._origin, partial(self._attempt, request))
        except (OSError, StreamBroken, h11.ProtocolError, StaleConnection):
            return UNDECIDED

    async def _attempt(self, request: Headers, conn: UpstreamConnection) -> Decision:
        """The exchange on ``conn``, which is then checked in (reusable) or closed."""
        try:
            decision, reusable = await self._exchange(conn, request)
        except BaseException:
            conn.close()
            raise
        if reusable:
            self._pool.checkin(conn)
        else:
            conn.close()
        return decision

    async def _exchange(self, conn: UpstreamConnection, request: Headers) -> tuple[Decision, bool]:
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_AUTH_RESPONSE_BYTES)
        data = h.send(h11.Request(method=b"GET", target=self._target, headers=request))
        data += h.send(h11.EndOfMessage())
        try:
            await conn.stream.send_all(data)
        except StreamBroken:
            if conn.uses:
                raise StaleConnection from None
            raise
        buf = bytearray(4096)
        status = 0
        identity: list[tuple[bytes, bytes]] = []
        body = 0
        got = 0
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                try:
                    n = await conn.stream.recv_into(buf, len(buf))
                except StreamBroken:
                    n = 0
                if not n and not got and conn.uses:
                    raise StaleConnection
                got += n
                h.receive_data(bytes(buf[:n]))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    dst = self._wanted.get(name)
                    if dst is not None:
                        identity.append((dst, value))
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > MAX_AUTH_RESPONSE_BYTES:
                    return UNDECIDED, False
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                return UNDECIDED, False
        reusable = h.our_state is h11.DONE and h.their_state is h11.DONE
        if 200 <= status < 300:
            return Decision(status, tuple(identity)), reusable
        if status in (401, 403):
            return Decision(status), reusable
        return UNDECIDED, reusable
