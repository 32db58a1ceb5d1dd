"""Admission of one request on its route: identity stripping, inbound auth, policy,
rate limits and credential injection. Everything here fails closed.

Order (each step only runs if the one before admitted the request):

1. identity headers are never forwarded from the client (any case, ``_`` or ``-``);
2. inbound authentication (``bearer`` secret file or ``forward_auth``) -> 401/302/403/503;
3. the route's policy (git push, methods, deny_paths) -> 403/405;
4. rate limit and concurrent streams per key -> 429 with ``Retry-After``;
5. the route's credential is injected; every client copy of ``Authorization``,
   ``Proxy-Authorization`` and of the injected header is dropped first.

A :class:`Security` is built per config snapshot (secrets and tokens are read
then, so a reload re-reads them); exchanges in flight keep the one they started
with. The rate-limit state is the exception: a route whose prefix, inbound mode
and ``rate_limit`` settings are unchanged by a reload keeps its token buckets and
concurrent-stream counts (the same objects), so a SIGHUP gives no caller a fresh
budget, and a stream admitted before the reload frees its slot in the counts the
new snapshot uses. A route whose limit changed starts afresh.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import trio

from ..config import Config, Inject, Route
from ..errors import (
    AuthUnavailable,
    BadRequest,
    Forbidden,
    InternalError,
    LoginRedirect,
    MethodNotAllowed,
    ProxyError,
    TooManyRequests,
    Unauthorized,
)
from ..http.headers import Headers
from ..http.target import TargetView
from ..net.pool import Pool
from ..security.forward_auth import ForwardAuth
from ..security.policy import Policy, Refusal
from ..security.ratelimit import ConcurrencyLimit, TokenBucket
from ..security.secrets import InboundSecrets, SecretError, TokenSource, parse_bearer
from ..store.backend import Unavailable
from ..store.limits import SharedLimits
from ..store.runtime import SharedState

__all__ = ["Admission", "Security", "exposure_problem"]

log: Final = logging.getLogger("proxycore.security")

#: Identity header every deployment reserves, on top of the configured ones.
ALWAYS_IDENTITY: Final = b"x-authenticated-user"
_WWW_AUTHENTICATE: Final = ((b"WWW-Authenticate", b'Bearer realm="proxycore"'),)


@dataclass(slots=True)
class Admission:
    """What an admitted request changes on its way upstream."""

    #: Lower-case header names (``-`` form) never forwarded from the client.
    drop: frozenset[bytes]
    #: Headers appended to the upstream request (identity, injected credential).
    extra: Headers = field(default_factory=list)
    #: Who the caller is: the forward-auth identity, ``bearer:<secret index>``, or "".
    identity: str = ""
    #: Call when the exchange ends (frees a concurrent-stream slot).
    release: Callable[[], None] | None = None
    #: The route's injected credential per upstream name (absent: none).
    credentials: Mapping[str, Credential] = field(default_factory=dict)


def _refusal_error(refusal: Refusal) -> ProxyError:
    headers = list(refusal.headers)
    if refusal.status == 405:
        return MethodNotAllowed(refusal.message, headers=headers)
    exc = Forbidden(refusal.message, headers=headers)
    if refusal.type == "git_push_denied":
        exc = GitPushDenied(refusal.message, headers=headers)
    return exc


class Credential:
    """One injected credential: ``header: [scheme ]<token>``, the token read from its
    source (re-read when the file changes)."""

    __slots__ = ("header", "prefix", "token")

    def __init__(self, inject: Inject) -> None:
        """Reads the token (raises ``SecretError``)."""
        self.token = TokenSource(env=inject.token_env, file=inject.token_file)
        self.token.load()
        self.header = inject.header.encode("ascii")
        self.prefix = inject.scheme.encode("ascii") + b" " if inject.scheme else b""

    def field(self) -> tuple[bytes, bytes]:
        """The header to send; :class:`InternalError` when the token is unavailable."""
        try:
            token = self.token.get()
        except SecretError as exc:  # where the token comes from is the log's, not the client's
            raise InternalError(
                "the credential for this route's upstream is unavailable", detail=str(exc)
            ) from None
        return self.header, self.prefix + token


class GitPushDenied(Forbidden):
    type = "git_push_denied"


class RouteGuard:
    """One route's admission rules, compiled once per config snapshot."""

    def __init__(
        self, route: Route, mode: str, security: Security, previous: RouteGuard | None = None
    ) -> None:
        """``previous``: this prefix's guard in the snapshot being replaced (its rate-limit
        state is carried over when the settings are the same)."""
        self.mode = mode
        self.security = security
        self.policy = Policy(
            methods=route.methods, deny_paths=route.deny_paths, deny_git_push=route.deny_git_push
        )
        self.max_body_bytes = route.max_body_bytes
        drop = {ALWAYS_IDENTITY, *security.identity_targets}
        #: Each upstream's injected credential (by upstream name; absent: none).
        self.credentials: dict[str, Credential] = {}
        made: dict[Inject, Credential] = {}
        for spec in route.group:
            if spec.inject is not None:
                credential = made.get(spec.inject)
                if credential is None:
                    credential = made[spec.inject] = Credential(spec.inject)
                self.credentials[spec.name] = credential
                drop.update((b"authorization", credential.header.lower()))
        #: Injected header names (lower case): a client sending one twice is refused.
        self.singletons = tuple({c.header.lower() for c in made.values()})
        if mode == "bearer":
            drop.add(b"authorization")  # the proxy's own secret never goes upstream
        self.drop = frozenset(drop)
        limit = self.rate_limit = route.rate_limit
        self.rate_key = limit.key if limit else ""
        self.bucket: TokenBucket | None
        self.streams: ConcurrencyLimit | None
        if previous is not None and (previous.rate_limit, previous.mode) == (limit, mode):
            self.bucket, self.streams = previous.bucket, previous.streams  # same settings
        else:
            self.bucket = TokenBucket(limit.requests_per_second, limit.burst) if limit else None
            self.streams = (
                ConcurrencyLimit(limit.max_concurrent_streams)
                if limit and limit.max_concurrent_streams
                else None
            )
        shared = security.shared  # [state]: limits shared by every replica (local: fallback)
        self.shared = (
            SharedLimits(shared.backend, shared.leases, route.prefix, limit)
            if shared is not None and limit
            else None
        )

    async def admit(
        self,
        method: bytes,
        view: TargetView,
        headers: Headers,
        client_ip: str,
    ) -> Admission:
        """Admit the request or raise the :class:`ProxyError` that refuses it. A checkpoint
        with forward auth and with ``[state]``'s shared limits (one backend call, bounded
        by ``[state] timeout``). Every decision uses ``view`` (the normalized target) and
        ``client_ip`` (see :func:`proxycore.request_head.client_address`)."""
        for name in self.singletons:
            if _count(headers, name) > 1:
                raise BadRequest(f"the {name.decode('ascii')} field appears twice")
        admission = Admission(self.drop, credentials=self.credentials)
        key = client_ip
        if self.mode == "bearer":
            key = admission.identity = self._bearer(headers)
        elif self.mode == "forward_auth":
            key = await self._forward_auth(method, view.auth_target, headers, client_ip, admission)
            admission.identity = key
        refusal = self.policy.check(method, view.path, view.query)
        if refusal is not None:
            raise _refusal_error(refusal)
        if self.bucket is not None or self.streams is not None:
            rate_key = client_ip if self.rate_key == "client_ip" else key
            await self._rate_limit(rate_key, admission)
        return admission

    def _bearer(self, headers: Headers) -> str:
        secrets = self.security.inbound_secrets
        presented = parse_bearer(
            next((v for n, v in headers if n.lower() == b"authorization"), None)
        )
        index = secrets.match(presented) if secrets is not None and presented else None
        if index is None:
            raise Unauthorized(
                "a valid 'Authorization: Bearer <secret>' is required",
                headers=list(_WWW_AUTHENTICATE),
            )
        return f"bearer:{index}"

    async def _forward_auth(
        self, method: bytes, target: bytes, headers: Headers, client_ip: str, admission: Admission
    ) -> str:
        auth = self.security.forward_auth
        assert auth is not None
        host = next((v for n, v in headers if n.lower() == b"host"), b"")
        decision = await auth.check(headers, method, target, host, client_ip.encode())
        if decision.status == 0:
            raise AuthUnavailable("the authentication service is unavailable; try again later")
        if not decision.allowed:
            login = self.security.login_url
            if login and method == b"GET" and _wants_html(headers):
                raise LoginRedirect("login required", headers=[(b"Location", login)])
            if decision.status == 403:
                raise Forbidden("the authentication service refused this request")
            raise Unauthorized("authentication required")
        admission.extra.extend(decision.identity)
        return decision.identity[0][1].decode("latin-1") if decision.identity else client_ip

    async def _rate_limit(self, key: str, admission: Admission) -> None:
        if self.shared is not None:
            try:
                decision = await self.shared.admit(key)
            except Unavailable:  # [state] on_unavailable: "closed" refuses, "local" falls back
                if self.shared.closed:
                    raise self.shared.refusal() from None
            else:
                if decision.wait:
                    retry = str(max(1, math.ceil(decision.wait))).encode()
                    raise TooManyRequests(
                        "rate limit exceeded; retry later", headers=[(b"Retry-After", retry)]
                    )
                if decision.streams_full:
                    raise TooManyRequests(
                        "too many concurrent streams; retry when one ends",
                        headers=[(b"Retry-After", b"1")],
                    )
                admission.release = decision.release
                return
        if self.bucket is not None:
            wait = self.bucket.take(key, trio.current_time())
            if wait:
                retry = str(max(1, math.ceil(wait))).encode()
                raise TooManyRequests(
                    "rate limit exceeded; retry later", headers=[(b"Retry-After", retry)]
                )
        streams = self.streams
        if streams is not None:
            if not streams.acquire(key):
                raise TooManyRequests(
                    "too many concurrent streams; retry when one ends",
                    headers=[(b"Retry-After", b"1")],
                )
            admission.release = lambda: streams.release(key)


