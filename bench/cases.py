"""The table of cases: which workloads run at which sizes, with which figures."""

from __future__ import annotations

from bench.streams import streams_run
from bench.workloads import (
    ERRORS,
    GEN_CPU,
    MANY_STREAMS,
    PROXY_CPU,
    RPS,
    RUN_ORDER,
    WORKLOADS,
    Case,
    MetricDef,
    Sizes,
    download_run,
    slow_reader_run,
    small_run,
    small_wrk_run,
    sse_run,
    ttfb_run,
    upload_run,
)

__all__ = ["build_cases"]


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
                small_run(s),
                note="A load generator near 100% CPU is the limit, not the server.",
            )
        )
        cases.append(
            Case(
                "small",
                "wrk",
                f"small: the same with wrk -t1 -c{s.small_concurrency} -d{s.small_duration:g}s",
                (RPS, *latency, ERRORS, PROXY_CPU, per_req),
                small_wrk_run(s),
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
                    ttfb_run(s, keepalive),
                    relative_to_direct=added,
                )
            )
    if "sse" in workloads:
        sse_metrics = (
            MetricDef("delay_p50_ms", "event delay p50 ms", "ms", "lower"),
            MetricDef("delay_p99_ms", "event delay p99 ms", "ms", "lower"),
            MetricDef("delay_p999_ms", "event delay p99.9 ms", "ms", "lower"),
            MetricDef("added_delay_p50_ms", "added delay p50 ms (vs direct)", "ms", "lower", True),
            MetricDef("added_delay_p99_ms", "added delay p99 ms (vs direct)", "ms", "lower", True),
            MetricDef("first_event_p50_ms", "first event p50 ms", "ms", "lower"),
            MetricDef("events", "events received", "count"),
            ERRORS,
            PROXY_CPU,
            MetricDef("cpu_us_per_event", "proxy CPU us/event", "us", "lower", proxy_only=True),
            GEN_CPU,
        )
        for streams in (s.sse_streams, s.sse_light_streams):
            cases.append(
                Case(
                    "sse",
                    f"c{streams}",
                    f"sse: {streams} streams x {s.sse_events} events every "
                    f"{s.sse_interval_ms:g} ms, all at once",
                    sse_metrics,
                    sse_run(s, streams),
                    relative_to_direct=(
                        ("added_delay_p50_ms", "delay_p50_ms"),
                        ("added_delay_p99_ms", "delay_p99_ms"),
                    ),
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
                    streams_run(s, count, upstream_pid, upstream_port),
                    fresh=True,
                    note="Each stream gets one event, then the client's timeout ends it (by "
                    "design). Every proxy is restarted before this case (RSS per stream from "
                    "a fresh process). Census: ESTABLISHED sockets counted once the server "
                    "side stops opening more (the upstream side includes idle pooled "
                    "connections).",
                )
            )
        if MANY_STREAMS not in s.stream_counts:
            cases.append(
                Case(
                    "streams",
                    str(MANY_STREAMS),
                    f"streams: {MANY_STREAMS:,} idle SSE streams open at once",
                    (),
                    streams_run(s, MANY_STREAMS, upstream_pid, upstream_port),
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
                download_run(s),
            )
        )
        cases.append(
            Case(
                "bulk",
                "upload",
                f"bulk: POST /upload with {s.bulk_mib} MiB x {s.bulk_repeats}, c=1",
                mbs_metrics,
                upload_run(s),
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
                slow_reader_run(s),
                note="The client's own timeout cuts the response after the read window "
                "(counted as a timeout by design).",
            )
        )
    cases.sort(key=lambda case: RUN_ORDER.index(case.workload))
    return cases
