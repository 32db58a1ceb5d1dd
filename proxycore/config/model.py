"""The configuration model: typed, immutable dataclasses with units (seconds, bytes).

Every dataclass validates itself in ``__post_init__`` (through :mod:`.checks`) and raises
:class:`~proxycore.config.checks.ConfigError` with every problem it found, as
``"<key.path>: <problem>"``. :class:`~proxycore.config.load.Config` ties them together and loads
them from files.

This module is pure (stdlib only, no trio/h11) and never reads secret values: it only holds
environment variable *names* and file *paths*, and never echoes URLs or credential fields.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from ..config.checks import (
    ENCODINGS,
    TOKEN_RE,
    Problems,
    Upstream,
    describe,
    instance,
    integer,
    number,
    parse_listen,
    parse_upstream,
    prefix_problem,
    typed,
    validate_methods,
    validate_pattern,
)
from ..config.groups import (
    HealthCheck,
    Outlier,
    RetryPolicy,
    UpstreamEntry,
    UpstreamSpec,
    resolve_group,
)
from ..config.inject import Inject

__all__ = [
    "AdminSettings",
    "Inbound",
    "Inject",
    "PoolSettings",
    "RateLimit",
    "Route",
    "SSESettings",
    "ServerSettings",
    "Timeouts",
    "Tunnel",
    "WebSocketSettings",
]

_GROUP_RETRY = RetryPolicy()
_SINGLE_RETRY = RetryPolicy(attempts=1)
_GROUP_OUTLIER = Outlier()

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Timeouts in seconds: connect, response head, idle gap between body reads, the whole
    exchange (``total = 0`` means no limit), ``send``: longest one write to either side may
    wait without the peer accepting a byte, and ``client_body``: longest silence between two
    reads of a request body. ``send`` and ``client_body`` must be ``> 0``: every wait has a
    bound (a very large value is the way to mean "practically none")."""

    connect: float = 10.0
    response: float = 3600.0
    idle: float = 3600.0
    total: float = 0.0
    send: float = 60.0
    client_body: float = 60.0

    def __post_init__(self) -> None:
        p = Problems()
        for name in ("connect", "response", "idle", "send", "client_body"):
            number(p, self, name, zero_ok=False)
        number(p, self, "total", zero_ok=True)
        p.check()


_INBOUND_MODES = ("none", "bearer", "forward_auth")
_RATE_KEYS = ("client_ip", "identity", "bearer")


