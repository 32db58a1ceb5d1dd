"""Prometheus metrics (prometheus-client), one registry per running proxy.

The per-exchange counters and histograms (requests, upstream TTFB, duration,
upstream errors, body bytes) are updated once per exchange, from its access-log
record (``observe``), never per chunk, into plain ints and floats per route
(no prometheus-client child, no lock: ``observe`` runs on the one trio thread);
:class:`_ExchangeCollector` turns them into the same families at scrape time
(names, labels, buckets, ``_total``/``_sum``/``_count``/``_created``, in the same
order as the prometheus-client objects they replace). Gauges that describe
the current state (connections, exchanges in flight, pool, config generation)
are read at scrape time through a :class:`Gauges` callable supplied by the owner
of that state (``ProxyState.gauges``), so they cost nothing per request and this
module needs no import of the proxy layer.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Final, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..net.pool import Origin
from ..observe.accesslog import ExchangeRecord

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["Gauges", "Metrics", "UpstreamStats"]

_LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
_STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")


#: The ``le`` label of each bucket, as prometheus-client writes it (``+Inf`` last).
_LE: Final = (*(floatToGoString(b) for b in _LATENCY_BUCKETS), "+Inf")  # type: ignore[no-untyped-call]


class _RouteStats:
    """One route's per-exchange figures: what prometheus-client's children held.

    Bucket counts are per bucket (not cumulative): one ``bisect`` and one ``+=`` per
    observation; the cumulative counts are made at scrape time.
    """

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "created",
        "duration",
        "duration_sum",
        "requests",
        "ttfb",
        "ttfb_sum",
    )

    def __init__(self, created: float) -> None:
        self.created = created
        self.requests = [0] * len(_STATUS_CLASSES)
        self.ttfb = [0] * len(_LE)
        self.ttfb_sum = 0.0
        self.duration = [0] * len(_LE)
        self.duration_sum = 0.0
        self.bytes_in = 0
        self.bytes_out = 0


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for le, n in zip(_LE, counts, strict=True):
        total += n
        out.append((le, float(total)))
    return out


class _ExchangeCollector(Collector):
    """The per-exchange families, from the plain figures, at scrape time."""

    def __init__(
        self, routes: dict[str, _RouteStats], errors: dict[tuple[str, str], list[float]]
    ) -> None:
        self._routes = routes
        self._errors = errors

    def collect(self) -> Iterator[Metric]:
        routes = list(self._routes.items())
        requests = CounterMetricFamily(
            "proxycore_requests",
            "Requests answered, by route and status class.",
            labels=["route", "status_class"],
        )
        ttfb = HistogramMetricFamily(
            "proxycore_upstream_ttfb_seconds",
            "Time from request start to the first upstream response byte.",
            labels=["route"],
        )
        duration = HistogramMetricFamily(
            "proxycore_exchange_duration_seconds", "Whole exchange duration.", labels=["route"]
        )
        for route, s in routes:
            for status_class, n in zip(_STATUS_CLASSES, s.requests, strict=True):
                requests.add_metric([route, status_class], float(n), created=s.created)
            for family, counts, total in (
                (ttfb, s.ttfb, s.ttfb_sum),
                (duration, s.duration, s.duration_sum),
            ):
                family.add_metric([route], _cumulative(counts), total)
                family.add_sample(family.name + "_created", {"route": route}, s.created)
        yield requests
        yield ttfb
        yield duration
        errors = CounterMetricFamily(
            "proxycore_upstream_errors",
            "Upstream failures by kind (connect, timeout, reset, protocol).",
            labels=["route", "kind"],
        )
        for (route, kind), (count, created) in list(self._errors.items()):
            errors.add_metric([route, kind], float(count), created=created)
        yield errors
        body = CounterMetricFamily(
            "proxycore_body_bytes",
            "Body bytes by route and direction (in: from clients, out: to clients).",
            labels=["route", "direction"],
        )
        for route, s in routes:
            body.add_metric([route, "in"], float(s.bytes_in), created=s.created)
            body.add_metric([route, "out"], float(s.bytes_out), created=s.created)
        yield body


class Gauges(NamedTuple):
    """The current state, read once per scrape."""

    exchanges_in_flight: int
    client_connections: int
    config_generation: int
    #: Idle and busy upstream connections per origin.
    pool_idle: Mapping[Origin, int]
    pool_busy: Mapping[Origin, int]
    #: Open tunnel sessions (``[tunnel]``).
    tunnel_sessions: int = 0
    #: The upstreams of every route's group.
    upstreams: tuple[UpstreamStats, ...] = ()
    #: ``[state]`` backend reachable (None: no ``[state] redis``, no gauge).
    state_backend_up: bool | None = None


class UpstreamStats(NamedTuple):
    """One upstream of a route's group, as ``/metrics`` shows it."""

    route: str
    upstream: str
    requests: int
    failures: int
    retries: int
    ejections: int
    active: int
    #: Health checks (or none) say it is up.
    healthy: bool
    #: Ejected now (consecutive failures).
    ejected: bool


