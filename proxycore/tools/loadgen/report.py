"""What a run reports, as rows of text: the summary, the timings, the comparison of
several targets (with ratios to the first), Markdown of the same, and the JSON of a
comparison. Rendering to a terminal (rich) is the command line's job."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ..loadgen.compare import ratios
from ..loadgen.figures import figures
from ..loadgen.spec import LoadResult, LoadSpec, tps_summary

__all__ = [
    "CPU_WARNING",
    "STAT_COLUMNS",
    "compare_json",
    "compare_rows",
    "cpu_warning",
    "describe",
    "markdown",
    "summary_rows",
    "timing_rows",
    "timings_shown",
]

#: Above this share of one core, the generator says it may have been the bottleneck.
CPU_WARNING: Final = 0.8
STAT_COLUMNS: Final = ("p50", "p90", "p99", "p99.9", "max", "mean")


def describe(spec: LoadSpec) -> str:
    """One line: method, URL, concurrency, model, mode."""
    model = f"open, {spec.rate:g}/s {spec.arrivals}" if spec.rate else "closed"
    mode = ""
    if spec.stream:
        mode = f", {spec.stream} stream"
    elif spec.mcp_method:
        mode = f", MCP {spec.mcp_method}"
    keep = "" if spec.keepalive else ", no keep-alive"
    method = "POST" if spec.mcp_method else spec.method
    return f"{method} {spec.url}  concurrency {spec.concurrency} ({model}{mode}{keep})"


def timings_shown(result: LoadResult) -> list[str]:
    spec = result.spec
    names = ["ttfb", "latency"]
    if spec.sse:
        names += ["first_event", "event_delay"]
    if spec.stream:
        names += ["ttft", "itl"]
    if spec.rate is not None:
        names.append("queue")
    if not spec.keepalive or spec.tls:
        names.append("connect")
    return names


def summary_rows(result: LoadResult) -> list[tuple[str, str]]:
    spec = result.spec
    rows = [("requests ok", str(result.ok)), ("errors", str(result.errors))]
    rows += [(f"  {kind}", str(count)) for kind, count in sorted(result.error_kinds.items())]
    if spec.rate is not None:
        rows.append(("dropped (queued past --timeout)", str(result.dropped)))
    rows += [
        ("connections opened", str(result.connections)),
        ("elapsed", f"{result.elapsed:.2f} s"),
        ("rps", f"{result.rps:,.1f}"),
        ("throughput", f"{result.throughput / 1e6:,.2f} MB/s"),
    ]
    if spec.sse:
        rows.append(("SSE events", str(result.events)))
    if spec.stream:
        source = (
            f"usage in {result.usage_streams} streams, counted deltas in {result.counted_streams}"
        )
        tps = tps_summary(result.stream_tps)
        rows += [
            ("output tokens", f"{result.output_tokens} ({source})"),
            ("tokens/s (aggregate)", f"{result.tokens_per_s:,.1f}"),
            ("tokens/s per stream", f"p50 {tps['p50']:,.1f}  min {tps['min']:,.1f}"),
        ]
    if spec.mcp_method:
        rows += [
            ("MCP initializations", str(result.mcp_initializations)),
            ("MCP re-initializations (404)", str(result.mcp_reinitializations)),
        ]
        rows += [
            (f"  JSON-RPC error {code}", str(n)) for code, n in sorted(result.rpc_errors.items())
        ]
    rows.append(("generator CPU", f"{result.cpu_share * 100:.0f}% of a core"))
    return rows


def timing_rows(result: LoadResult) -> list[tuple[str, list[str], int]]:
    """``(metric, [p50 .. mean in ms], count)`` for the timings this run measured."""
    out = []
    for name in timings_shown(result):
        s = getattr(result, name).summary_ms()
        out.append((name, [f"{s[k]:.3f}" for k in STAT_COLUMNS], int(s["count"])))
    return out


def _compare_figures(results: Sequence[LoadResult]) -> list[str]:
    names = ["ok", "errors", "error_rate", "rps", "throughput"]
    timings: list[str] = []
    for result in results:
        timings += [t for t in timings_shown(result) if t not in timings]
    for timing in timings:
        names += [f"{timing}_{stat}" for stat in ("p50", "p90", "p99", "max")]
    if any(r.spec.stream for r in results):
        names += ["output_tokens", "tokens_per_s", "stream_tps_p50", "stream_tps_min"]
    if any(r.spec.mcp_method for r in results):
        names.append("reinitializations")
    names.append("cpu_share")
    return names


def _show(name: str, value: float) -> str:
    if name in ("error_rate", "cpu_share"):
        return f"{value * 100:.2f}%"
    if name == "throughput":
        return f"{value / 1e6:.2f} MB/s"
    if name.rsplit("_", 1)[0] in (
        "ttfb",
        "latency",
        "ttft",
        "itl",
        "first_event",
        "event_delay",
        "connect",
        "queue",
    ):
        return f"{value * 1000:.3f} ms"
    if name in ("ok", "errors", "output_tokens", "reinitializations"):
        return str(int(value))
    return f"{value:,.1f}"


def compare_rows(results: Sequence[LoadResult]) -> list[tuple[str, list[str]]]:
    """``(figure, [cell per target])``: the value, and from the second target on its
    ratio to the first (``x1.08``; ``-`` where the first is 0)."""
    values = [figures(r) for r in results]
    factors = ratios(results)
    rows = []
    for name in _compare_figures(results):
        cells = []
        for i, (mine, factor) in enumerate(zip(values, factors, strict=True)):
            cell = _show(name, mine[name])
            if i:
                ratio = factor[name]
                cell += f" (x{ratio:.2f})" if ratio is not None else " (-)"
            cells.append(cell)
        rows.append((name, cells))
    return rows


def cpu_warning(result: LoadResult) -> str | None:
    """The warning to print when the generator was busy enough to be the bottleneck."""
    if result.cpu_share <= CPU_WARNING:
        return None
    return (
        f"warning: the load generator used {result.cpu_share * 100:.0f}% of a core during "
        f"the run against {result.spec.url}: it may have been the bottleneck (fewer "
        "connections, or several generator processes, measure the server more truly)"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def markdown(results: Sequence[LoadResult], failures: Sequence[str] = ()) -> str:
    """The report's tables in Markdown (one section per target, then the comparison)."""
    lines = ["# proxycore loadtest", ""]
    for result in results:
        lines += [f"## {describe(result.spec)}", ""]
        lines += [*_table(("figure", "value"), summary_rows(result)), ""]
        rows = [[name, *cells, str(count)] for name, cells, count in timing_rows(result)]
        lines += [*_table(("timing (ms)", *STAT_COLUMNS, "count"), rows), ""]
    if len(results) > 1:
        lines += ["## comparison (ratio to the first target)", ""]
        urls = [r.spec.url for r in results]
        lines += _table(
            ["figure", *urls], [[name, *cells] for name, cells in compare_rows(results)]
        )
        lines.append("")
    if failures:
        lines += ["## failed thresholds", ""] + [f"- {text}" for text in failures] + [""]
    return "\n".join(lines)


def compare_json(results: Sequence[LoadResult], rounds: int) -> dict[str, object]:
    """Every target's result and its ratios to the first target's figures."""
    return {
        "rounds": rounds,
        "targets": [
            {"url": r.spec.url, "result": r.to_json(), "ratios": factor}
            for r, factor in zip(results, ratios(results), strict=True)
        ],
    }
