"""``proxycore tunnel``: the command line of the tunnel client (a drop-in for the existing one)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import trio

from ..observe.accesslog import configure_logging
from ..tunnel.client import ClientOptions, TunnelClient
from ..tunnel.client_wire import normalize_gateway_url

__all__ = ["add_arguments", "options_from_args", "run"]

EXIT_USAGE = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gateway",
        metavar="URL",
        default=os.environ.get("REVERSE_PROXY_GATEWAY"),
        help="gateway URL, http(s):// or ws(s):// (/reverse-proxy/ws appended when it has no "
        "path; env REVERSE_PROXY_GATEWAY)",
    )
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token (env REVERSE_PROXY_TOKEN)")
    token.add_argument("--token-file", metavar="FILE", help="read the bearer token from FILE")
    p.add_argument(
        "--local-stdio", metavar="CMD", required=True, help="the local MCP server command line"
    )
    p.add_argument("--name", help="server name to register (default: the command's basename)")
    p.add_argument("--description", default="", help="server description to register")
    p.add_argument(
        "--reconnect-delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="first retry delay; doubles, capped at 60 s, with jitter (default 1)",
    )
    p.add_argument(
        "--max-retries", type=int, default=0, metavar="N", help="give up after N (0: never)"
    )
    p.add_argument(
        "--keepalive", type=float, default=30.0, metavar="SECONDS", help="heartbeat interval"
    )
    p.add_argument(
        "--log-level", default="info", type=str.lower, choices=["debug", "info", "warning", "error"]
    )


def options_from_args(args: argparse.Namespace) -> ClientOptions:
    """The client options the arguments ask for. Raises ValueError with a user message."""
    if not args.gateway:
        raise ValueError("--gateway (or REVERSE_PROXY_GATEWAY) is required")
    gateway = normalize_gateway_url(args.gateway)
    if args.token_file:
        try:
            token: str | None = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"--token-file: {exc.strerror or exc}") from None
    else:
        token = args.token or os.environ.get("REVERSE_PROXY_TOKEN") or None
    command = tuple(shlex.split(args.local_stdio))
    if not command:
        raise ValueError("--local-stdio is empty")
    if args.reconnect_delay <= 0 or args.keepalive <= 0 or args.max_retries < 0:
        raise ValueError("--reconnect-delay and --keepalive must be > 0, --max-retries >= 0")
    return ClientOptions(
        gateway=gateway,
        command=command,
        name=args.name or Path(command[0]).name,
        description=args.description,
        token=token,
        reconnect_delay=args.reconnect_delay,
        max_retries=args.max_retries,
        keepalive=args.keepalive,
    )


def run(args: argparse.Namespace) -> int:
    """Run the client until a signal (exit 0) or out of retries / refused (exit 1)."""
    configure_logging(args.log_level, access=False)
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"proxycore tunnel: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return trio.run(TunnelClient(options).run)