def _count(headers: Headers, lname: bytes) -> int:
    return sum(1 for n, _ in headers if n.lower().replace(b"_", b"-") == lname)


def _wants_html(headers: Headers) -> bool:
    return any(n.lower() == b"accept" and b"text/html" in v.lower() for n, v in headers)


class Security:
    """Everything admission needs for one config snapshot.

    Raises :class:`SecretError` when the inbound secret file is unusable (the
    proxy refuses to start, or a reload is refused). ``previous`` is the snapshot's
    ``Security`` being replaced by a reload (rate-limit state carried per route).
    """

    def __init__(
        self,
        config: Config,
        pool: Pool,
        previous: Security | None = None,
        shared: SharedState | None = None,
    ) -> None:
        """``shared``: ``[state]``'s backend, for rate limits every replica shares."""
        self.shared = shared
        inbound = config.inbound
        self.identity_targets = frozenset(
            name.lower().encode("ascii") for name in inbound.identity_targets
        )
        self.login_url = inbound.login_url.encode() if inbound.login_url else b""
        modes = {config.inbound_mode(route) for route in config.routes}
        self.inbound_secrets: InboundSecrets | None = None
        if "bearer" in modes and inbound.secret_file:
            self.inbound_secrets = InboundSecrets(inbound.secret_file)
            for warning in self.inbound_secrets.load_at_start():
                log.warning("%s", warning)
        self.forward_auth = (
            ForwardAuth(inbound, pool) if "forward_auth" in modes and inbound.url else None
        )
        before = previous._guards if previous is not None else {}
        self._guards: dict[str, RouteGuard] = {
            route.prefix: RouteGuard(
                route, config.inbound_mode(route), self, before.get(route.prefix)
            )
            for route in config.routes
        }

    def guard(self, route: Route) -> RouteGuard:
        return self._guards[route.prefix]


def exposure_problem(config: Config) -> str | None:
    """Refuse an unauthenticated proxy on a non-loopback address unless allowed."""
    if config.server.allow_public:
        return None
    open_routes = [r.prefix for r in config.routes if config.inbound_mode(r) == "none"]
    if not open_routes:
        return None
    for host, _ in config.server.listen_addresses:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            return (
                f"refusing to listen on {host} (not loopback) with routes that need no "
                f"authentication ({', '.join(open_routes)}): set [inbound] mode = 'bearer' or "
                "'forward_auth', or server.allow_public = true if this is really intended"
            )
    return None
