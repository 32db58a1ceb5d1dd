"""``proxycore loadtest``: drive an HTTP/1.1 server with :mod:`proxycore.tools.loadgen`.

``cli.py`` makes the subparser and calls :func:`add_arguments` on it, then
:func:`run` with the parsed arguments. Exit codes: 0 the run happened (even if
requests failed), 1 nothing could connect at all, 2 bad arguments (argparse
exits with 2 itself; :func:`run` returns 2 for problems it finds), 130 Ctrl-C.

Output: without ``--json``, a live progress line (rich on a terminal, plain
lines otherwise) and then the result tables; with ``--json``, nothing but the
JSON of :meth:`LoadResult.to_json` on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO
from urllib.parse import urlsplit

import trio

from ..tools.loadgen import LoadProgress, LoadResult, LoadSpec, run_load

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live

__all__ = ["add_arguments", "run", "spec_from_args"]

EXIT_NO_CONNECTION: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
#: Seconds between progress updates on a terminal, and between plain progress lines.
LIVE_INTERVAL: Final = 0.5
PLAIN_INTERVAL: Final = 2.0
#: Column width used for the tables when stdout is not a terminal.
PLAIN_WIDTH: Final = 100


class UsageError(Exception):
    """An argument that argparse could not check (the URL, the body file, the spec)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or name != name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name, value.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the loadtest arguments to ``parser`` (the ``loadtest`` subparser)."""
    parser.add_argument("url", metavar="URL", help="http://host[:port]/path[?query]")
    parser.add_argument(
        "-c",
        "--concurrency",
        type=_positive_int,
        default=10,
        metavar="N",
        help="connections in use at once; with --rate, most requests in flight (default 10)",
    )
    stop = parser.add_mutually_exclusive_group(required=True)
    stop.add_argument(
        "-n", "--requests", type=_positive_int, metavar="M", help="stop after M requests"
    )
    stop.add_argument(
        "-d",
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help="stop starting requests after SECONDS (those in flight finish)",
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        metavar="R",
        help="open model: start R requests/s; arrivals finding no free slot are dropped",
    )
    parser.add_argument(
        "--arrivals",
        choices=["uniform", "poisson"],
        default="uniform",
        help="with --rate: evenly spaced or Poisson arrivals (default uniform)",
    )
    parser.add_argument(
        "--sse",
        action="store_true",
        help='parse Server-Sent Events: time to first event, per-event delay from "t_ns"',
    )
    parser.add_argument(
        "-m", "--method", metavar="M", help="request method (default GET, POST with --body-file)"
    )
    parser.add_argument(
        "-H",
        "--header",
        dest="headers",
        action="append",
        type=_header,
        default=None,
        metavar="'Name: value'",
        help="add a request header (repeatable)",
    )
    parser.add_argument("--body-file", metavar="FILE", help="send this file as the request body")
    parser.add_argument(
        "--no-keepalive",
        action="store_true",
        help="a fresh TCP connection per request (sends Connection: close)",
    )
    parser.add_argument(
        "--read-rate",
        type=_positive_int,
        metavar="BYTES",
        help="read each response at most BYTES/s (a slow reader)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="seconds allowed per request, connect included (default 60)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print only the result as JSON on stdout"
    )


def _parse_url(url: str) -> tuple[str, int, str]:
    """``(host, port, target)`` of an http:// URL. Raises UsageError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise UsageError(
            "https:// URLs are not supported by the load generator yet; "
            "use an http:// URL (for example the proxy's plain-HTTP listener)"
        )
    if scheme != "http":
        raise UsageError(f"the URL must start with http:// (got {url!r})")
    if not parts.hostname:
        raise UsageError(f"the URL has no host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise UsageError("credentials in the URL are not supported; use -H 'Authorization: ...'")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.hostname, port or 80, target


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    """The :class:`LoadSpec` the parsed arguments describe. Raises UsageError."""
    host, port, target = _parse_url(args.url)
    body = b""
    if args.body_file is not None:
        try:
            body = Path(args.body_file).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read --body-file {args.body_file}: {exc.strerror}") from None
    method = args.method or ("POST" if args.body_file is not None else "GET")
    try:
        return LoadSpec(
            host=host,
            port=port,
            path=target,
            method=method,
            headers=tuple(args.headers or ()),
            body=body,
            concurrency=args.concurrency,
            requests=args.requests,
            duration=args.duration,
            rate=args.rate,
            arrivals=args.arrivals,
            keepalive=not args.no_keepalive,
            sse=args.sse,
            read_rate=args.read_rate,
            timeout=args.timeout,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------- output


def _progress_text(p: LoadProgress) -> str:
    text = f"{p.elapsed:5.1f}s  ok {p.ok}  errors {p.errors}"
    if p.dropped:
        text += f"  dropped {p.dropped}"
    text += f"  in flight {p.in_flight}  {p.rps:,.0f} req/s"
    if p.ok:
        text += f"  ttfb p50 {p.ttfb_p50 * 1000:.2f} p99 {p.ttfb_p99 * 1000:.2f} ms"
    return text


class _Reporter:
    """Progress while the run goes: rich.live on a terminal, plain lines otherwise."""

    def __init__(self, console: Console, out: TextIO) -> None:
        self._console = console
        self._out = out
        self._live: Live | None = None
        self.interval = LIVE_INTERVAL if console.is_terminal else PLAIN_INTERVAL

    def __enter__(self) -> _Reporter:
        if self._console.is_terminal:
            from rich.live import Live
            from rich.text import Text

            self._live = Live(
                Text("starting..."), console=self._console, auto_refresh=False, transient=True
            )
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def __call__(self, progress: LoadProgress) -> None:
        line = _progress_text(progress)
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(line, no_wrap=True, overflow="ellipsis"), refresh=True)
        else:
            print(line, file=self._out, flush=True)


def _print_tables(console: Console, result: LoadResult) -> None:
    from rich.table import Table

    spec = result.spec
    model = f"open, {spec.rate:g}/s {spec.arrivals}" if spec.rate else "closed"
    console.print(
        f"{spec.method} http://{spec.authority}{spec.path}  concurrency {spec.concurrency} "
        f"({model}{'' if spec.keepalive else ', no keep-alive'})",
        markup=False,
    )
    summary = Table(show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("requests ok", str(result.ok))
    summary.add_row("errors", str(result.errors))
    for kind, count in sorted(result.error_kinds.items()):
        summary.add_row(f"  {kind}", str(count))
    summary.add_row("dropped", str(result.dropped))
    summary.add_row("connections opened", str(result.connections))
    summary.add_row("elapsed", f"{result.elapsed:.2f} s")
    summary.add_row("rps", f"{result.rps:,.1f}")
    summary.add_row("throughput", f"{result.throughput / 1e6:,.2f} MB/s")
    if spec.sse:
        summary.add_row("SSE events", str(result.events))
    console.print(summary)

    timings = Table(title="timings (ms; successful responses)")
    timings.add_column("metric")
    for name in ("p50", "p90", "p99", "p99.9", "max", "mean"):
        timings.add_column(name, justify="right")
    timings.add_column("count", justify="right")
    rows = [("ttfb", result.ttfb), ("latency", result.latency)]
    if spec.sse:
        rows += [("first_event", result.first_event), ("event_delay", result.event_delay)]
    if not spec.keepalive or result.connections > spec.concurrency:
        rows.append(("connect", result.connect))
    for label, histogram in rows:
        s = histogram.summary_ms()
        timings.add_row(
            label,
            *(f"{s[k]:.3f}" for k in ("p50", "p90", "p99", "p99.9", "max", "mean")),
            str(histogram.count),
        )
    console.print(timings)


def run(args: argparse.Namespace) -> int:
    """Run the load test the parsed arguments describe; return the exit code."""
    try:
        spec = spec_from_args(args)
    except UsageError as exc:
        print(f"proxycore loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE

    out = sys.stdout
    try:
        if args.json:
            result = trio.run(run_load, spec)
            print(json.dumps(result.to_json(), indent=2), file=out)
        else:
            from rich.console import Console

            width = None if out.isatty() else PLAIN_WIDTH
            console = Console(file=out, highlight=False, width=width)
            with _Reporter(console, out) as reporter:
                result = trio.run(
                    partial(run_load, spec, progress=reporter, progress_interval=reporter.interval)
                )
            _print_tables(console, result)
    except KeyboardInterrupt:
        print("proxycore loadtest: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.connections == 0 and result.errors:
        print(
            f"proxycore loadtest: could not connect to {spec.authority} "
            f"({result.error_kinds.get('connect', 0)} connect errors)",
            file=sys.stderr,
        )
        return EXIT_NO_CONNECTION
    return 0
