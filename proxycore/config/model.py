"""Typed, immutable proxy configuration.

A :class:`Config` is built in code or loaded from TOML (:meth:`Config.from_toml`) or from the
legacy JSON route table of the sidecar proxycore replaces (:meth:`Config.from_legacy_json`).
Every dataclass validates itself in ``__post_init__`` and raises :class:`ConfigError`; loaders
collect *all* problems of a file and report them together as ``"<file>: <key.path>: <problem>"``.

This module is pure (stdlib only, no trio/h11) and never reads secret values: it only holds
environment variable *names* and file *paths*, and never echoes URLs or credential fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from ..config.checks import (
    _D,
    _ENCODINGS,
    _ENV_NAME_RE,
    _TOKEN_RE,
    ConfigError,
    Upstream,
    _describe,
    _duplicates,
    _instance,
    _integer,
    _join,
    _number,
    _parse_listen,
    _parse_upstream,
    _prefix_problem,
    _Problems,
    _typed,
)
from ..security.policy import validate_methods, validate_pattern

__all__ = [
    "AdminSettings",
    "Config",
    "ConfigError",
    "Inbound",
    "Inject",
    "PoolSettings",
    "RateLimit",
    "Route",
    "SSESettings",
    "ServerSettings",
    "Timeouts",
    "Upstream",
    "WebSocketSettings",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds: connect, response head, idle gap between body reads and the
    whole exchange (``total = 0`` means no limit)."""

    connect: float = 10.0
    response: float = 3600.0
    idle: float = 3600.0
    total: float = 0.0

    def __post_init__(self) -> None:
        p = _Problems()
        for name in ("connect", "response", "idle"):
            _number(p, self, name, zero_ok=False)
        _number(p, self, "total", zero_ok=True)
        p.check()


@dataclass(frozen=True, slots=True)
class Inject:
    """Credential injection: send ``header: [scheme ]<token>`` with the token read (elsewhere, at
    runtime) from environment variable ``token_env`` or from file ``token_file``."""

    header: str = "Authorization"
    scheme: str | None = None
    token_env: str | None = None
    token_file: str | None = None

    def __post_init__(self) -> None:
        p = _Problems()  # values are never echoed: a misplaced token must not leak into logs
        header = _typed(p, self, "header", str, show=False)
        if header is not None and not _TOKEN_RE.fullmatch(header):
            p.add("header", "must be a valid HTTP header name")
        scheme = _typed(p, self, "scheme", str, optional=True, show=False)
        if scheme is not None and not _TOKEN_RE.fullmatch(scheme):
            p.add("scheme", "must be a single token such as 'Bearer' (no spaces)")
        env = _typed(p, self, "token_env", str, optional=True, show=False)
        if env is not None and not _ENV_NAME_RE.fullmatch(env):
            p.add("token_env", "must be the name of an environment variable, not the token itself")
        path = _typed(p, self, "token_file", str, optional=True, show=False)
        if path is not None and (not path or "\0" in path):
            p.add("token_file", "must be a non-empty file path")
        if (self.token_env is None) == (self.token_file is None):
            p.add("token_env", "exactly one of token_env or token_file must be set")
        p.check()


_INBOUND_MODES = ("none", "bearer", "forward_auth")
_RATE_KEYS = ("client_ip", "identity", "bearer")


