"""The per-exchange metrics kept as plain ints and folded in at scrape time: the
exposition is byte for byte what prometheus-client's own Counter and Histogram objects
(the previous implementation, rebuilt here as the reference) write for the same
exchanges, and the supervisor's parser reads it back. No speed is asserted."""

from __future__ import annotations

import random
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxycore.observe.accesslog import ExchangeRecord
from proxycore.observe.metrics import Gauges, Metrics

BUCKETS = (
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
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
#: Where the folded families end in the exposition: the next metric is prometheus-client's.
NEXT_FAMILY = b"# HELP proxycore_reloads_total"


class Reference:
    """The previous ``Metrics.observe``: prometheus-client children per route."""

    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "proxycore_requests",
            "Requests answered, by route and status class.",
            ["route", "status_class"],
            registry=reg,
        )
        self.ttfb = Histogram(
            "proxycore_upstream_ttfb_seconds",
            "Time from request start to the first upstream response byte.",
            ["route"],
            buckets=BUCKETS,
            registry=reg,
        )
        self.duration = Histogram(
            "proxycore_exchange_duration_seconds",
            "Whole exchange duration.",
            ["route"],
            buckets=BUCKETS,
            registry=reg,
        )
        self.errors = Counter(
            "proxycore_upstream_errors",
            "Upstream failures by kind (connect, timeout, reset, protocol).",
            ["route", "kind"],
            registry=reg,
        )
        self.bytes = Counter(
            "proxycore_body_bytes",
            "Body bytes by route and direction (in: from clients, out: to clients).",
            ["route", "direction"],
            registry=reg,
        )
        self.seen: set[str] = set()

    def observe(self, record: ExchangeRecord) -> None:
        route = record.route or "-"
        if route not in self.seen:  # the children were made together, on first sight
            self.seen.add(route)
            for c in CLASSES:
                self.requests.labels(route, c)
            self.ttfb.labels(route)
            self.duration.labels(route)
            self.bytes.labels(route, "in")
            self.bytes.labels(route, "out")
        if 100 <= record.status < 600:
            self.requests.labels(route, CLASSES[record.status // 100 - 1]).inc()
        if record.ttfb is not None:
            self.ttfb.labels(route).observe(record.ttfb)
        self.duration.labels(route).observe(record.duration)
        if record.bytes_in:
            self.bytes.labels(route, "in").inc(record.bytes_in)
        if record.bytes_out:
            self.bytes.labels(route, "out").inc(record.bytes_out)
        if record.error_kind:
            self.errors.labels(route, record.error_kind).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def no_state() -> Gauges:
    return Gauges(0, 0, 1, {}, {})


def folded(metrics: Metrics) -> bytes:
    text = metrics.exposition()
    return text[: text.index(NEXT_FAMILY)]


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides stamp ``_created`` with ``time.time()``: make it one value."""
    monkeypatch.setattr(time, "time", lambda: 1_750_000_000.25)


def random_record(rng: random.Random) -> ExchangeRecord:
    def seconds() -> float:
        pick = rng.random()
        if pick < 0.3:
            return rng.choice(BUCKETS)  # exactly on a bound: that bucket (le)
        if pick < 0.35:
            return rng.choice((0.0, 4000.0, 1e-9))
        return rng.expovariate(20.0)

    return ExchangeRecord(
        route=rng.choice(("", "api", "llm", 'a route/with "quotes" \\ and\nnewline')),
        status=rng.choice((0, 99, 101, 200, 204, 302, 404, 499, 502, 599, 600)),
        ttfb=None if rng.random() < 0.2 else seconds(),
        duration=seconds(),
        bytes_in=rng.choice((0, 0, 1, 17, 1 << 20)),
        bytes_out=rng.choice((0, 100, 65536, 3 << 30)),
        error_kind=rng.choice(("", "", "", "connect", "timeout", "reset", "protocol")),
    )


def test_empty_exposition_matches() -> None:
    assert folded(Metrics(no_state)) == Reference().exposition()


@pytest.mark.parametrize("seed", range(20))
def test_exposition_matches_prometheus_client(seed: int) -> None:
    rng = random.Random(seed)
    metrics, reference = Metrics(no_state), Reference()
    for _ in range(rng.choice((1, 5, 300))):
        record = random_record(rng)
        metrics.observe(record)
        reference.observe(record)
    assert folded(metrics) == reference.exposition()
    # Observing after a scrape goes on from the same figures.
    for _ in range(50):
        record = random_record(rng)
        metrics.observe(record)
        reference.observe(record)
    assert folded(metrics) == reference.exposition()


def test_bucket_bounds_are_inclusive() -> None:
    metrics = Metrics(no_state)
    for value in (0.005, 0.0050001, 3600.0, 3600.5):
        metrics.observe(ExchangeRecord(route="r", status=200, ttfb=value, duration=value))
    families = {f.name: f for f in text_string_to_metric_families(folded(metrics).decode())}
    buckets = {
        s.labels["le"]: s.value
        for s in families["proxycore_upstream_ttfb_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert buckets["0.0025"] == 0
    assert buckets["0.005"] == 1
    assert buckets["0.01"] == 2
    assert buckets["3600.0"] == 3
    assert buckets["+Inf"] == 4


def test_whole_page_parses_as_the_supervisor_reads_it() -> None:
    metrics = Metrics(no_state)
    metrics.observe(ExchangeRecord(route="r", status=503, ttfb=0.2, duration=0.3, bytes_out=7))
    metrics.observe(ExchangeRecord(route="r", status=200, duration=1.5, error_kind="reset"))
    names = {f.name for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert {
        "proxycore_requests",
        "proxycore_upstream_ttfb_seconds",
        "proxycore_exchange_duration_seconds",
        "proxycore_upstream_errors",
        "proxycore_body_bytes",
        "proxycore_reloads",
        "proxycore_exchanges_in_flight",
    } <= names
    text = metrics.exposition()
    assert b'proxycore_requests_total{route="r",status_class="5xx"} 1.0' in text
    assert b'proxycore_upstream_errors_total{kind="reset",route="r"} 1.0' in text
    assert b'proxycore_exchange_duration_seconds_count{route="r"} 2.0' in text
    assert b'proxycore_exchange_duration_seconds_sum{route="r"} 1.8' in text
    assert b'proxycore_body_bytes_total{direction="out",route="r"} 7.0' in text