class _StateCollector(Collector):
    def __init__(self, gauges: Callable[[], Gauges]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        now = self._gauges()
        yield GaugeMetricFamily(
            "proxycore_exchanges_in_flight",
            "Exchanges being proxied now.",
            value=now.exchanges_in_flight,
        )
        yield GaugeMetricFamily(
            "proxycore_client_connections",
            "Open client connections.",
            value=now.client_connections,
        )
        yield GaugeMetricFamily(
            "proxycore_config_generation",
            "Generation of the config in use (1 at start, +1 per successful reload).",
            value=now.config_generation,
        )
        pool = GaugeMetricFamily(
            "proxycore_pool_connections",
            "Upstream connections by origin and state.",
            labels=["upstream", "state"],
        )
        idle = now.pool_idle
        busy = now.pool_busy
        for origin in sorted(set(idle) | set(busy), key=str):
            scheme, host, port, _ = origin
            name = f"{scheme}://{host}:{port}"
            pool.add_metric([name, "idle"], idle.get(origin, 0))
            pool.add_metric([name, "busy"], busy.get(origin, 0))
        yield pool
        yield GaugeMetricFamily(
            "proxycore_tunnel_sessions",
            "Open reverse-tunnel sessions.",
            value=now.tunnel_sessions,
        )
        if now.state_backend_up is not None:
            yield GaugeMetricFamily(
                "proxycore_state_backend_up",
                "1 while the [state] backend (Redis) answers, 0 while it is away.",
                value=1 if now.state_backend_up else 0,
            )
        yield from _upstream_families(now.upstreams)


def _upstream_families(stats: tuple[UpstreamStats, ...]) -> Iterator[Metric]:
    """Per upstream of each group: counters kept by the group, gauges of its state."""
    labels = ["route", "upstream"]
    families = {
        "requests": CounterMetricFamily(
            "proxycore_upstream_requests", "Tries sent to the upstream.", labels=labels
        ),
        "failures": CounterMetricFamily(
            "proxycore_upstream_failures",
            "Tries that failed: connect error, reset, timeout or a 5xx.",
            labels=labels,
        ),
        "retries": CounterMetricFamily(
            "proxycore_upstream_retries",
            "Tries that were retries of a request another upstream failed.",
            labels=labels,
        ),
        "ejections": CounterMetricFamily(
            "proxycore_upstream_ejections",
            "Times the upstream was ejected for consecutive failures.",
            labels=labels,
        ),
    }
    active = GaugeMetricFamily(
        "proxycore_upstream_active_streams", "Exchanges open on the upstream now.", labels=labels
    )
    healthy = GaugeMetricFamily(
        "proxycore_upstream_healthy",
        "1 if health checks (or none) say the upstream is up and it is not ejected.",
        labels=labels,
    )
    for s in stats:
        key = [s.route, s.upstream]
        families["requests"].add_metric(key, s.requests)
        families["failures"].add_metric(key, s.failures)
        families["retries"].add_metric(key, s.retries)
        families["ejections"].add_metric(key, s.ejections)
        active.add_metric(key, s.active)
        healthy.add_metric(key, 1 if s.healthy and not s.ejected else 0)
    yield from families.values()
    yield active
    yield healthy


class Metrics:
    """One registry: per-exchange counters and histograms, plus the state gauges.

    ``gauges`` is called at every scrape (never per request) for the current state.
    """

    def __init__(self, gauges: Callable[[], Gauges]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        #: Per route (in the order first seen): the per-exchange figures.
        self._routes: dict[str, _RouteStats] = {}
        #: ``(route, kind)`` -> ``[count, created]``.
        self._errors: dict[tuple[str, str], list[float]] = {}
        reg.register(_ExchangeCollector(self._routes, self._errors))
        self.reloads = Counter(
            "proxycore_reloads", "Config reloads by outcome.", ["outcome"], registry=reg
        )
        self.accept_errors = Counter(
            "proxycore_accept_errors",
            "accept() errors the listeners skipped, by errno name.",
            ["errno"],
            registry=reg,
        )
        self.tunnel_requests = Counter(
            "proxycore_tunnel_requests",
            "Calls through tunnel sessions, by outcome (ok, timeout, closed, too_many_pending).",
            ["outcome"],
            registry=reg,
        )
        self.tunnel_round_trip = Histogram(
            "proxycore_tunnel_round_trip_seconds",
            "Time from a call sent down a tunnel session to its response.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        reg.register(_StateCollector(gauges))

    def observe(self, record: ExchangeRecord) -> None:
        """Account one finished exchange (called once, from the access-log point)."""
        route = record.route or "-"
        stats = self._routes.get(route)
        if stats is None:
            stats = self._routes[route] = _RouteStats(time.time())
        status = record.status
        if 100 <= status < 600:
            stats.requests[status // 100 - 1] += 1
        ttfb = record.ttfb
        if ttfb is not None:
            stats.ttfb[bisect_left(_LATENCY_BUCKETS, ttfb)] += 1
            stats.ttfb_sum += ttfb
        duration = record.duration
        stats.duration[bisect_left(_LATENCY_BUCKETS, duration)] += 1
        stats.duration_sum += duration
        if record.bytes_in > 0:
            stats.bytes_in += record.bytes_in
        if record.bytes_out > 0:
            stats.bytes_out += record.bytes_out
        if record.error_kind:
            key = (route, record.error_kind)
            error = self._errors.get(key)
            if error is None:
                error = self._errors[key] = [0, time.time()]
            error[0] += 1

    def observe_tunnel_call(self, outcome: str, seconds: float) -> None:
        """Account one call through a tunnel session (round trip only when answered)."""
        self.tunnel_requests.labels(outcome).inc()
        if outcome == "ok":
            self.tunnel_round_trip.observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