def _string_tuple(p: _Problems, obj: object, name: str, *, optional: bool = False) -> bool:
    """Accept a list or tuple of strings (stored as a tuple); False if it is not one."""
    value = getattr(obj, name)
    if value is None and optional:
        return True
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        p.add(name, f"expected an array of strings, got {_describe(value)}")
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
        p = _Problems()
        _number(p, self, "requests_per_second", zero_ok=False)
        _integer(p, self, "burst", 1)
        key = _typed(p, self, "key", str)
        if key is not None and key not in _RATE_KEYS:
            p.add("key", f"must be one of {', '.join(_RATE_KEYS)}, got {key!r}")
        _integer(p, self, "max_concurrent_streams", 0)
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
        p = _Problems()
        mode = _typed(p, self, "mode", str)
        if mode is not None and mode not in _INBOUND_MODES:
            p.add("mode", f"must be one of {', '.join(_INBOUND_MODES)}, got {mode!r}")
        secret_file = _typed(p, self, "secret_file", str, optional=True)
        if mode == "bearer" and not secret_file:
            p.add("secret_file", "required when mode is 'bearer'")
        url = _typed(p, self, "url", str, optional=True, show=False)
        if url is not None:
            try:
                _parse_upstream(url)
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
                    if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name):
                        p.add("identity_headers", f"{name!r} is not a valid header name")
        else:
            p.add("identity_headers", f"expected a table of header names, got {_describe(pairs)}")
        login = _typed(p, self, "login_url", str, optional=True)
        if login is not None and not login:
            p.add("login_url", "must be a non-empty URL or path")
        _number(p, self, "cache_seconds", zero_ok=True)
        _typed(p, self, "cache_anonymous", bool)
        _number(p, self, "timeout", zero_ok=False)
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
        p = _Problems()
        _number(p, self, "heartbeat", zero_ok=True)
        _typed(p, self, "errors", bool)
        transcript = _typed(p, self, "transcript", str, optional=True)
        if transcript == "":
            p.add("transcript", "must be a non-empty file path")
        _integer(p, self, "transcript_max_bytes", 1024)
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
        p = _Problems()
        _integer(p, self, "max_message_bytes", 1)
        _number(p, self, "ping_interval", zero_ok=True)
        _number(p, self, "ping_timeout", zero_ok=False)
        _number(p, self, "max_lifetime", zero_ok=True)
        p.check()