def _string_tuple(p: Problems, obj: object, name: str, *, optional: bool = False) -> bool:
    """Accept a list or tuple of strings (stored as a tuple); False if it is not one."""
    value = getattr(obj, name)
    if value is None and optional:
        return True
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        p.add(name, f"expected an array of strings, got {describe(value)}")
        return False
    object.__setattr__(obj, name, tuple(value))
    return True


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket per key (``client_ip``, forward-auth ``identity``, or the ``bearer`` secret's
    index): ``requests_per_second`` refill, ``burst`` capacity; ``max_concurrent_streams`` (0 = no
    limit) open exchanges per key."""

    requests_per_second: float
    burst: int = 10
    key: str = "client_ip"
    max_concurrent_streams: int = 0

    def __post_init__(self) -> None:
        p = Problems()
        number(p, self, "requests_per_second", zero_ok=False)
        integer(p, self, "burst", 1)
        key = typed(p, self, "key", str)
        if key is not None and key not in _RATE_KEYS:
            p.add("key", f"must be one of {', '.join(_RATE_KEYS)}, got {key!r}")
        integer(p, self, "max_concurrent_streams", 0)
        p.check()


@dataclass(frozen=True, slots=True)
class Inbound:
    """Who may call the proxy: ``none``, ``bearer`` (secrets in ``secret_file``) or
    ``forward_auth`` (ask ``url``; copy ``identity_headers`` of its answer, auth-service name ->
    upstream name, onto the request). Decisions are cached ``cache_seconds``; one on a request
    without credentials only with ``cache_anonymous``."""

    mode: str = "none"
    secret_file: str | None = None
    url: str | None = None
    identity_headers: tuple[tuple[str, str], ...] = ()
    login_url: str | None = None
    cache_seconds: float = 0.0
    cache_anonymous: bool = False
    timeout: float = 5.0

    def __post_init__(self) -> None:
        p = Problems()
        mode = typed(p, self, "mode", str)
        if mode is not None and mode not in _INBOUND_MODES:
            p.add("mode", f"must be one of {', '.join(_INBOUND_MODES)}, got {mode!r}")
        secret_file = typed(p, self, "secret_file", str, optional=True)
        if mode == "bearer" and not secret_file:
            p.add("secret_file", "required when mode is 'bearer'")
        url = typed(p, self, "url", str, optional=True, show=False)
        if url is not None:
            try:
                parse_upstream(url)
            except ValueError as exc:
                p.add("url", str(exc))
        elif mode == "forward_auth":
            p.add("url", "required when mode is 'forward_auth'")
        pairs: object = self.identity_headers
        if isinstance(pairs, Mapping):
            pairs = tuple(pairs.items())
        if isinstance(pairs, list | tuple) and all(
            isinstance(pair, list | tuple) and len(pair) == 2 for pair in pairs
        ):
            object.__setattr__(self, "identity_headers", tuple((a, b) for a, b in pairs))
            for source_name, target_name in self.identity_headers:
                for name in (source_name, target_name):
                    if not isinstance(name, str) or not TOKEN_RE.fullmatch(name):
                        p.add("identity_headers", f"{name!r} is not a valid header name")
        else:
            p.add("identity_headers", f"expected a table of header names, got {describe(pairs)}")
        login = typed(p, self, "login_url", str, optional=True)
        if login is not None and not login:
            p.add("login_url", "must be a non-empty URL or path")
        number(p, self, "cache_seconds", zero_ok=True)
        typed(p, self, "cache_anonymous", bool)
        number(p, self, "timeout", zero_ok=False)
        p.check()

    @property
    def identity_targets(self) -> tuple[str, ...]:
        """Upstream header names that carry identity: clients may never set them."""
        return tuple(target for _, target in self.identity_headers)


@dataclass(frozen=True, slots=True)
class SSESettings:
    """SSE features of a route: ``heartbeat`` seconds of client silence before a comment line
    (0 = off), in-band ``errors`` for clients that accept ``text/event-stream``, and a JSON-lines
    ``transcript`` file of every stream (``transcript_max_bytes`` of event data kept each)."""

    heartbeat: float = 0.0
    errors: bool = False
    transcript: str | None = None
    transcript_max_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        p = Problems()
        number(p, self, "heartbeat", zero_ok=True)
        typed(p, self, "errors", bool)
        transcript = typed(p, self, "transcript", str, optional=True)
        if transcript == "":
            p.add("transcript", "must be a non-empty file path")
        integer(p, self, "transcript_max_bytes", 1024)
        p.check()

    @property
    def enabled(self) -> bool:
        return bool(self.heartbeat or self.errors or self.transcript)


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """WebSocket relay settings of a ``websocket = true`` route (seconds; 0 = off)."""

    max_message_bytes: int = 16 * 1024 * 1024
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    max_lifetime: float = 0.0

    def __post_init__(self) -> None:
        p = Problems()
        integer(p, self, "max_message_bytes", 1)
        number(p, self, "ping_interval", zero_ok=True)
        number(p, self, "ping_timeout", zero_ok=False)
        number(p, self, "max_lifetime", zero_ok=True)
        p.check()


@dataclass(frozen=True, slots=True)
class Route:
    """Forward requests whose path starts with ``prefix`` to ``upstream``.

    With ``strip_prefix``, ``/v1/x`` under prefix ``/v1/`` and upstream ``http://h/api/`` goes to
    ``/api/x``. ``timeouts=None`` uses :attr:`Config.timeouts`; ``name`` defaults to ``prefix``.
    """

    prefix: str
    upstream: str | None = None
    strip_prefix: bool = True
    preserve_host: bool = False
    accept_encoding: str = "passthrough"
    ca_file: str | None = None
    timeouts: Timeouts | None = None
    inject: Inject | None = None
    name: str = ""
    inbound: str | None = None
    deny_git_push: bool = False
    methods: tuple[str, ...] | None = None
    deny_paths: tuple[str, ...] = ()
    max_body_bytes: int | None = None
    rate_limit: RateLimit | None = None
    websocket: bool = False
    ws: WebSocketSettings = WebSocketSettings()
    sse: SSESettings = SSESettings()
    #: Keep ``%2F`` / ``%5C`` in paths (else 400); the upstream must not decode them.
    allow_encoded_slashes: bool = False
    #: Forward ``//a///b`` as ``/a/b`` (decisions always see the merged path).
    merge_slashes: bool = True
    #: An upstream group (exactly one of ``upstream`` or ``upstreams``): see README.
    upstreams: tuple[UpstreamEntry, ...] | None = None
    balance: str = "least_connections"
    hash_on: str | None = None
    retry: RetryPolicy | None = None
    health_check: HealthCheck | None = None
    outlier: Outlier | None = None
    affinity: str | None = None
    max_retry_body_bytes: int = 64 * 1024
    #: The upstreams, every setting resolved (one for ``upstream = "..."``).
    group: tuple[UpstreamSpec, ...] = field(init=False)
    #: The first upstream's target (the only one of a single-upstream route).
    target: Upstream = field(init=False)

    def __post_init__(self) -> None:
        p = Problems()
        prefix = typed(p, self, "prefix", str)
        if prefix is not None and (problem := prefix_problem(prefix)):
            p.add("prefix", problem)
        upstream = typed(p, self, "upstream", str, optional=True, show=False)
        target = None
        if upstream is not None:
            try:
                target = parse_upstream(upstream, websocket=self.websocket is True)
            except ValueError as exc:
                p.add("upstream", str(exc))
        typed(p, self, "strip_prefix", bool)
        typed(p, self, "preserve_host", bool)
        encoding = typed(p, self, "accept_encoding", str)
        if encoding is not None and encoding not in ENCODINGS:
            p.add("accept_encoding", f"must be 'passthrough' or 'identity', got {encoding!r}")
        ca_file = typed(p, self, "ca_file", str, optional=True)
        if ca_file == "":
            p.add("ca_file", "must be a non-empty file path")
        elif ca_file is not None and target is not None and target.scheme != "https":
            p.add("ca_file", "only allowed for https upstreams")
        instance(p, self, "timeouts", Timeouts, optional=True)
        instance(p, self, "inject", Inject, optional=True)
        typed(p, self, "name", str)
        inbound = typed(p, self, "inbound", str, optional=True)
        if inbound is not None and inbound not in _INBOUND_MODES:
            p.add("inbound", f"must be one of {', '.join(_INBOUND_MODES)}, got {inbound!r}")
        typed(p, self, "deny_git_push", bool)
        methods_ok = _string_tuple(p, self, "methods", optional=True)
        if methods_ok and self.methods is not None and (problem := validate_methods(self.methods)):
            p.add("methods", problem)
        if _string_tuple(p, self, "deny_paths"):
            for pattern in self.deny_paths:
                if problem := validate_pattern(pattern):
                    p.add("deny_paths", problem)
        max_body = typed(p, self, "max_body_bytes", int, optional=True)
        if max_body is not None and max_body < 0:
            p.add("max_body_bytes", f"must be >= 0, got {max_body}")
        instance(p, self, "rate_limit", RateLimit, optional=True)
        typed(p, self, "websocket", bool)
        instance(p, self, "ws", WebSocketSettings)
        instance(p, self, "sse", SSESettings)
        typed(p, self, "allow_encoded_slashes", bool)
        typed(p, self, "merge_slashes", bool)
        group = resolve_group(p, self, target)  # checks the group's keys too
        p.check()
        if not self.name:
            object.__setattr__(self, "name", self.prefix)
        object.__setattr__(self, "group", group)
        object.__setattr__(self, "target", group[0].target)  # p.check(): group is not empty

    @property
    def retry_policy(self) -> RetryPolicy:
        """``retry``, or the default: two tries on a group (connect errors), one alone."""
        if self.retry is not None:
            return self.retry
        return _GROUP_RETRY if len(self.group) > 1 else _SINGLE_RETRY

    @property
    def outlier_policy(self) -> Outlier | None:
        """``outlier``, or the default for a group; never for a single upstream."""
        if len(self.group) < 2:
            return None
        return self.outlier if self.outlier is not None else _GROUP_OUTLIER


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Client-facing listener settings (timeouts in seconds)."""

    listen: tuple[str, ...] = ("127.0.0.1:8080",)
    max_connections: int = 10000
    max_header_bytes: int = 65536
    max_header_count: int = 100
    header_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    allow_public: bool = False
    shutdown_grace: float = 30.0
    workers: int = 1
    #: CIDRs of proxies in front of this one: only they may supply ``X-Forwarded-For``.
    trusted_proxies: tuple[str, ...] = ()
    #: The key that authenticates MCP session ids minted through ``affinity`` routes.
    session_key_file: str | None = None
    trusted_networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p = Problems()
        listen: object = self.listen
        single = isinstance(listen, str)  # a bare string is accepted as one address
        addresses = (listen,) if single else listen
        if isinstance(addresses, list | tuple):
            object.__setattr__(self, "listen", tuple(addresses))
            if not addresses:
                p.add("listen", "at least one address is required")
            for index, addr in enumerate(addresses):
                path = "listen" if single else f"listen[{index}]"
                if not isinstance(addr, str):
                    p.add(path, f"expected a string, got {describe(addr)}")
                    continue
                try:
                    parse_listen(addr)
                except ValueError as exc:
                    p.add(path, str(exc))
        else:
            p.add("listen", f"expected a string or an array of strings, got {describe(listen)}")
        integer(p, self, "max_connections", 1)
        integer(p, self, "max_header_bytes", 1024)
        integer(p, self, "max_header_count", 1)
        number(p, self, "header_timeout", zero_ok=False)
        number(p, self, "keepalive_timeout", zero_ok=False)
        typed(p, self, "allow_public", bool)
        number(p, self, "shutdown_grace", zero_ok=True)
        integer(p, self, "workers", 0, 1024)
        key_file = typed(p, self, "session_key_file", str, optional=True)
        if key_file == "":
            p.add("session_key_file", "must be a non-empty file path")
        networks: list[IPNetwork] = []
        if _string_tuple(p, self, "trusted_proxies"):
            for index, cidr in enumerate(self.trusted_proxies):
                try:
                    networks.append(ipaddress.ip_network(cidr, strict=False))
                except ValueError:
                    p.add(
                        f"trusted_proxies[{index}]",
                        f"must be an IP address or CIDR such as '10.0.0.0/8', got {cidr!r}",
                    )
        p.check()
        object.__setattr__(self, "trusted_networks", tuple(networks))

    @property
    def listen_addresses(self) -> tuple[tuple[str, int], ...]:
        """Parsed ``(host, port)`` pairs; IPv6 hosts without brackets."""
        return tuple(parse_listen(addr) for addr in self.listen)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Upstream connection pool: idle connections kept per origin (0 disables pooling) and for
    how many seconds."""

    max_idle_per_origin: int = 32
    idle_timeout: float = 60.0

    def __post_init__(self) -> None:
        p = Problems()
        integer(p, self, "max_idle_per_origin", 0)
        number(p, self, "idle_timeout", zero_ok=False)
        p.check()


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The admin listener (``/healthz``, ``/readyz``, ``/metrics``); off when ``listen`` is None."""

    listen: str | None = None

    def __post_init__(self) -> None:
        p = Problems()
        listen = typed(p, self, "listen", str, optional=True)
        if listen is not None:
            try:
                parse_listen(listen)
            except ValueError as exc:
                p.add("listen", str(exc))
        p.check()

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen is not None else None


