"""Upstream groups in the config: several upstreams per route (pure, stdlib only).

A route names exactly one of ``upstream = "URL"`` or ``upstreams = [ {...}, ... ]``.
Either way :class:`~proxycore.config.model.Route` resolves it to a tuple of
:class:`UpstreamSpec` (``Route.group``): one upstream with every per-upstream
setting settled (the entry's own ``ca_file``/``inject``/``preserve_host``, else
the route's). The runtime (:mod:`proxycore.upstreams`) balances over them.

The settings tables (``retry``, ``health_check``, ``outlier``) validate
themselves like every other config dataclass; values are never echoed for URLs
and credentials.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Protocol

from ..config.checks import (
    Problems,
    Upstream,
    describe,
    instance,
    integer,
    number,
    parse_upstream,
    typed,
)
from ..config.inject import Inject

__all__ = [
    "BALANCE_MODES",
    "HealthCheck",
    "Outlier",
    "RetryPolicy",
    "UpstreamEntry",
    "UpstreamSpec",
    "parse_hash_on",
]

#: Values of a route's ``balance``.
BALANCE_MODES: Final = ("least_connections", "round_robin", "random_two", "hash")
#: Values of ``retry.on`` besides status codes.
RETRY_CONDITIONS: Final = ("connect_error", "reset", "timeout")
_HEADER_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True, slots=True)
class UpstreamEntry:
    """One entry of ``upstreams = [...]`` as written (checked, not yet resolved)."""

    url: str
    weight: int = 1
    backup: bool = False
    ca_file: str | None = None
    inject: Inject | None = None
    preserve_host: bool | None = None
    #: The upstream's name in metrics, logs and ``check`` (default ``host:port``).
    name: str = ""

    def __post_init__(self) -> None:
        p = Problems()
        url = typed(p, self, "url", str, show=False)
        if url is not None:
            try:  # the route checks the scheme again (ws:// only on websocket routes)
                parse_upstream(url, websocket=True)
            except ValueError as exc:
                p.add("url", str(exc))
        integer(p, self, "weight", 1, 1000)
        typed(p, self, "backup", bool)
        ca_file = typed(p, self, "ca_file", str, optional=True)
        if ca_file == "":
            p.add("ca_file", "must be a non-empty file path")
        instance(p, self, "inject", Inject, optional=True)
        typed(p, self, "preserve_host", bool, optional=True)
        name = typed(p, self, "name", str)
        if name is not None and any(not c.isprintable() or c in '"\\' for c in name):
            p.add("name", "must be printable, without quotes or backslashes")
        p.check()


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One upstream of a route, every setting resolved (built by ``Route``)."""

    name: str
    target: Upstream
    weight: int = 1
    backup: bool = False
    ca_file: str | None = None
    inject: Inject | None = None
    preserve_host: bool = False

    @property
    def label(self) -> str:
        """``scheme://host[:port]``: how the access log names it."""
        return f"{self.target.scheme}://{self.target.host_header}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries on another upstream of the group (``attempts`` counts every try, the first
    included). Connect errors are always retried; ``on`` adds ``reset`` (closed before a
    response head), ``timeout`` (``per_try_timeout`` passed without a head) and status
    codes. ``budget_percent`` caps retries to that share of the group's recent requests."""

    attempts: int = 2
    on: tuple[str, ...] = ("connect_error",)
    per_try_timeout: float = 0.0
    budget_percent: float = 20.0
    statuses: frozenset[int] = field(init=False, repr=False, compare=False)
    conditions: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p = Problems()
        integer(p, self, "attempts", 1, 10)
        number(p, self, "per_try_timeout", zero_ok=True)
        number(p, self, "budget_percent", zero_ok=True)
        if isinstance(self.budget_percent, int | float) and self.budget_percent > 100:
            p.add("budget_percent", f"must be between 0 and 100, got {self.budget_percent!r}")
        statuses: set[int] = set()
        conditions: set[str] = {"connect_error"}
        on: object = self.on
        if not isinstance(on, list | tuple):
            p.add("on", f"expected an array of strings, got {describe(on)}")
            on = ()
        assert isinstance(on, list | tuple)
        for index, item in enumerate(on):
            text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
            if not isinstance(text, str):
                p.add(f"on[{index}]", f"expected a string, got {describe(item)}")
            elif text in RETRY_CONDITIONS:
                conditions.add(text)
            elif text.isdigit() and len(text) == 3 and (text == "429" or text.startswith("5")):
                statuses.add(int(text))
            else:
                p.add(
                    f"on[{index}]",
                    "must be connect_error, reset, timeout, 429 or a 5xx status, "
                    f"got {describe(item)}",
                )
        p.check()
        object.__setattr__(self, "on", tuple(str(x) for x in on))
        object.__setattr__(self, "statuses", frozenset(statuses))
        object.__setattr__(self, "conditions", frozenset(conditions))


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checks: ``GET path`` every ``interval`` seconds (jittered) within
    ``timeout``; a 2xx or 3xx answer is a success. ``unhealthy_threshold`` failures in a
    row mark an upstream down, ``healthy_threshold`` successes in a row up again."""

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3

    def __post_init__(self) -> None:
        p = Problems()
        path = typed(p, self, "path", str)
        if path is not None and (
            not path.startswith("/") or any(c.isspace() or not c.isprintable() for c in path)
        ):
            p.add("path", "must be an absolute path such as '/healthz' (no spaces)")
        number(p, self, "interval", zero_ok=False)
        number(p, self, "timeout", zero_ok=False)
        integer(p, self, "healthy_threshold", 1, 100)
        integer(p, self, "unhealthy_threshold", 1, 100)
        p.check()


@dataclass(frozen=True, slots=True)
class Outlier:
    """Passive health: ``consecutive_failures`` connect errors, resets or 5xx in a row
    eject an upstream for ``base_eject_seconds`` x times ejected (at most
    ``max_eject_seconds``); never more than ``max_ejected_percent`` of the group at once.
    ``consecutive_failures = 0`` turns it off."""

    consecutive_failures: int = 5
    base_eject_seconds: float = 30.0
    max_eject_seconds: float = 300.0
    max_ejected_percent: float = 50.0

    def __post_init__(self) -> None:
        p = Problems()
        integer(p, self, "consecutive_failures", 0, 10_000)
        number(p, self, "base_eject_seconds", zero_ok=False)
        number(p, self, "max_eject_seconds", zero_ok=False)
        number(p, self, "max_ejected_percent", zero_ok=True)
        pct = self.max_ejected_percent
        if isinstance(pct, int | float) and not isinstance(pct, bool) and pct > 100:
            p.add("max_ejected_percent", f"must be between 0 and 100, got {pct!r}")
        p.check()


def parse_hash_on(value: str) -> str | None:
    """The problem with a ``hash_on`` value, or None: ``client_ip``, ``identity``,
    ``header:NAME`` or ``cookie:NAME``."""
    if value in ("client_ip", "identity"):
        return None
    kind, _, name = value.partition(":")
    if kind in ("header", "cookie") and name and _HEADER_RE.fullmatch(name):
        return None
    return f"must be client_ip, identity, header:NAME or cookie:NAME, got {value!r}"


def default_name(target: Upstream) -> str:
    """``host:port`` (IPv6 bracketed): an upstream's name unless the config gives one."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{host}:{target.port}"


