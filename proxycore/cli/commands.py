"""The ``proxycore`` command: serve, check, tunnel, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence

import trio

from ..cli import loadtest as loadtest_cli
from ..cli import tunnel as tunnel_cli
from ..config import AdminSettings, Config, ConfigError, Route
from ..observe.accesslog import configure_logging
from ..ops.server import Server
from ..security.secrets import SecretError, check_secret, generate_secret

__all__ = ["load_config", "main", "route_table", "with_listen"]

EXIT_CONFIG = 2


def _add_source_args(p: argparse.ArgumentParser, *, allow_upstream: bool) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", metavar="FILE", help="TOML config file")
    group.add_argument("--routes", metavar="FILE", help="legacy JSON route table")
    if allow_upstream:
        group.add_argument("--upstream", metavar="URL", help="one catch-all route to URL")
        p.add_argument(
            "--listen",
            metavar="HOST:PORT",
            help="listen address, replacing the config's server.listen "
            "(default with --upstream: 127.0.0.1:8080)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxycore", description="Streaming reverse proxy for LLM, SSE and agent traffic."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    _add_source_args(serve, allow_upstream=True)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.add_argument("--no-access-log", action="store_true", help="turn the access log off")
    serve.add_argument("--pid-file", metavar="FILE", help="write the process id here")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the listeners (0: one per core; default: server.workers)",
    )

    # Set by the supervisor for its workers (not for users).
    serve.add_argument("--listen-override", help=argparse.SUPPRESS)
    serve.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)

    reload = sub.add_parser("reload", help="ask a running proxy to reload its config (SIGHUP)")
    reload.add_argument("--pid-file", required=True, metavar="FILE")

    check = sub.add_parser("check", help="validate a config and print the route table")
    _add_source_args(check, allow_upstream=False)

    secret = sub.add_parser("secret", help="make or inspect an inbound bearer secret file")
    secret_sub = secret.add_subparsers(dest="secret_command", required=True)
    generate = secret_sub.add_parser("generate", help="write a fresh secret, mode 0600")
    generate.add_argument("--out", required=True, metavar="FILE")
    generate.add_argument("--force", action="store_true", help="replace an existing file")
    check_secret = secret_sub.add_parser("check", help="report a secret file's length and mode")
    check_secret.add_argument("file", metavar="FILE")

    loadtest = sub.add_parser(
        "loadtest",
        help="load-test any HTTP/1.1 server: latency, SSE delay, LLM tokens (TTFT, ITL), MCP calls",
    )
    loadtest_cli.add_arguments(loadtest)

    tunnel = sub.add_parser(
        "tunnel", help="connect a local stdio MCP server out to a tunnel gateway"
    )
    tunnel_cli.add_arguments(tunnel)

    demo = sub.add_parser("demo", help="run a built-in LLM-like upstream behind the proxy")
    demo.add_argument("--requests", type=int, default=3, help="streamed requests to send")
    demo.add_argument("--events", type=int, default=8, help="tokens per stream")
    demo.add_argument("--keep", action="store_true", help="keep both running afterwards")
    demo.add_argument("--port", type=int, default=0, help="proxy port with --keep (0: any)")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """The config the arguments name, with ``--listen`` applied. Raises ConfigError."""
    if getattr(args, "upstream", None):
        config = Config(routes=(Route(prefix="/", upstream=args.upstream),))
    elif args.routes:
        config = Config.from_legacy_json(args.routes)
    else:
        config = Config.from_toml(args.config)
    listen = getattr(args, "listen", None)
    return config if listen is None else with_listen(config, listen)


def with_listen(config: Config, listen: str) -> Config:
    """``config`` listening on ``listen`` only (``--listen``). Raises ConfigError."""
    try:
        server = dataclasses.replace(config.server, listen=(listen,))
    except ConfigError as exc:
        raise ConfigError(f"--listen: {p.partition(': ')[2]}" for p in exc.problems) from None
    return dataclasses.replace(config, server=server)


def route_table(config: Config) -> str:
    """A plain-text table of the routes (no secrets: tokens are never read here)."""
    rows = [
        (
            "PREFIX",
            "UPSTREAM",
            "STRIP",
            "HOST",
            "TIMEOUTS (connect/response/idle/total)",
            "INBOUND",
            "INJECT",
        )
    ]
    for route in sorted(config.routes, key=lambda r: r.prefix):
        t = config.timeouts_for(route)
        rows.append(
            (
                route.prefix,
                route.upstream or f"group of {len(route.group)} ({route.balance})",
                "yes" if route.strip_prefix else "no",
                "client" if route.preserve_host else "upstream",
                f"{t.connect:g}/{t.response:g}/{t.idle:g}/{t.total:g}",
                config.inbound_mode(route),
                _inject_summary(route),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    listen = ", ".join(config.server.listen)
    groups = [group_lines(route) for route in config.routes if route.upstreams is not None]
    text = f"listen: {listen}\n" + "\n".join(line.rstrip() for line in lines)
    return "\n".join([text, *(line for group in groups for line in group)])


def group_lines(route: Route) -> list[str]:
    """The upstream group of ``route`` as ``check`` prints it (tokens never read)."""
    retry = route.retry_policy
    on = ", ".join(retry.on)
    lines = [
        f"group {route.prefix}: balance {route.balance}"
        + (f" on {route.hash_on}" if route.balance == "hash" else "")
        + f"; retry {retry.attempts} tries on {on}, budget {retry.budget_percent:g}%"
        + (f", per try {retry.per_try_timeout:g} s" if retry.per_try_timeout else "")
        + (f"; affinity {route.affinity}" if route.affinity else "")
    ]
    if route.health_check is not None:
        hc = route.health_check
        lines.append(
            f"  health: GET {hc.path} every {hc.interval:g} s (timeout {hc.timeout:g} s, "
            f"down after {hc.unhealthy_threshold}, up after {hc.healthy_threshold})"
        )
    outlier = route.outlier_policy
    if outlier is not None and outlier.consecutive_failures:
        lines.append(
            f"  outlier: eject after {outlier.consecutive_failures} failures in a row for "
            f"{outlier.base_eject_seconds:g} s x times ejected, at most "
            f"{outlier.max_ejected_percent:g}% of the group"
        )
    for spec in route.group:
        target = spec.target
        inject = "-"
        if spec.inject is not None:
            scheme = f"{spec.inject.scheme} " if spec.inject.scheme else ""
            source = (
                f"env:{spec.inject.token_env}"
                if spec.inject.token_env
                else f"file:{spec.inject.token_file}"
            )
            inject = f"{spec.inject.header}:{scheme}***({source})"
        lines.append(
            f"  - {spec.name}: {target.scheme}://{target.host_header}{target.base_path}"
            f" weight {spec.weight}{' backup' if spec.backup else ''}"
            f"{' host=client' if spec.preserve_host else ''} inject {inject}"
        )
    return lines


def _inject_summary(route: Route) -> str:
    """The injected header with the token shown as ``***`` and where it comes from."""
    inject = route.inject
    if inject is None:
        return "-"
    scheme = f"{inject.scheme} " if inject.scheme else ""
    source = f"env:{inject.token_env}" if inject.token_env else f"file:{inject.token_file}"
    return f"{inject.header}:{scheme}***({source})"


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"config is invalid ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    print(route_table(config))
    print("config OK")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..ops.process import sighup_held

    with sighup_held():  # until the handler is installed (a SIGHUP now would end the process)
        return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, access=not args.no_access_log)
    try:
        config = load_config(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"proxycore: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    worker = args.listen_override is not None
    workers = config.server.workers if args.workers is None else args.workers
    if workers != 1 and not worker:
        from ..ops.supervisor import supervise

        return supervise(args, config, workers)
    source = args.config or args.routes
    adjust: Callable[[Config], Config] | None = None
    if args.listen is not None and not worker:
        listen_arg: str = args.listen

        def adjust(c: Config) -> Config:  # a reload keeps --listen
            return with_listen(c, listen_arg)

    if worker:
        listen = tuple(args.listen_override.split(","))

        def adjust(c: Config) -> Config:
            return dataclasses.replace(
                c,
                server=dataclasses.replace(c.server, listen=listen, workers=1),
                admin=AdminSettings(listen="127.0.0.1:0"),
            )

        config = adjust(config)
    try:
        server = Server(config, reuse_port=worker, adjust=adjust)
        trio.run(_run_process, server, source, args.report_fd, args.pid_file)
    except (ConfigError, SecretError) as exc:
        print(f"proxycore: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"proxycore: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def _run_process(
    server: Server, source: str | None, report_fd: int | None, pid_path: str | None
) -> None:
    from ..ops.runner import run_server

    async with trio.open_nursery() as nursery:
        await nursery.start(run_server, server, source, pid_path)
        if report_fd is not None:  # tell the supervisor we are serving, and where our admin is
            os.write(report_fd, json.dumps({"admin": server.admin_address}).encode() + b"\n")
            os.close(report_fd)


def _cmd_reload(args: argparse.Namespace) -> int:
    from ..ops.process import read_pid_file

    try:
        pid = read_pid_file(args.pid_file)
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"proxycore: cannot signal the proxy in {args.pid_file}: {exc}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {pid}")
    return 0


def _cmd_secret(args: argparse.Namespace) -> int:
    try:
        if args.secret_command == "generate":
            path = generate_secret(args.out, force=args.force)
            print(f"wrote a new secret to {path} (mode 0600)")
        else:
            print(check_secret(args.file))
    except SecretError as exc:
        print(f"proxycore: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "secret":
        return _cmd_secret(args)
    if args.command == "reload":
        return _cmd_reload(args)
    if args.command == "tunnel":
        return tunnel_cli.run(args)
    if args.command == "loadtest":
        return loadtest_cli.run(args)
    if args.command == "check":
        return _cmd_check(args)
    if args.command == "serve":
        return _cmd_serve(args)
    from ..tools.demo import run_demo

    return run_demo(args.requests, args.events, keep=args.keep, port=args.port)
