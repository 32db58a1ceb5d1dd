"""The figures of a result by name (what tables, comparisons and thresholds read), and
:func:`merge` (one result from several rounds)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final

from ..hdr import SUMMARY_PERCENTILES, Histogram
from ..loadgen.spec import LoadResult, tps_summary

__all__ = ["STATS", "TIMINGS", "figures", "merge"]

#: Histograms of a result (seconds), by the name figures and thresholds use.
TIMINGS: Final = (
    "ttfb",
    "latency",
    "ttft",
    "itl",
    "first_event",
    "event_delay",
    "connect",
    "queue",
)
#: Statistics of each timing: ``<timing>_<stat>``.
STATS: Final = (*(name for name, _ in SUMMARY_PERCENTILES), "max", "mean")


def figures(result: LoadResult) -> dict[str, float]:
    """Every figure of ``result`` by name; timings in seconds, rates per second,
    ``error_rate`` a fraction (errors and dropped arrivals over requests due)."""
    out: dict[str, float] = {
        "ok": float(result.ok),
        "errors": float(result.errors + result.dropped),
        "error_rate": result.error_rate,
        "dropped": float(result.dropped),
        "rps": result.rps,
        "throughput": result.throughput,
        "output_tokens": float(result.output_tokens),
        "tokens_per_s": result.tokens_per_s,
        "cpu_share": result.cpu_share,
        "reinitializations": float(result.mcp_reinitializations),
    }
    for name in TIMINGS:
        histogram: Histogram = getattr(result, name)
        values = histogram.percentiles([q for _, q in SUMMARY_PERCENTILES])
        for (stat, _), value in zip(SUMMARY_PERCENTILES, values, strict=True):
            out[f"{name}_{stat}"] = value
        out[f"{name}_max"] = histogram.max
        out[f"{name}_mean"] = histogram.mean
        out[f"{name}_count"] = float(histogram.count)
    for stat, value in tps_summary(result.stream_tps).items():
        out[f"stream_tps_{stat}"] = value
    return out


def _sum(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out


def merge(results: Sequence[LoadResult]) -> LoadResult:
    """One result from the rounds of one target: counters and times added, histograms
    merged (the spec is the first round's)."""
    first, *rest = results
    merged = dataclasses.replace(
        first,
        error_kinds=dict(first.error_kinds),
        rpc_errors=dict(first.rpc_errors),
        stream_tps=list(first.stream_tps),
    )
    for name in TIMINGS:
        fresh = Histogram()
        fresh.merge(getattr(first, name))
        setattr(merged, name, fresh)
    for other in rest:
        for name in (
            "ok",
            "errors",
            "dropped",
            "elapsed",
            "body_bytes",
            "events",
            "started",
            "connections",
            "output_tokens",
            "usage_streams",
            "counted_streams",
            "mcp_initializations",
            "mcp_reinitializations",
            "cpu_seconds",
        ):
            setattr(merged, name, getattr(merged, name) + getattr(other, name))
        merged.error_kinds = _sum(merged.error_kinds, other.error_kinds)
        merged.rpc_errors = _sum(merged.rpc_errors, other.rpc_errors)
        merged.stream_tps.extend(other.stream_tps)
        for name in TIMINGS:
            getattr(merged, name).merge(getattr(other, name))
    return merged
