"""``proxycore loadtest``: drive HTTP/1.1 servers with :mod:`proxycore.tools.loadgen`.

``commands.py`` makes the subparser and calls :func:`add_arguments` on it, then
:func:`run` with the parsed arguments. Exit codes: 0 the run happened (even if
requests failed), 1 nothing could connect at all (or a report could not be written),
2 bad arguments (argparse exits with 2 itself; :func:`run` returns 2 for problems it
finds, naming the flag), 3 a ``--fail-if`` threshold failed (after printing which),
130 Ctrl-C. The full reference is docs/loadtest.md.

Output: without ``--json``, a live progress line (rich on a terminal, plain lines
otherwise) and then the result tables; with ``--json``, nothing but JSON on stdout
(one target: :meth:`LoadResult.to_json`; several: every target with its ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import trio

from ..tools.loadgen import LoadResult, LoadSpec
from ..tools.loadgen.bodies import llm_body, llm_headers
from ..tools.loadgen.charts import ChartsUnavailable, require_matplotlib, write_png
from ..tools.loadgen.compare import run_rounds
from ..tools.loadgen.console import Reporter, print_tables
from ..tools.loadgen.llm import FORMATS
from ..tools.loadgen.report import compare_json, cpu_warning, markdown
from ..tools.loadgen.thresholds import (
    Threshold,
    ThresholdError,
    check_thresholds,
    parse_threshold,
)

__all__ = ["add_arguments", "run", "spec_from_args", "specs_from_args"]

EXIT_NO_CONNECTION: Final = 1
EXIT_USAGE: Final = 2
EXIT_THRESHOLD: Final = 3
EXIT_INTERRUPTED: Final = 130
#: Column width used for the tables when stdout is not a terminal.
PLAIN_WIDTH: Final = 100
INSECURE_WARNING: Final = (
    "WARNING: --insecure: TLS certificates are NOT verified; anyone on the path can "
    "read and change this traffic. Use --ca-file for a private CA instead."
)


class UsageError(Exception):
    """An argument that argparse could not check (the URL, files, combinations)."""


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


def _threshold(text: str) -> Threshold:
    try:
        return parse_threshold(text)
    except ThresholdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the loadtest arguments to ``parser`` (the ``loadtest`` subparser)."""
    add = parser.add_argument
    add("urls", nargs="+", metavar="URL", help="http(s)://host[:port]/path; several: compare")
    add(
        "-c",
        "--concurrency",
        type=_positive_int,
        default=10,
        metavar="N",
        help="connections (virtual users) in use at once; with --rate, most in flight (default 10)",
    )
    stop = parser.add_mutually_exclusive_group(required=True)
    stop.add_argument(
        "-n",
        "--requests",
        type=_positive_int,
        metavar="M",
        help="stop after M requests (per target)",
    )
    stop.add_argument(
        "-d",
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help="stop starting requests after SECONDS (per target)",
    )
    add(
        "--rounds",
        type=_positive_int,
        default=1,
        metavar="N",
        help="compare: split the run into N interleaved rounds per target (default 1)",
    )
    add(
        "--rate",
        type=_positive_float,
        metavar="R",
        help="open model: R requests/s, timed from each one's intended start",
    )
    add(
        "--arrivals",
        choices=["uniform", "poisson"],
        default="uniform",
        help="with --rate: evenly spaced or Poisson arrivals (default uniform)",
    )
    add(
        "--sse",
        action="store_true",
        help='parse Server-Sent Events: time to first event, per-event delay from "t_ns"',
    )
    add(
        "--stream",
        choices=FORMATS,
        help="parse an LLM token stream: TTFT, inter-token latency, tokens/s",
    )
    add("--model", default="sim", help="model name in the built-in bodies (default sim)")
    add(
        "--max-tokens",
        type=_positive_int,
        metavar="N",
        help="max_tokens of the built-in --stream openai|anthropic body (default 64)",
    )
    add(
        "--mcp",
        metavar="METHOD",
        help="MCP Streamable HTTP: call METHOD in a loop, a session per virtual user",
    )
    add("--mcp-params", metavar="JSON", help="the params object of each --mcp call")
    add("-m", "--method", metavar="M", help="request method (default GET, POST with a body)")
    add(
        "-H",
        "--header",
        dest="headers",
        action="append",
        type=_header,
        default=None,
        metavar="'Name: value'",
        help="add a request header (repeatable)",
    )
    bodies = parser.add_mutually_exclusive_group()
    bodies.add_argument("--body-file", metavar="FILE", help="send this file as the body")
    bodies.add_argument(
        "--body-template",
        metavar="FILE",
        help="a body per request: {n} = request number, {rand} = random hex",
    )
    add(
        "--no-keepalive",
        action="store_true",
        help="a fresh connection per request (sends Connection: close)",
    )
    add(
        "--read-rate",
        type=_positive_int,
        metavar="BYTES",
        help="read each response at most BYTES/s (a slow reader)",
    )
    add(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="seconds allowed per request, connect included (default 60)",
    )
    add("--ca-file", metavar="FILE", help="https: trust this CA bundle (PEM)")
    add("--insecure", action="store_true", help="https: do NOT verify certificates (loud)")
    add("--sni", metavar="NAME", help="https: server name to send and verify (default: URL host)")
    add(
        "--fail-if",
        dest="fail_if",
        action="append",
        type=_threshold,
        default=None,
        metavar="EXPR",
        help="exit 3 if EXPR holds, e.g. 'ttft_p99>800ms', 'errors>0.1%%'",
    )
    add("--json", action="store_true", help="print only the result as JSON on stdout")
    add("--md", metavar="FILE", help="also write the tables as Markdown to FILE")
    add("--png", metavar="FILE", help="also draw latency CDFs, TTFT/ITL histograms to FILE")