def resolve_entry(
    entry: UpstreamEntry,
    *,
    websocket: bool,
    ca_file: str | None,
    inject: Inject | None,
    preserve_host: bool,
) -> UpstreamSpec:
    """The entry with the route's defaults applied. Raises ``ValueError`` (the URL's
    problem, never the URL itself)."""
    target = parse_upstream(entry.url, websocket=websocket)
    own_ca = entry.ca_file
    if own_ca is not None and target.scheme != "https":
        raise ValueError("ca_file is only allowed for https upstreams")
    return UpstreamSpec(
        name=entry.name or default_name(target),
        target=target,
        weight=entry.weight,
        backup=entry.backup,
        ca_file=own_ca if own_ca is not None else (ca_file if target.scheme == "https" else None),
        inject=entry.inject if entry.inject is not None else inject,
        preserve_host=entry.preserve_host if entry.preserve_host is not None else preserve_host,
    )


class _GroupedRoute(Protocol):
    """The route fields :func:`resolve_group` reads (``Route`` has them)."""

    @property
    def upstream(self) -> str | None: ...
    @property
    def upstreams(self) -> tuple[UpstreamEntry, ...] | None: ...
    @property
    def websocket(self) -> bool: ...
    @property
    def ca_file(self) -> str | None: ...
    @property
    def inject(self) -> Inject | None: ...
    @property
    def preserve_host(self) -> bool: ...
    @property
    def balance(self) -> str: ...
    @property
    def hash_on(self) -> str | None: ...
    @property
    def affinity(self) -> str | None: ...
    @property
    def max_retry_body_bytes(self) -> int: ...