@dataclass(frozen=True, slots=True)
class Route:
    """Forward requests whose path starts with ``prefix`` to ``upstream``.

    With ``strip_prefix``, ``/v1/x`` under prefix ``/v1/`` and upstream ``http://h/api/`` goes to
    ``/api/x``. ``timeouts=None`` uses :attr:`Config.timeouts`; ``name`` defaults to ``prefix``.
    """

    prefix: str
    upstream: str
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
    target: Upstream = field(init=False)

    def __post_init__(self) -> None:
        p = _Problems()
        prefix = _typed(p, self, "prefix", str)
        if prefix is not None and (problem := _prefix_problem(prefix)):
            p.add("prefix", problem)
        upstream = _typed(p, self, "upstream", str, show=False)
        target = None
        if upstream is not None:
            try:
                target = _parse_upstream(upstream, websocket=self.websocket is True)
            except ValueError as exc:
                p.add("upstream", str(exc))
        _typed(p, self, "strip_prefix", bool)
        _typed(p, self, "preserve_host", bool)
        encoding = _typed(p, self, "accept_encoding", str)
        if encoding is not None and encoding not in _ENCODINGS:
            p.add("accept_encoding", f"must be 'passthrough' or 'identity', got {encoding!r}")
        ca_file = _typed(p, self, "ca_file", str, optional=True)
        if ca_file == "":
            p.add("ca_file", "must be a non-empty file path")
        elif ca_file is not None and target is not None and target.scheme != "https":
            p.add("ca_file", "only allowed for https upstreams")
        _instance(p, self, "timeouts", Timeouts, optional=True)
        _instance(p, self, "inject", Inject, optional=True)
        _typed(p, self, "name", str)
        inbound = _typed(p, self, "inbound", str, optional=True)
        if inbound is not None and inbound not in _INBOUND_MODES:
            p.add("inbound", f"must be one of {', '.join(_INBOUND_MODES)}, got {inbound!r}")
        _typed(p, self, "deny_git_push", bool)
        methods_ok = _string_tuple(p, self, "methods", optional=True)
        if methods_ok and self.methods is not None and (problem := validate_methods(self.methods)):
            p.add("methods", problem)
        if _string_tuple(p, self, "deny_paths"):
            for pattern in self.deny_paths:
                if problem := validate_pattern(pattern):
                    p.add("deny_paths", problem)
        max_body = _typed(p, self, "max_body_bytes", int, optional=True)
        if max_body is not None and max_body < 0:
            p.add("max_body_bytes", f"must be >= 0, got {max_body}")
        _instance(p, self, "rate_limit", RateLimit, optional=True)
        _typed(p, self, "websocket", bool)
        _instance(p, self, "ws", WebSocketSettings)
        _instance(p, self, "sse", SSESettings)
        _typed(p, self, "allow_encoded_slashes", bool)
        _typed(p, self, "merge_slashes", bool)
        p.check()
        if not self.name:
            object.__setattr__(self, "name", self.prefix)
        object.__setattr__(self, "target", target)


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
    trusted_networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p = _Problems()
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
                    p.add(path, f"expected a string, got {_describe(addr)}")
                    continue
                try:
                    _parse_listen(addr)
                except ValueError as exc:
                    p.add(path, str(exc))
        else:
            p.add("listen", f"expected a string or an array of strings, got {_describe(listen)}")
        _integer(p, self, "max_connections", 1)
        _integer(p, self, "max_header_bytes", 1024)
        _integer(p, self, "max_header_count", 1)
        _number(p, self, "header_timeout", zero_ok=False)
        _number(p, self, "keepalive_timeout", zero_ok=False)
        _typed(p, self, "allow_public", bool)
        _number(p, self, "shutdown_grace", zero_ok=True)
        _integer(p, self, "workers", 0, 1024)
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
        return tuple(_parse_listen(addr) for addr in self.listen)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Upstream connection pool: idle connections kept per origin (0 disables pooling) and for
    how many seconds."""

    max_idle_per_origin: int = 32
    idle_timeout: float = 60.0

    def __post_init__(self) -> None:
        p = _Problems()
        _integer(p, self, "max_idle_per_origin", 0)
        _number(p, self, "idle_timeout", zero_ok=False)
        p.check()


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The admin listener (``/healthz``, ``/readyz``, ``/metrics``); off when ``listen`` is None."""

    listen: str | None = None

    def __post_init__(self) -> None:
        p = _Problems()
        listen = _typed(p, self, "listen", str, optional=True)
        if listen is not None:
            try:
                _parse_listen(listen)
            except ValueError as exc:
                p.add("listen", str(exc))
        p.check()

    @property
    def address(self) -> tuple[str, int] | None:
        return _parse_listen(self.listen) if self.listen is not None else None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole proxy configuration. Zero routes is allowed in code (not from files)."""

    routes: tuple[Route, ...] = ()
    server: ServerSettings = ServerSettings()
    timeouts: Timeouts = Timeouts()
    pool: PoolSettings = PoolSettings()
    inbound: Inbound = Inbound()
    admin: AdminSettings = AdminSettings()
    source: str | None = None

    def __post_init__(self) -> None:
        p = _Problems()
        routes: object = self.routes
        if isinstance(routes, list | tuple):
            object.__setattr__(self, "routes", tuple(routes))
            bad = [i for i, route in enumerate(routes) if not isinstance(route, Route)]
            for i in bad:
                p.add(f"routes[{i}]", f"expected Route, got {_describe(routes[i], show=False)}")
            if not bad:
                _duplicates(p, enumerate(route.prefix for route in routes))
        else:
            p.add("routes", f"expected a sequence of Route, got {_describe(routes, show=False)}")
        _instance(p, self, "server", ServerSettings)
        _instance(p, self, "timeouts", Timeouts)
        _instance(p, self, "pool", PoolSettings)
        _instance(p, self, "inbound", Inbound)
        _instance(p, self, "admin", AdminSettings)
        _typed(p, self, "source", str, optional=True)
        if not p.items:
            for index, route in enumerate(self.routes):
                mode = self.inbound_mode(route)
                if mode == "bearer" and not self.inbound.secret_file:
                    p.add(f"routes[{index}].inbound", "'bearer' needs inbound.secret_file")
                if mode == "forward_auth" and not self.inbound.url:
                    p.add(f"routes[{index}].inbound", "'forward_auth' needs inbound.url")
        p.check()

    def inbound_mode(self, route: Route) -> str:
        """The route's inbound authentication mode (its own, or the global one)."""
        return route.inbound if route.inbound is not None else self.inbound.mode

    def timeouts_for(self, route: Route) -> Timeouts:
        """The route's own timeouts, or the global defaults."""
        return route.timeouts if route.timeouts is not None else self.timeouts

    def with_routes(self, routes: Sequence[Route]) -> Config:
        """A copy of this config with ``routes`` replaced (validated again)."""
        return dataclasses.replace(self, routes=tuple(routes))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "<config>") -> Config:
        """Build from parsed TOML-shaped data; relative paths resolve against ``source``'s dir."""
        raw: object = data
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a table at the top level, got {_describe(raw)}")
        p = _Problems()
        _check_keys(p, raw, "", ("server", "timeouts", "pool", "inbound", "admin", "routes"))
        server = _build(p, ServerSettings, raw.get("server", {}), "server")
        timeouts = _build(p, Timeouts, raw.get("timeouts", {}), "timeouts") or Timeouts()
        pool = _build(p, PoolSettings, raw.get("pool", {}), "pool")
        base_dir = os.path.dirname(os.path.abspath(source))
        inbound_table = raw.get("inbound", {})
        if isinstance(inbound_table, Mapping) and isinstance(inbound_table.get("secret_file"), str):
            secret_file = os.path.join(base_dir, inbound_table["secret_file"])
            inbound_table = {**inbound_table, "secret_file": secret_file}
        inbound = _build(p, Inbound, inbound_table, "inbound")
        admin = _build(p, AdminSettings, raw.get("admin", {}), "admin")
        routes: list[tuple[int, Route]] = []
        raw_routes = raw.get("routes", ())
        if not isinstance(raw_routes, list | tuple):
            p.add("routes", f"expected an array of tables, got {_describe(raw_routes)}")
        elif not raw_routes:
            p.add("routes", "at least one [[routes]] table is required")
        else:
            for index, table in enumerate(raw_routes):
                route = _route_from_table(p, table, f"routes[{index}]", timeouts, base_dir)
                if route is not None:
                    routes.append((index, route))
            _duplicates(p, ((index, route.prefix) for index, route in routes))
        p.check(source)
        return cls(
            routes=tuple(route for _, route in routes),
            server=server or ServerSettings(),
            timeouts=timeouts,
            pool=pool or PoolSettings(),
            inbound=inbound or Inbound(),
            admin=admin or AdminSettings(),
            source=source,
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Config:
        """Load a TOML config file."""
        source = os.fspath(path)
        try:
            data = tomllib.loads(_read(source, "TOML"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from None
        return cls.from_mapping(data, source=source)

    @classmethod
    def from_legacy_json(cls, path: str | os.PathLike[str]) -> Config:
        """Load the legacy sidecar route table ``{"routes": [{"path", "upstream", ...}]}``."""
        source = os.fspath(path)
        try:
            data = json.loads(_read(source, "JSON"))
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{source}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {_describe(data)}")
        p = _Problems()
        _check_keys(p, data, "", ("routes",))
        routes: list[tuple[int, Route]] = []
        raw_routes = data.get("routes")
        if not isinstance(raw_routes, list) or not raw_routes:
            p.add("routes", f"expected a non-empty array of routes, got {_describe(raw_routes)}")
        else:
            for index, entry in enumerate(raw_routes):
                legacy = _build(p, _LegacyRoute, entry, f"routes[{index}]", "JSON object")
                if legacy is not None:
                    routes.append((index, legacy.route))
            _duplicates(p, ((index, route.prefix) for index, route in routes), key="path")
        p.check(source)
        return cls(routes=tuple(route for _, route in routes), source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Config:
        """Load ``path``: ``*.json`` as the legacy route table, anything else as TOML."""
        if os.fspath(path).lower().endswith(".json"):
            return cls.from_legacy_json(path)
        return cls.from_toml(path)


# --------------------------------------------------------------------------- loading helpers


def _read(source: str, kind: str) -> str:
    try:
        with open(source, "rb") as file:
            return file.read().decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: invalid {kind}: file is not valid UTF-8") from None


def _check_keys(p: _Problems, table: Mapping[Any, Any], path: str, known: Sequence[str]) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            p.add(_join(path, str(key)), f"unknown key (known: {', '.join(known)}){hint}")


def _build(p: _Problems, cls: type[_D], raw: object, path: str, kind: str = "table") -> _D | None:
    """Construct dataclass ``cls`` from table ``raw``, recording every problem under ``path``."""
    if not isinstance(raw, Mapping):
        p.add(path, f"expected a {kind}, got {_describe(raw)}")
        return None
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    known = [f.name for f in init_fields]
    _check_keys(p, raw, path, known)
    kwargs = {key: value for key, value in raw.items() if key in known}
    required = [f.name for f in init_fields if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    for name in missing:  # validate the rest with None standing in for missing keys
        p.add(_join(path, name), "required key is missing")
        kwargs[name] = None
    try:
        instance = cls(**kwargs)
    except ConfigError as exc:
        p.absorb(exc, path, skip=missing)
        return None
    return None if missing else instance


def _route_from_table(
    p: _Problems, raw: object, path: str, defaults: Timeouts, base_dir: str
) -> Route | None:
    """Build one ``[[routes]]`` table: merge timeouts, resolve and check files, then validate."""
    if not isinstance(raw, Mapping):
        p.add(path, f"expected a table, got {_describe(raw)}")
        return None
    table = dict(raw)
    start = len(p.items)
    if "timeouts" in table:
        overrides = table["timeouts"]
        if isinstance(overrides, Mapping):
            overrides = {**dataclasses.asdict(defaults), **overrides}
        table["timeouts"] = _build(p, Timeouts, overrides, f"{path}.timeouts")
    if "inject" in table:
        inject = table["inject"]
        if isinstance(inject, Mapping) and isinstance(inject.get("token_file"), str):
            inject = {**inject, "token_file": os.path.join(base_dir, inject["token_file"])}
        table["inject"] = _build(p, Inject, inject, f"{path}.inject")
    if "sse" in table:
        sse = table["sse"]
        if (
            isinstance(sse, Mapping)
            and isinstance(sse.get("transcript"), str)
            and sse["transcript"]
        ):
            sse = {**sse, "transcript": os.path.join(base_dir, sse["transcript"])}
        built = _build(p, SSESettings, sse, f"{path}.sse")
        if built is None:
            del table["sse"]
        else:
            table["sse"] = built
    if "ws" in table:
        ws = _build(p, WebSocketSettings, table["ws"], f"{path}.ws")
        if ws is None:
            del table["ws"]  # its problems are recorded; don't report the type too
        else:
            table["ws"] = ws
    if "rate_limit" in table:
        table["rate_limit"] = _build(p, RateLimit, table["rate_limit"], f"{path}.rate_limit")
    ca_file = table.get("ca_file")
    if isinstance(ca_file, str) and ca_file:
        ca_file = table["ca_file"] = os.path.join(base_dir, ca_file)
        try:
            with open(ca_file, "rb"):
                pass
        except OSError as exc:
            p.add(f"{path}.ca_file", f"cannot read {ca_file!r}: {exc.strerror or exc}")
    route = _build(p, Route, table, path)
    return route if len(p.items) == start else None


@dataclass(frozen=True, slots=True)
class _LegacyRoute:
    """One legacy route entry; ``route`` is its :class:`Route` (identity encoding, Bearer-style
    Authorization injection). An empty ``auth_scheme`` sends the bare token."""

    path: str
    upstream: str
    auth_scheme: str
    token_env: str
    route: Route = field(init=False)

    def __post_init__(self) -> None:
        p = _Problems()
        for name in ("path", "upstream", "auth_scheme", "token_env"):
            _typed(p, self, name, str, show=name == "path")
        path: object = self.path
        if isinstance(path, str) and not (path.startswith("/") and path.endswith("/")):
            p.add("path", "must start and end with '/'")
        reported = {item.partition(": ")[0] for item in p.items}  # don't report a key twice
        inject = route = None
        try:
            inject = Inject(scheme=self.auth_scheme or None, token_env=self.token_env)
        except ConfigError as exc:
            p.absorb(exc, "", rename={"scheme": "auth_scheme"}, skip=reported)
        try:
            route = Route(
                self.path,
                self.upstream,
                accept_encoding="identity",
                inject=inject,
                deny_git_push=True,
            )
        except ConfigError as exc:
            p.absorb(exc, "", rename={"prefix": "path"}, skip=reported)
        p.check()
        object.__setattr__(self, "route", route)
