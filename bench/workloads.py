"""The workloads: what each sends, and which figures it takes from the run.

A workload has one or more cases (``ttfb``: keep-alive and fresh connections;
``streams``: 1,000 and 9,000); each case runs against every scenario in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from bench.measure import GenRun, Meter
from bench.scenarios import Running

__all__ = [
    "ERRORS",
    "GEN_CPU",
    "MANY_STREAMS",
    "PROXY_CPU",
    "RPS",
    "RUN_ORDER",
    "SIZES",
    "WORKLOADS",
    "Case",
    "Measurement",
    "MetricDef",
    "Runner",
    "Sizes",
    "download_run",
    "failed_ops",
    "loadgen_summary",
    "slow_reader_run",
    "small_run",
    "small_wrk_run",
    "sse_run",
    "to_mib",
    "ttfb_run",
    "upload_run",
]

MiB: Final = 1024 * 1024
#: The big held-streams case: issue 16 target 5 (this machine's fd limit allows ~9,900).
MANY_STREAMS: Final = 9000
#: The workload keys, in report order.
WORKLOADS: Final = ("small", "ttfb", "sse", "streams", "bulk", "slow_reader")
#: The run order: thousands of streams can leave a slow proxy busy for a while, so
#: they go last (the runner also waits for every process to settle after each case).
RUN_ORDER: Final = ("small", "ttfb", "sse", "bulk", "slow_reader", "streams")

Kind = Literal["rps", "ms", "us", "pct", "mib", "kib", "mbs", "count", "s"]
Better = Literal["higher", "lower"] | None


@dataclass(frozen=True)
class Sizes:
    """How big each workload is (``full``, ``quick`` or ``tiny``)."""

    name: str
    small_duration: float
    ttfb_requests: int
    sse_streams: int
    sse_events: int
    stream_counts: tuple[int, ...]
    #: Seconds every stream stays open after the last one was started.
    stream_plateau_s: float
    bulk_mib: int
    bulk_repeats: int
    slow_mib: int
    slow_seconds: float
    small_concurrency: int = 50
    sse_interval_ms: float = 10.0
    slow_rate: int = 64 * 1024
    #: Streams are started at this rate (a ramp, so accept queues do not overflow).
    stream_open_rate: float = 500.0
    #: The light-load SSE case (issue 16 target 4): this many streams at once.
    sse_light_streams: int = 10
    skipped: tuple[str, ...] = ()


SIZES: Final = {
    "full": Sizes(
        name="full",
        small_duration=10.0,
        ttfb_requests=500,
        sse_streams=100,
        sse_events=100,
        stream_counts=(1000, MANY_STREAMS),
        stream_plateau_s=8.0,
        bulk_mib=64,
        bulk_repeats=3,
        slow_mib=256,
        slow_seconds=10.0,
    ),
    "quick": Sizes(
        name="quick",
        small_duration=2.0,
        ttfb_requests=200,
        sse_streams=100,
        sse_events=100,
        stream_counts=(1000,),
        stream_plateau_s=3.0,
        bulk_mib=64,
        bulk_repeats=1,
        slow_mib=64,
        slow_seconds=3.0,
        skipped=(
            "9,000 streams",
            "256 MiB slow-reader body (64 MiB instead)",
            "500 TTFB requests (200 instead)",
        ),
    ),
    "tiny": Sizes(
        name="tiny",
        small_duration=1.0,
        ttfb_requests=50,
        sse_streams=10,
        sse_events=20,
        stream_counts=(100,),
        stream_plateau_s=1.5,
        bulk_mib=4,
        bulk_repeats=1,
        slow_mib=4,
        slow_seconds=1.0,
        sse_light_streams=3,
        skipped=("9,000 and 1,000 streams (100 instead)", "full sizes everywhere"),
    ),
}


@dataclass(frozen=True)
class MetricDef:
    key: str
    label: str
    kind: Kind
    #: Which way is good; None for counts, where ratios mean nothing.
    better: Better = None
    #: Only meaningful for a proxy process (n/a for ``direct``).
    proxy_only: bool = False


@dataclass
class Measurement:
    metrics: dict[str, float | None]
    dist: dict[str, list[list[float]]] = field(default_factory=dict)
    #: The load generator's own summary (error kinds, histograms in ms), for the JSON.
    loadgen: dict[str, Any] = field(default_factory=dict)
    steal_pct: float | None = None


Runner = Callable[[Meter, Running], Measurement]


@dataclass(frozen=True)
class Case:
    workload: str
    key: str
    title: str
    metrics: tuple[MetricDef, ...]
    run: Runner
    #: ``(derived, base)``: derived = this scenario's base minus ``direct``'s base.
    relative_to_direct: tuple[tuple[str, str], ...] = ()
    note: str = ""
    skip: str | None = None
    #: Restart the proxy before this case, so its memory figures start from a fresh
    #: process (not from a heap grown and freed by the cases before).
    fresh: bool = False

    @property
    def id(self) -> str:
        return f"{self.workload}/{self.key}"


# ----------------------------------------------------------------------------- helpers


def loadgen_summary(run: GenRun) -> dict[str, Any]:
    result = run.result
    keep = ("ok", "errors", "dropped", "error_kinds", "elapsed", "connections", "events")
    out: dict[str, Any] = {k: result.get(k) for k in keep}
    for name in ("ttfb", "latency", "first_event", "event_delay"):
        summary = result.get(name)
        if isinstance(summary, dict) and summary.get("count"):
            out[name] = summary
    out["gen_cpu_pct"] = run.gen_cpu_pct()
    return out


def failed_ops(run: GenRun) -> float:
    return float(run.result["errors"]) + float(run.result["dropped"])


def _per_op_us(run: GenRun, ops: float) -> float | None:
    if run.sampler is None or ops <= 0:
        return None
    return 1e6 * run.sampler.cpu_seconds / ops


def to_mib(n: int | float) -> float:
    return float(n) / MiB


# ----------------------------------------------------------------------------- cases


RPS = MetricDef("rps", "requests/s", "rps", "higher")
ERRORS = MetricDef("errors", "failed requests", "count")
PROXY_CPU = MetricDef("cpu_pct", "proxy CPU % of one core", "pct", proxy_only=True)
GEN_CPU = MetricDef("gen_cpu_pct", "load generator CPU %", "pct")


def small_run(sizes: Sizes) -> Runner:
    def run(meter: Meter, target: Running) -> Measurement:
        spec = {
            "path": "/small",
            "concurrency": sizes.small_concurrency,
            "duration": sizes.small_duration,
            "keepalive": True,
            "timeout": 10.0,
        }
        g = meter.gen(target, spec, timeout=sizes.small_duration + 40.0)
        latency = g.summary("latency")
        return Measurement(
            {
                "rps": float(g.result["rps"]),
                "p50_ms": latency["p50"],
                "p99_ms": latency["p99"],
                "errors": failed_ops(g),
                "cpu_pct": g.proxy_cpu_pct(),
                "cpu_us_per_req": _per_op_us(g, float(g.result["ok"])),
                "gen_cpu_pct": g.gen_cpu_pct(),
            },
            loadgen=loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def small_wrk_run(sizes: Sizes) -> Runner:
    def run(meter: Meter, target: Running) -> Measurement:
        w = meter.run_wrk(
            target, "/small", connections=sizes.small_concurrency, duration=sizes.small_duration
        )
        cpu = w.proxy_cpu_pct()
        total = w.rps * w.duration
        per_req = (
            1e6 * w.sampler.cpu_seconds / total if w.sampler is not None and total > 0 else None
        )
        return Measurement(
            {
                "rps": w.rps,
                "p50_ms": w.p50_ms,
                "p99_ms": w.p99_ms,
                "errors": float(w.errors),
                "cpu_pct": cpu,
                "cpu_us_per_req": per_req,
            },
            steal_pct=w.steal_pct,
        )

    return run


def ttfb_run(sizes: Sizes, keepalive: bool) -> Runner:
    def run(meter: Meter, target: Running) -> Measurement:
        spec = {
            "path": "/small",
            "concurrency": 1,
            "requests": sizes.ttfb_requests,
            "keepalive": keepalive,
            "timeout": 10.0,
        }
        g = meter.gen(target, spec, timeout=60.0 + sizes.ttfb_requests * 0.05)
        ttfb = g.summary("ttfb")
        return Measurement(
            {
                "p50_us": ttfb["p50"] * 1000.0,
                "p99_us": ttfb["p99"] * 1000.0,
                "errors": failed_ops(g),
            },
            dist={"ttfb": g.dist.get("ttfb", [])},
            loadgen=loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def sse_run(sizes: Sizes, streams: int) -> Runner:
    def run(meter: Meter, target: Running) -> Measurement:
        path = (
            f"/v1/stream?events={sizes.sse_events}&interval_ms={sizes.sse_interval_ms:g}&ttft_ms=0"
        )
        spec = {
            "path": path,
            "concurrency": streams,
            "requests": streams,
            "sse": True,
            "timeout": 60.0,
        }
        g = meter.gen(target, spec, timeout=120.0)
        delay = g.summary("event_delay")
        first = g.result.get("first_event", {})
        events = float(g.result["events"])
        return Measurement(
            {
                "delay_p50_ms": delay["p50"],
                "delay_p99_ms": delay["p99"],
                "delay_p999_ms": delay["p99.9"],
                "first_event_p50_ms": first.get("p50") if first.get("count") else None,
                "events": events,
                "errors": failed_ops(g),
                "cpu_pct": g.proxy_cpu_pct(),
                "cpu_us_per_event": _per_op_us(g, events),
                "gen_cpu_pct": g.gen_cpu_pct(),
            },
            dist={"event_delay": g.dist.get("event_delay", [])},
            loadgen=loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def download_run(sizes: Sizes) -> Runner:
    def run(meter: Meter, target: Running) -> Measurement:
        spec = {
            "path": f"/big?mib={sizes.bulk_mib}",
            "concurrency": 1,
            "requests": sizes.bulk_repeats,
            "timeout": 120.0,
        }
        g = meter.gen(target, spec, timeout=60.0 + 120.0 * sizes.bulk_repeats)
        expected = sizes.bulk_mib * MiB * sizes.bulk_repeats
        return Measurement(
            {
                "mb_s": float(g.result["body_bytes"]) / g.elapsed / 1e6,
                "errors": failed_ops(g),
                "cpu_pct": g.proxy_cpu_pct(),
                "short_bytes": float(expected - int(g.result["body_bytes"])),
            },
            loadgen=loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def upload_run(sizes: Sizes) -> Runner:
    def run(meter: Meter, target: Running) -> Measurement:
        size = sizes.bulk_mib * MiB
        spec = {
            "path": "/upload",
            "method": "POST",
            "body_bytes": size,
            "headers": [["Content-Type", "application/octet-stream"]],
            "concurrency": 1,
            "requests": sizes.bulk_repeats,
            "timeout": 120.0,
        }
        g = meter.gen(target, spec, timeout=60.0 + 120.0 * sizes.bulk_repeats)
        ok = float(g.result["ok"])
        return Measurement(
            {
                "mb_s": size * ok / g.elapsed / 1e6,
                "errors": failed_ops(g),
                "cpu_pct": g.proxy_cpu_pct(),
            },
            loadgen=loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def slow_reader_run(sizes: Sizes) -> Runner:
    def run(meter: Meter, target: Running) -> Measurement:
        # The request is cut by its own timeout after slow_seconds: that is the point.
        spec = {
            "path": f"/big?mib={sizes.slow_mib}",
            "concurrency": 1,
            "requests": 1,
            "read_rate": sizes.slow_rate,
            "timeout": sizes.slow_seconds,
        }
        g = meter.gen(target, spec, timeout=sizes.slow_seconds + 60.0)
        sampler = g.sampler
        read = float(g.result["body_bytes"])
        return Measurement(
            {
                "rss_start_mib": to_mib(sampler.rss_start) if sampler else None,
                "rss_peak_mib": to_mib(sampler.rss_peak) if sampler else None,
                "rss_growth_mib": to_mib(sampler.rss_peak - sampler.rss_start) if sampler else None,
                "read_kib": read / 1024,
                "read_kib_s": read / 1024 / g.elapsed if g.elapsed > 0 else None,
            },
            loadgen=loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run