@dataclass(frozen=True, slots=True)
class Tunnel:
    """The reverse-tunnel gateway (``[tunnel]``, docs/tunnel.md): clients connect out over a
    WebSocket on ``path`` and register a local MCP server; ``api_prefix`` serves the sessions
    over HTTP. Seconds and bytes; ``allowed`` empty = every authenticated identity may open
    a session; ``admins`` see and use every session."""

    enabled: bool = False
    path: str = "/reverse-proxy/ws"
    api_prefix: str = "/reverse-proxy/sessions"
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 90.0
    request_timeout: float = 90.0
    max_sessions: int = 1000
    max_sessions_per_owner: int = 20
    max_pending_requests: int = 64
    max_message_bytes: int = 1024 * 1024
    allowed: tuple[str, ...] = ()
    admins: tuple[str, ...] = ()

    #: The prefix of the synthetic route the gateway is served on.
    ROUTE_PREFIX = "/reverse-proxy/"

    def __post_init__(self) -> None:
        p = Problems()
        typed(p, self, "enabled", bool)
        for name in ("path", "api_prefix"):
            value = typed(p, self, name, str)
            if value is not None and (
                not value.startswith(self.ROUTE_PREFIX) or value == self.ROUTE_PREFIX
            ):
                p.add(name, f"must be a path under {self.ROUTE_PREFIX}, got {value!r}")
            elif value is not None and _bad_path(value):
                p.add(name, f"must be a plain path (no query or dot segments), got {value!r}")
        if self.path == self.api_prefix or self.path.startswith(self.api_prefix.rstrip("/") + "/"):
            p.add("path", "must not be under api_prefix")
        number(p, self, "heartbeat_interval", zero_ok=False)
        number(p, self, "heartbeat_timeout", zero_ok=False)
        number(p, self, "request_timeout", zero_ok=False)
        integer(p, self, "max_sessions", 1)
        integer(p, self, "max_sessions_per_owner", 1)
        integer(p, self, "max_pending_requests", 1)
        integer(p, self, "max_message_bytes", 1024)
        _string_tuple(p, self, "allowed")
        _string_tuple(p, self, "admins")
        p.check()


def _bad_path(path: str) -> bool:
    if any(c in "?#%" or c.isspace() or not c.isprintable() for c in path):
        return True
    return any(segment in (".", "..") for segment in path.split("/"))