def _parse_url(url: str) -> tuple[bool, str, int, str]:
    """``(tls, host, port, target)`` of an http(s):// URL. Raises UsageError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"URL: invalid URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"URL: must start with http:// or https:// (got {url!r})")
    if not parts.hostname:
        raise UsageError(f"URL: no host in {url!r}")
    if parts.username is not None or parts.password is not None:
        raise UsageError(
            "URL: credentials in the URL are not supported; use -H 'Authorization: ...'"
        )
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    tls = scheme == "https"
    return tls, parts.hostname, port or (443 if tls else 80), target


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def _check_combinations(args: argparse.Namespace) -> None:
    if args.max_tokens is not None and args.stream not in ("openai", "anthropic"):
        raise UsageError("--max-tokens: only with --stream openai or --stream anthropic")
    if args.max_tokens is not None and (args.body_file or args.body_template):
        raise UsageError("--max-tokens: set max_tokens in your --body-file/--body-template")
    if args.mcp_params is not None and args.mcp is None:
        raise UsageError("--mcp-params: only with --mcp METHOD")
    if args.mcp is not None:
        for flag, value in (
            ("--stream", args.stream),
            ("--sse", args.sse),
            ("--body-file", args.body_file),
            ("--body-template", args.body_template),
        ):
            if value:
                raise UsageError(f"{flag}: cannot be combined with --mcp (it builds its bodies)")
        if args.mcp_params is not None:
            try:
                params = json.loads(args.mcp_params)
            except ValueError as exc:
                raise UsageError(f"--mcp-params: not JSON: {exc}") from None
            if not isinstance(params, dict):
                raise UsageError("--mcp-params: must be a JSON object")
    if args.stream and args.sse:
        raise UsageError("--sse: use either --sse (event timing) or --stream (tokens)")
    if args.insecure and args.ca_file:
        raise UsageError("--insecure: contradicts --ca-file (verify with the CA, or not at all)")
    if args.ca_file is not None and not os.access(args.ca_file, os.R_OK):
        raise UsageError(f"--ca-file: cannot read {args.ca_file}")
    if args.sni is not None and not args.sni.strip():
        raise UsageError("--sni: empty server name")
    for flag, path in (("--md", args.md), ("--png", args.png)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"{flag}: the directory of {path} does not exist")
    if args.requests is not None and args.rounds > args.requests:
        raise UsageError(f"--rounds: {args.rounds} rounds need at least as many requests (-n)")


def spec_from_args(args: argparse.Namespace, url: str | None = None) -> LoadSpec:
    """The :class:`LoadSpec` the parsed arguments describe for ``url`` (default: the
    first URL). Raises UsageError."""
    _check_combinations(args)
    tls, host, port, target = _parse_url(url if url is not None else args.urls[0])
    for flag, value in (
        ("--ca-file", args.ca_file),
        ("--insecure", args.insecure),
        ("--sni", args.sni),
    ):
        if value and not tls:
            raise UsageError(f"{flag}: only for https:// URLs")
    headers = list(args.headers or ())
    body = b""
    template: str | None = None
    if args.body_file is not None:
        body = _read("--body-file", args.body_file)
    elif args.body_template is not None:
        try:
            template = _read("--body-template", args.body_template).decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--body-template: {args.body_template} is not UTF-8") from None
    elif args.stream in ("openai", "anthropic"):
        max_tokens = args.max_tokens if args.max_tokens is not None else 64
        template = llm_body(args.stream, args.model, max_tokens)
    if args.stream in ("openai", "anthropic"):
        names = {name.lower() for name, _ in headers}
        headers += [h for h in llm_headers(args.stream) if h[0].lower() not in names]
    has_body = body or template is not None or args.mcp is not None
    method = args.method or ("POST" if has_body else "GET")
    try:
        return LoadSpec(
            host=host,
            port=port,
            path=target,
            method=method,
            headers=tuple(headers),
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
            tls=tls,
            ca_file=args.ca_file,
            insecure=args.insecure,
            sni=args.sni,
            stream=args.stream,
            body_template=template,
            mcp_method=args.mcp,
            mcp_params=args.mcp_params,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def specs_from_args(args: argparse.Namespace) -> list[LoadSpec]:
    """One spec per URL. Raises UsageError."""
    return [spec_from_args(args, url) for url in args.urls]


# --------------------------------------------------------------------------- output


def run(args: argparse.Namespace) -> int:
    """Run the load test the parsed arguments describe; return the exit code."""
    err = sys.stderr
    try:
        specs = specs_from_args(args)
        if args.png is not None:
            require_matplotlib()
    except (UsageError, ChartsUnavailable) as exc:
        print(f"proxycore loadtest: {exc}", file=err)
        return EXIT_USAGE
    if args.insecure:
        print(INSECURE_WARNING, file=err, flush=True)
    out = sys.stdout
    labels = [spec.url for spec in specs]
    try:
        if args.json:
            results = trio.run(run_rounds, specs, args.rounds)
        else:
            from rich.console import Console

            width = None if out.isatty() else PLAIN_WIDTH
            console = Console(file=out, highlight=False, width=width)
            with Reporter(console, out, labels) as reporter:
                results = trio.run(
                    partial(
                        run_rounds,
                        specs,
                        args.rounds,
                        progress=reporter,
                        progress_interval=reporter.interval,
                    )
                )
            print_tables(console, results)
    except KeyboardInterrupt:
        print("proxycore loadtest: interrupted", file=err)
        return EXIT_INTERRUPTED
    failures, checks = check_thresholds(args.fail_if or [], results)
    if args.json:
        data = results[0].to_json() if len(results) == 1 else compare_json(results, args.rounds)
        if args.fail_if:
            data["thresholds"] = checks
        print(json.dumps(data, indent=2), file=out)
    for result in results:
        warning = cpu_warning(result)
        if warning:
            print(warning, file=err)
    code = _write_reports(args, results, failures)
    for result in results:
        if result.connections == 0 and result.errors:
            print(
                f"proxycore loadtest: could not connect to {result.spec.authority} "
                f"({result.error_kinds.get('connect', 0)} connect errors, "
                f"{result.error_kinds.get('tls', 0)} TLS errors)",
                file=err,
            )
            code = code or EXIT_NO_CONNECTION
    if failures:
        for text in failures:
            print(f"proxycore loadtest: threshold failed: {text}", file=err)
        return EXIT_THRESHOLD
    return code


def _write_reports(args: argparse.Namespace, results: list[LoadResult], failures: list[str]) -> int:
    try:
        if args.md is not None:
            Path(args.md).write_text(markdown(results, failures), encoding="utf-8")
        if args.png is not None:
            write_png(results, args.png)
    except OSError as exc:
        print(f"proxycore loadtest: cannot write a report: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_NO_CONNECTION
    return 0
