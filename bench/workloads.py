"""The workloads: what each sends, and which figures it takes from the run.

A workload has one or more cases (``ttfb``: keep-alive and fresh connections;
``streams``: 1,000 and 10,000); each case runs against every scenario in turn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import psutil

from bench.measure import GenRun, Meter
from bench.procs import Child
from bench.scenarios import Running

__all__ = [
    "RUN_ORDER",
    "SIZES",
    "WORKLOADS",
    "Case",
    "Measurement",
    "MetricDef",
    "Sizes",
    "build_cases",
]

MiB: Final = 1024 * 1024
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
    skipped: tuple[str, ...] = ()


SIZES: Final = {
    "full": Sizes(
        name="full",
        small_duration=10.0,
        ttfb_requests=500,
        sse_streams=100,
        sse_events=100,
        stream_counts=(1000, 10000),
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
            "10,000 streams",
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
        skipped=("10,000 and 1,000 streams (100 instead)", "full sizes everywhere"),
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

    @property
    def id(self) -> str:
        return f"{self.workload}/{self.key}"


# ----------------------------------------------------------------------------- helpers


def _loadgen_summary(run: GenRun) -> dict[str, Any]:
    result = run.result
    keep = ("ok", "errors", "dropped", "error_kinds", "elapsed", "connections", "events")
    out: dict[str, Any] = {k: result.get(k) for k in keep}
    for name in ("ttfb", "latency", "first_event", "event_delay"):
        summary = result.get(name)
        if isinstance(summary, dict) and summary.get("count"):
            out[name] = summary
    out["gen_cpu_pct"] = run.gen_cpu_pct()
    return out


def _failed(run: GenRun) -> float:
    return float(run.result["errors"]) + float(run.result["dropped"])


def _per_op_us(run: GenRun, ops: float) -> float | None:
    if run.sampler is None or ops <= 0:
        return None
    return 1e6 * run.sampler.cpu_seconds / ops


def _mib(n: int | float) -> float:
    return float(n) / MiB


# ----------------------------------------------------------------------------- cases


RPS = MetricDef("rps", "requests/s", "rps", "higher")
ERRORS = MetricDef("errors", "failed requests", "count")
PROXY_CPU = MetricDef("cpu_pct", "proxy CPU % of one core", "pct", proxy_only=True)
GEN_CPU = MetricDef("gen_cpu_pct", "load generator CPU %", "pct")


def _small(sizes: Sizes) -> Runner:
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
                "errors": _failed(g),
                "cpu_pct": g.proxy_cpu_pct(),
                "cpu_us_per_req": _per_op_us(g, float(g.result["ok"])),
                "gen_cpu_pct": g.gen_cpu_pct(),
            },
            loadgen=_loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def _small_wrk(sizes: Sizes) -> Runner:
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


def _ttfb(sizes: Sizes, keepalive: bool) -> Runner:
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
                "errors": _failed(g),
            },
            dist={"ttfb": g.dist.get("ttfb", [])},
            loadgen=_loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def _sse(sizes: Sizes) -> Runner:
    def run(meter: Meter, target: Running) -> Measurement:
        path = (
            f"/v1/stream?events={sizes.sse_events}&interval_ms={sizes.sse_interval_ms:g}&ttft_ms=0"
        )
        spec = {
            "path": path,
            "concurrency": sizes.sse_streams,
            "requests": sizes.sse_streams,
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
                "errors": _failed(g),
                "cpu_pct": g.proxy_cpu_pct(),
                "cpu_us_per_event": _per_op_us(g, events),
                "gen_cpu_pct": g.gen_cpu_pct(),
            },
            dist={"event_delay": g.dist.get("event_delay", [])},
            loadgen=_loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def _established(pid: int, port: int, *, remote: bool = True) -> int | None:
    """ESTABLISHED TCP connections of ``pid`` whose remote (or local) port is ``port``."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    n = 0
    for conn in conns:
        if conn.status != psutil.CONN_ESTABLISHED:
            continue
        addr = conn.raddr if remote else conn.laddr
        if addr and addr.port == port:
            n += 1
    return n


