"""The whole configuration (:class:`Config`) and its loaders: TOML, and the legacy JSON
route table of the sidecar proxycore replaces.

``Config`` lives here, not in :mod:`.model`, so that its classmethod loaders need no import
back into the model: load -> model -> checks. Loaders collect *all* problems of a file and
report them together as ``"<file>: <key.path>: <problem>"``; relative file paths in a file
resolve against that file's directory.

Pure (stdlib only, no trio/h11); secret values are never read here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..config.checks import (
    ConfigError,
    Problems,
    describe,
    duplicates,
    instance,
    join,
    typed,
)
from ..config.groups import HealthCheck, Outlier, RetryPolicy, UpstreamEntry
from ..config.model import (
    AdminSettings,
    Inbound,
    Inject,
    PoolSettings,
    RateLimit,
    Route,
    ServerSettings,
    SSESettings,
    Timeouts,
    Tunnel,
    WebSocketSettings,
)
from ..config.state import StateSettings

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["Config"]

_D = TypeVar("_D", bound="DataclassInstance")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole proxy configuration. Zero routes is allowed in code (not from files)."""

    routes: tuple[Route, ...] = ()
    server: ServerSettings = ServerSettings()
    timeouts: Timeouts = Timeouts()
    pool: PoolSettings = PoolSettings()
    inbound: Inbound = Inbound()
    admin: AdminSettings = AdminSettings()
    tunnel: Tunnel = Tunnel()
    source: str | None = None
    state: StateSettings = StateSettings()

    def __post_init__(self) -> None:
        p = Problems()
        routes: object = self.routes
        if isinstance(routes, list | tuple):
            object.__setattr__(self, "routes", tuple(routes))
            bad = [i for i, route in enumerate(routes) if not isinstance(route, Route)]
            for i in bad:
                p.add(f"routes[{i}]", f"expected Route, got {describe(routes[i], show=False)}")
            if not bad:
                duplicates(p, enumerate(route.prefix for route in routes))
        else:
            p.add("routes", f"expected a sequence of Route, got {describe(routes, show=False)}")
        instance(p, self, "server", ServerSettings)
        instance(p, self, "timeouts", Timeouts)
        instance(p, self, "pool", PoolSettings)
        instance(p, self, "inbound", Inbound)
        instance(p, self, "admin", AdminSettings)
        instance(p, self, "tunnel", Tunnel)
        instance(p, self, "state", StateSettings)
        typed(p, self, "source", str, optional=True)
        if not p.items:
            self._add_tunnel_route(p)
        if not p.items:
            for index, route in enumerate(self.routes):
                mode = self.inbound_mode(route)
                if mode == "bearer" and not self.inbound.secret_file:
                    p.add(f"routes[{index}].inbound", "'bearer' needs inbound.secret_file")
                if mode == "forward_auth" and not self.inbound.url:
                    p.add(f"routes[{index}].inbound", "'forward_auth' needs inbound.url")
                if route.affinity and not self.server.session_key_file:
                    p.add(
                        f"routes[{index}].affinity",
                        "'mcp_session' needs server.session_key_file (the key that signs the "
                        "session ids clients see)",
                    )
        p.check()

    def _add_tunnel_route(self, p: Problems) -> None:
        """With ``[tunnel] enabled``, append :meth:`tunnel_route` (once: a copy of this
        config keeps it); a user route on its prefix is an error."""
        synthetic = self.tunnel_route()
        if synthetic is None:
            return
        stem = Tunnel.ROUTE_PREFIX.rstrip("/")
        for index, route in enumerate(self.routes):
            if route != synthetic and (route.prefix + "/").startswith(stem + "/"):
                p.add(f"routes[{index}].prefix", f"{stem}/ is taken by [tunnel] (enabled)")
        if synthetic not in self.routes:
            object.__setattr__(self, "routes", (*self.routes, synthetic))

    def tunnel_route(self) -> Route | None:
        """The synthetic route the tunnel is served on (None when it is off): the normal
        admission (auth, policy, rate limits, hooks, access log) runs on it, then the
        exchange hands the request to the tunnel. Frames over ``max_message_bytes`` get an
        ``error`` from the gateway; only frames over four times that are cut (1009)."""
        if not self.tunnel.enabled:
            return None
        ws = WebSocketSettings(
            max_message_bytes=4 * self.tunnel.max_message_bytes, ping_interval=0.0
        )
        return Route(
            Tunnel.ROUTE_PREFIX, "http://127.0.0.1:9/", name="tunnel", websocket=True, ws=ws
        )

    def is_tunnel_route(self, route: Route) -> bool:
        return self.tunnel.enabled and route == self.tunnel_route()

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
            raise ConfigError(f"{source}: expected a table at the top level, got {describe(raw)}")
        p = Problems()
        known = ("server", "timeouts", "pool", "inbound", "admin", "tunnel", "state", "routes")
        _check_keys(p, raw, "", known)
        base_dir = os.path.dirname(os.path.abspath(source))
        server_table = raw.get("server", {})
        if isinstance(server_table, Mapping) and isinstance(
            server_table.get("session_key_file"), str
        ):
            key_file = os.path.join(base_dir, server_table["session_key_file"])
            server_table = {**server_table, "session_key_file": key_file}
        server = _build(p, ServerSettings, server_table, "server")
        timeouts = _build(p, Timeouts, raw.get("timeouts", {}), "timeouts") or Timeouts()
        pool = _build(p, PoolSettings, raw.get("pool", {}), "pool")
        inbound_table = raw.get("inbound", {})
        if isinstance(inbound_table, Mapping) and isinstance(inbound_table.get("secret_file"), str):
            secret_file = os.path.join(base_dir, inbound_table["secret_file"])
            inbound_table = {**inbound_table, "secret_file": secret_file}
        inbound = _build(p, Inbound, inbound_table, "inbound")
        admin = _build(p, AdminSettings, raw.get("admin", {}), "admin")
        tunnel = _build(p, Tunnel, raw.get("tunnel", {}), "tunnel")
        state_raw = raw.get("state", {})
        if isinstance(state_raw, Mapping) and isinstance(state_raw.get("relay_secret_file"), str):
            secret_path = os.path.join(base_dir, state_raw["relay_secret_file"])
            state_raw = {**state_raw, "relay_secret_file": secret_path}
        state = _build(p, StateSettings, state_raw, "state")
        routes: list[tuple[int, Route]] = []
        raw_routes = raw.get("routes", ())
        if not isinstance(raw_routes, list | tuple):
            p.add("routes", f"expected an array of tables, got {describe(raw_routes)}")
        elif not raw_routes and not (tunnel is not None and tunnel.enabled):
            p.add("routes", "at least one [[routes]] table is required")
        else:
            for index, table in enumerate(raw_routes):
                route = _route_from_table(p, table, f"routes[{index}]", timeouts, base_dir)
                if route is not None:
                    routes.append((index, route))
            duplicates(p, ((index, route.prefix) for index, route in routes))
        p.check(source)
        try:  # checks across sections name the file too
            return cls(
                routes=tuple(route for _, route in routes),
                server=server or ServerSettings(),
                timeouts=timeouts,
                pool=pool or PoolSettings(),
                inbound=inbound or Inbound(),
                admin=admin or AdminSettings(),
                tunnel=tunnel or Tunnel(),
                source=source,
                state=state or StateSettings(),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {problem}" for problem in exc.problems) from None

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
            raise ConfigError(f"{source}: expected a JSON object, got {describe(data)}")
        p = Problems()
        _check_keys(p, data, "", ("routes",))
        routes: list[tuple[int, Route]] = []
        raw_routes = data.get("routes")
        if not isinstance(raw_routes, list) or not raw_routes:
            p.add("routes", f"expected a non-empty array of routes, got {describe(raw_routes)}")
        else:
            for index, entry in enumerate(raw_routes):
                legacy = _build(p, _LegacyRoute, entry, f"routes[{index}]", "JSON object")
                if legacy is not None:
                    routes.append((index, legacy.route))
            duplicates(p, ((index, route.prefix) for index, route in routes), key="path")
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


def _check_keys(p: Problems, table: Mapping[Any, Any], path: str, known: Sequence[str]) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            p.add(join(path, str(key)), f"unknown key (known: {', '.join(known)}){hint}")


def _build(p: Problems, cls: type[_D], raw: object, path: str, kind: str = "table") -> _D | None:
    """Construct dataclass ``cls`` from table ``raw``, recording every problem under ``path``."""
    if not isinstance(raw, Mapping):
        p.add(path, f"expected a {kind}, got {describe(raw)}")
        return None
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    known = [f.name for f in init_fields]
    _check_keys(p, raw, path, known)
    kwargs = {key: value for key, value in raw.items() if key in known}
    required = [f.name for f in init_fields if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    for name in missing:  # validate the rest with None standing in for missing keys
        p.add(join(path, name), "required key is missing")
        kwargs[name] = None
    try:
        built = cls(**kwargs)
    except ConfigError as exc:
        p.absorb(exc, path, skip=missing)
        return None
    return None if missing else built


def _route_from_table(
    p: Problems, raw: object, path: str, defaults: Timeouts, base_dir: str
) -> Route | None:
    """Build one ``[[routes]]`` table: merge timeouts, resolve and check files, then validate."""
    if not isinstance(raw, Mapping):
        p.add(path, f"expected a table, got {describe(raw)}")
        return None
    table = dict(raw)
    start = len(p.items)
    if "timeouts" in table:
        overrides = table["timeouts"]
        if isinstance(overrides, Mapping):
            overrides = {**dataclasses.asdict(defaults), **overrides}
        table["timeouts"] = _build(p, Timeouts, overrides, f"{path}.timeouts")
    if "inject" in table:
        table["inject"] = _inject_table(p, table["inject"], f"{path}.inject", base_dir)
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
    for key, cls in (("retry", RetryPolicy), ("health_check", HealthCheck), ("outlier", Outlier)):
        if key in table:
            table[key] = _build(p, cls, table[key], f"{path}.{key}")
    if isinstance(table.get("upstreams"), list):
        table["upstreams"] = [
            _entry_from_table(p, entry, f"{path}.upstreams[{index}]", base_dir)
            for index, entry in enumerate(table["upstreams"])
        ]
    _resolve_ca_file(p, table, path, base_dir)
    route = _build(p, Route, table, path)
    return route if len(p.items) == start else None


def _resolve_ca_file(p: Problems, table: dict[str, object], path: str, base_dir: str) -> None:
    """Make ``table``'s ``ca_file`` relative to the config file and check it is readable."""
    ca_file = table.get("ca_file")
    if isinstance(ca_file, str) and ca_file:
        ca_file = table["ca_file"] = os.path.join(base_dir, ca_file)
        try:
            with open(ca_file, "rb"):
                pass
        except OSError as exc:
            p.add(f"{path}.ca_file", f"cannot read {ca_file!r}: {exc.strerror or exc}")


def _inject_table(p: Problems, raw: object, path: str, base_dir: str) -> Inject | None:
    if isinstance(raw, Mapping) and isinstance(raw.get("token_file"), str):
        raw = {**raw, "token_file": os.path.join(base_dir, raw["token_file"])}
    return _build(p, Inject, raw, path)


def _entry_from_table(p: Problems, raw: object, path: str, base_dir: str) -> object:
    """One entry of ``upstreams``: an :class:`UpstreamEntry`, or ``raw`` when it is not a
    table (the route reports its type), or None when its problems are recorded."""
    if not isinstance(raw, Mapping):
        return raw
    table = dict(raw)
    if "inject" in table:
        table["inject"] = _inject_table(p, table["inject"], f"{path}.inject", base_dir)
    _resolve_ca_file(p, table, path, base_dir)
    # An entry whose problems are recorded is stood in for (a unique name: no more noise).
    return _build(p, UpstreamEntry, table, path) or UpstreamEntry(_SKIPPED, name=path)


_SKIPPED = "http://invalid.invalid/"


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
        p = Problems()
        for name in ("path", "upstream", "auth_scheme", "token_env"):
            typed(p, self, name, str, show=name == "path")
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