def resolve_group(
    p: Problems, route: _GroupedRoute, target: Upstream | None
) -> tuple[UpstreamSpec, ...]:
    """Check the group keys of ``route`` and resolve its upstreams (``target``: the parsed
    ``upstream``, if any). Records problems in ``p``; returns ``()`` when there are any."""
    start = len(p.items)
    entries: object = route.upstreams
    specs: list[UpstreamSpec] = []
    websocket = route.websocket is True
    ca_file = route.ca_file if isinstance(route.ca_file, str) and route.ca_file else None
    inject = route.inject if isinstance(route.inject, Inject) else None
    preserve = route.preserve_host is True
    if (route.upstream is None) == (entries is None):
        p.add("upstream", "exactly one of upstream or upstreams must be set")
    elif entries is not None:
        if not isinstance(entries, list | tuple) or not entries:
            p.add("upstreams", f"expected a non-empty array of tables, got {describe(entries)}")
        else:
            object.__setattr__(route, "upstreams", tuple(entries))
            for index, entry in enumerate(entries):
                if not isinstance(entry, UpstreamEntry):
                    p.add(f"upstreams[{index}]", f"expected a table, got {describe(entry)}")
                    continue
                try:
                    specs.append(
                        resolve_entry(
                            entry,
                            websocket=websocket,
                            ca_file=ca_file,
                            inject=inject,
                            preserve_host=preserve,
                        )
                    )
                except ValueError as exc:
                    key = "ca_file" if "ca_file" in str(exc) else "url"
                    p.add(f"upstreams[{index}].{key}", str(exc))
            names = [spec.name for spec in specs]
            for name in sorted({n for n in names if names.count(n) > 1}):
                p.add("upstreams", f"two upstreams are named {name!r}: give each a unique name")
            if specs and all(spec.backup for spec in specs):
                p.add("upstreams", "at least one upstream must not be a backup")
    elif target is not None:
        spec = UpstreamSpec(
            default_name(target),
            target,
            ca_file=ca_file,
            inject=inject,
            preserve_host=preserve,
        )
        specs.append(spec)
    balance = typed(p, route, "balance", str)
    if balance is not None and balance not in BALANCE_MODES:
        p.add("balance", f"must be one of {', '.join(BALANCE_MODES)}, got {balance!r}")
    hash_on = typed(p, route, "hash_on", str, optional=True)
    if hash_on is not None and (problem := parse_hash_on(hash_on)):
        p.add("hash_on", problem)
    if balance == "hash" and hash_on is None:
        p.add("hash_on", "required when balance is 'hash'")
    affinity = typed(p, route, "affinity", str, optional=True)
    if affinity is not None and affinity != "mcp_session":
        p.add("affinity", f"must be 'mcp_session', got {affinity!r}")
    for name, cls in (("retry", RetryPolicy), ("health_check", HealthCheck), ("outlier", Outlier)):
        instance(p, route, name, cls, optional=True)
    integer(p, route, "max_retry_body_bytes", 0, 64 * 1024 * 1024)
    return tuple(specs) if len(p.items) == start else ()