def _listen_drops() -> int | None:
    """The host's TcpExt ListenDrops counter (SYNs dropped at full accept queues)."""
    try:
        with open("/proc/net/netstat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            value = table.get("ListenDrops")
            return int(value) if value is not None else None
    return None


@dataclass
class _Census:
    """Counts the open streams once, when the server side stops opening more.

    The server side is the proxy (its fds grow by two per stream) or, for ``direct``,
    the upstream. The census is taken when that count reaches every stream, or has not
    grown for a while, or at the latest shortly before the first streams are cut.
    """

    streams: int
    #: When the last stream has been started (s after the first).
    ramp_s: float
    #: The latest moment (s after the first stream) to count: before the first ones end.
    deadline_s: float
    target: Running
    upstream_pid: int
    upstream_port: int
    taken: bool = False
    fds_base: int | None = None
    fds_last: int = 0
    grown_at: float = 0.0
    all_at: float | None = None
    client_open: int | None = None
    upstream_open: int | None = None
    rss: int | None = None
    at: float | None = None

    @property
    def server_pid(self) -> int:
        return self.target.measured_pid or self.upstream_pid

    def _fds(self) -> int | None:
        try:
            return psutil.Process(self.server_pid).num_fds()
        except (psutil.Error, OSError):
            return None

    def prime(self) -> None:
        """Take the server side's fd count before the streams start."""
        self.fds_base = self._fds()

    def tick(self, elapsed: float, gen: Child) -> None:
        if self.taken:
            return
        fds = self._fds()
        if fds is None:
            return
        if self.fds_base is None:
            self.fds_base = fds
        if fds > self.fds_last:
            self.fds_last, self.grown_at = fds, elapsed
        per_stream = 1 if self.target.measured_pid is None else 2
        opened = (fds - self.fds_base) // per_stream
        if opened >= self.streams and self.all_at is None:
            self.all_at = elapsed
        # Every stream has a socket: give the last ones a second to reach the upstream.
        all_open = self.all_at is not None and elapsed - self.all_at >= 1.0
        ramped = elapsed >= self.ramp_s
        stalled = ramped and opened > 0 and elapsed - self.grown_at >= 1.5
        if all_open or stalled or elapsed >= self.deadline_s:
            self.take(gen, elapsed)

    def take(self, gen: Child, elapsed: float) -> None:
        self.taken = True
        self.at = elapsed
        target = self.target
        self.client_open = _established(gen.pid, target.port)
        pid = target.measured_pid
        if pid is None:  # direct: the upstream's side of the load generator's connections
            self.upstream_open = _established(self.upstream_pid, self.upstream_port, remote=False)
            return
        self.upstream_open = _established(pid, self.upstream_port)
        with contextlib.suppress(psutil.Error, OSError):
            self.rss = psutil.Process(pid).memory_info().rss


#: The second event of a held stream comes after an hour: the client's timeout ends it.
_HELD_STREAM: Final = "/v1/stream?events=2&interval_ms=3600000&ttft_ms=0"


def _streams(sizes: Sizes, count: int, upstream_pid: int, upstream_port: int) -> Runner:
    def run(meter: Meter, target: Running) -> Measurement:
        ramp = count / sizes.stream_open_rate
        hold = ramp + sizes.stream_plateau_s
        # Streams are started at stream_open_rate; each gets its first event at once
        # and is then held open until the load generator's per-request timeout cuts it
        # (a "timeout" by design), so all are open together for about the plateau.
        spec = {
            "path": _HELD_STREAM,
            "concurrency": count,
            "requests": count,
            "rate": sizes.stream_open_rate,
            "sse": True,
            "timeout": hold,
        }
        deadline = ramp + 0.6 * sizes.stream_plateau_s
        census = _Census(count, ramp, deadline, target, upstream_pid, upstream_port)
        census.prime()
        drops0 = _listen_drops()
        g = meter.gen(target, spec, timeout=ramp + hold + 90.0, on_tick=census.tick)
        drops1 = _listen_drops()
        rss_per_stream = None
        sampler = g.sampler
        if sampler is not None and census.rss is not None and census.upstream_open:
            rss_per_stream = (census.rss - sampler.rss_start) / 1024 / census.upstream_open
        established = float(g.result["events"])  # one event per stream before the hold
        kinds: dict[str, int] = g.result.get("error_kinds", {})
        early = float(g.result["errors"]) - kinds.get("timeout", 0) + float(g.result["dropped"])
        return Measurement(
            {
                "established": established,
                "not_established": count - established,
                "failed_early": early,
                "client_open": _opt(census.client_open),
                "upstream_open": _opt(census.upstream_open),
                "rss_open_mib": _mib(census.rss) if census.rss is not None else None,
                "rss_peak_mib": _mib(sampler.rss_peak) if sampler is not None else None,
                "rss_per_stream_kib": rss_per_stream,
                "fds_peak": float(sampler.fds_peak) if sampler is not None else None,
                "census_at_s": census.at,
                "listen_drops": float(drops1 - drops0)
                if drops0 is not None and drops1 is not None
                else None,
            },
            loadgen=_loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def _opt(n: int | None) -> float | None:
    return float(n) if n is not None else None


def _download(sizes: Sizes) -> Runner:
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
                "errors": _failed(g),
                "cpu_pct": g.proxy_cpu_pct(),
                "short_bytes": float(expected - int(g.result["body_bytes"])),
            },
            loadgen=_loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def _upload(sizes: Sizes) -> Runner:
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
                "errors": _failed(g),
                "cpu_pct": g.proxy_cpu_pct(),
            },
            loadgen=_loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def _slow_reader(sizes: Sizes) -> Runner:
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
                "rss_start_mib": _mib(sampler.rss_start) if sampler else None,
                "rss_peak_mib": _mib(sampler.rss_peak) if sampler else None,
                "rss_growth_mib": _mib(sampler.rss_peak - sampler.rss_start) if sampler else None,
                "read_kib": read / 1024,
                "read_kib_s": read / 1024 / g.elapsed if g.elapsed > 0 else None,
            },
            loadgen=_loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


# ----------------------------------------------------------------------------- table


def build_cases(
    sizes: Sizes,
    *,
    upstream_pid: int,
    upstream_port: int,
    wrk: bool,
    workloads: tuple[str, ...] = WORKLOADS,
) -> list[Case]:
    """Every case of ``workloads`` at ``sizes``, in run order."""
    s = sizes
    latency = (
        MetricDef("p50_ms", "latency p50 ms", "ms", "lower"),
        MetricDef("p99_ms", "latency p99 ms", "ms", "lower"),
    )
    per_req = MetricDef("cpu_us_per_req", "proxy CPU us/request", "us", "lower", proxy_only=True)
    ttfb_metrics = (
        MetricDef("p50_us", "TTFB p50 us", "us", "lower"),
        MetricDef("p99_us", "TTFB p99 us", "us", "lower"),
        MetricDef("added_p50_us", "added TTFB p50 us (vs direct)", "us", "lower", True),
        MetricDef("added_p99_us", "added TTFB p99 us (vs direct)", "us", "lower", True),
        ERRORS,
    )
    added = (("added_p50_us", "p50_us"), ("added_p99_us", "p99_us"))
    cases: list[Case] = []
    if "small" in workloads:
        cases.append(
            Case(
                "small",
                "loadgen",
                f"small: GET /small (100 B), c={s.small_concurrency}, "
                f"{s.small_duration:g} s, keep-alive, Python load generator",
                (RPS, *latency, ERRORS, PROXY_CPU, per_req, GEN_CPU),
                _small(s),
                note="A load generator near 100% CPU is the limit, not the server.",
            )
        )
        cases.append(
            Case(
                "small",
                "wrk",
                f"small: the same with wrk -t1 -c{s.small_concurrency} -d{s.small_duration:g}s",
                (RPS, *latency, ERRORS, PROXY_CPU, per_req),
                _small_wrk(s),
                note="wrk (C) saturates much later than the Python load generator; the "
                "hypercorn upstream shares its core, so direct is the ceiling of every row.",
                skip=None if wrk else "wrk not installed",
            )
        )
    if "ttfb" in workloads:
        for keepalive, key in ((True, "keepalive"), (False, "fresh")):
            conn = "one keep-alive connection" if keepalive else "a fresh connection each"
            cases.append(
                Case(
                    "ttfb",
                    key,
                    f"ttfb: {s.ttfb_requests} sequential GET /small (c=1), {conn}",
                    ttfb_metrics,
                    _ttfb(s, keepalive),
                    relative_to_direct=added,
                )
            )
    if "sse" in workloads:
        cases.append(
            Case(
                "sse",
                f"c{s.sse_streams}",
                f"sse: {s.sse_streams} streams x {s.sse_events} events every "
                f"{s.sse_interval_ms:g} ms, all at once",
                (
                    MetricDef("delay_p50_ms", "event delay p50 ms", "ms", "lower"),
                    MetricDef("delay_p99_ms", "event delay p99 ms", "ms", "lower"),
                    MetricDef("delay_p999_ms", "event delay p99.9 ms", "ms", "lower"),
                    MetricDef("first_event_p50_ms", "first event p50 ms", "ms", "lower"),
                    MetricDef("events", "events received", "count"),
                    ERRORS,
                    PROXY_CPU,
                    MetricDef(
                        "cpu_us_per_event", "proxy CPU us/event", "us", "lower", proxy_only=True
                    ),
                    GEN_CPU,
                ),
                _sse(s),
                note="Event delay = receive time minus the upstream's t_ns send stamp "
                "(same host clock).",
            )
        )
    if "streams" in workloads:
        for count in s.stream_counts:
            cases.append(
                Case(
                    "streams",
                    str(count),
                    f"streams: {count:,} idle SSE streams open at once (started at "
                    f"{s.stream_open_rate:g}/s, all open for ~{s.stream_plateau_s:g} s)",
                    (
                        MetricDef("established", "established (got the first event)", "count"),
                        MetricDef("not_established", "never got the first event", "count"),
                        MetricDef("failed_early", "errors before the hold ended", "count"),
                        MetricDef("client_open", "open at the client (census)", "count"),
                        MetricDef("upstream_open", "open to the upstream (census)", "count"),
                        MetricDef(
                            "rss_open_mib", "proxy RSS MiB at the census", "mib", "lower", True
                        ),
                        MetricDef("rss_peak_mib", "proxy RSS MiB peak", "mib", "lower", True),
                        MetricDef(
                            "rss_per_stream_kib", "proxy RSS KiB per stream", "kib", "lower", True
                        ),
                        MetricDef("fds_peak", "proxy open fds, peak", "count", proxy_only=True),
                        MetricDef("census_at_s", "census taken at s after the first stream", "s"),
                        MetricDef(
                            "listen_drops", "SYNs dropped at full accept queues (host)", "count"
                        ),
                    ),
                    _streams(s, count, upstream_pid, upstream_port),
                    note="Each stream gets one event, then the client's timeout ends it (by "
                    "design). Census: ESTABLISHED sockets counted once the server side stops "
                    "opening more (the upstream side includes idle pooled connections).",
                )
            )
        if 10000 not in s.stream_counts:
            cases.append(
                Case(
                    "streams",
                    "10000",
                    "streams: 10,000 idle SSE streams open at once",
                    (),
                    _streams(s, 10000, upstream_pid, upstream_port),
                    skip=f"skipped in --{s.name}",
                )
            )
    if "bulk" in workloads:
        mbs_metrics = (
            MetricDef("mb_s", "MB/s (10^6 B)", "mbs", "higher"),
            ERRORS,
            MetricDef("cpu_pct", "proxy CPU % of one core", "pct", proxy_only=True),
        )
        cases.append(
            Case(
                "bulk",
                "download",
                f"bulk: GET /big?mib={s.bulk_mib} x {s.bulk_repeats}, c=1",
                mbs_metrics,
                _download(s),
            )
        )
        cases.append(
            Case(
                "bulk",
                "upload",
                f"bulk: POST /upload with {s.bulk_mib} MiB x {s.bulk_repeats}, c=1",
                mbs_metrics,
                _upload(s),
                note="The upstream hashes the upload (sha256) on the load core.",
            )
        )
    if "slow_reader" in workloads:
        cases.append(
            Case(
                "slow_reader",
                f"{s.slow_mib}MiB",
                f"slow reader: GET /big?mib={s.slow_mib} read at {s.slow_rate // 1024} KiB/s "
                f"for {s.slow_seconds:g} s",
                (
                    MetricDef("rss_start_mib", "proxy RSS MiB before", "mib", proxy_only=True),
                    MetricDef("rss_peak_mib", "proxy RSS MiB peak", "mib", "lower", True),
                    MetricDef("rss_growth_mib", "proxy RSS growth MiB", "mib", "lower", True),
                    MetricDef("read_kib", "KiB read by the client", "kib"),
                    MetricDef("read_kib_s", "client read rate KiB/s", "kib"),
                ),
                _slow_reader(s),
                note="The client's own timeout cuts the response after the read window "
                "(counted as a timeout by design).",
            )
        )
    cases.sort(key=lambda case: RUN_ORDER.index(case.workload))
    return cases
