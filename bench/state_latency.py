"""``python -m bench.state_latency``: what ``[state]`` (Redis) adds to one request.

Needs ``redis-server`` on PATH. Starts a Redis on a free port, a canned-response upstream
and ``proxycore serve`` processes on 127.0.0.1, then measures from this process:

1. ``rate``: sequential GETs on one keep-alive connection through a route with a
   ``rate_limit`` (concurrency limit too), per-process state vs ``[state] redis``: the added
   latency is the shared limit's one script call (``EVALSHA``: rate + stream lease).
2. ``tunnel``: MCP calls (``tools/list``, fresh connection each) to a tunnel session held by
   replica A, asked on A (local) vs on B (forwarded over the replica relay).

Prints p50/p90/p99 in microseconds per case and the differences. ``--requests N`` (default
5000) and ``--calls N`` (default 500). Loopback numbers: a real network adds its round trip
to every Redis call and to every forwarded tunnel call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

__all__ = ["main"]

RESPONSE: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
TOKEN: Final = "bench-token-abcdefghijklmnopqrstuvwxyz0123456789"
RELAY_SECRET: Final = "bench-relay-secret-0123456789abcdef"
API: Final = "/reverse-proxy/sessions"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_port(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


async def upstream(port: int, *, task_status: trio.TaskStatus[None]) -> None:
    """Canned 200 for every request head (keep-alive)."""

    async def one(stream: trio.SocketStream) -> None:
        pending = b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some(65536):
                pending += data
                while b"\r\n\r\n" in pending:
                    _, _, pending = pending.partition(b"\r\n\r\n")
                    await stream.send_all(RESPONSE)

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(one, listeners)


def config(directory: Path, name: str, redis: str, upstream_port: int, tunnel: bool) -> Path:
    port, admin = free_port(), free_port()
    text = f'[server]\nlisten = "127.0.0.1:{port}"\n\n[admin]\nlisten = "127.0.0.1:{admin}"\n\n'
    if redis:
        text += f'[state]\nredis = "{redis}"\n'
        if tunnel:
            text += f'relay_listen = "127.0.0.1:0"\nrelay_secret_file = "{directory / "relay"}"\n'
    if tunnel:
        text += f'\n[inbound]\nmode = "bearer"\nsecret_file = "{directory / "inbound"}"\n'
        text += "\n[tunnel]\nenabled = true\n"
    text += (
        f'\n[[routes]]\nprefix = "/app/"\nupstream = "http://127.0.0.1:{upstream_port}/"\n'
        "rate_limit = { requests_per_second = 1000000, burst = 1000000, "
        "max_concurrent_streams = 1000 }\n"
    )
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    path.with_suffix(".port").write_text(str(port), encoding="utf-8")
    return path


def spawn(path: Path) -> tuple[contextlib.AbstractContextManager[subprocess.Popen[bytes]], int]:
    port = int(path.with_suffix(".port").read_text(encoding="utf-8"))
    cm = process(
        [sys.executable, "-m", "proxycore", "serve", "--config", str(path), "--no-access-log"],
        path.with_suffix(".log"),
    )
    return cm, port


async def keepalive_latencies(port: int, requests: int) -> list[float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = []
    request = b"GET /app/x HTTP/1.1\r\nHost: bench\r\n\r\n"
    async with stream:
        for _ in range(requests):
            started = time.perf_counter()
            await stream.send_all(request)
            got = b""
            while not got.endswith(b"ok"):
                got += await stream.receive_some(65536)
            if not got.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"unexpected answer: {got[:60]!r}")
            out.append(time.perf_counter() - started)
    return out


async def call_latencies(port: int, key: str, calls: int) -> list[float]:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
    head = (
        f"POST {API}/{key}/mcp HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Accept: application/json\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(head + body)
            got = b""
            while data := await stream.receive_some(65536):
                got += data
        if not got.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"unexpected answer: {got[:80]!r}")
        out.append(time.perf_counter() - started)
    return out


async def tunnel_server(ws: WebSocketConnection, session: str) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            frame = json.loads(await ws.get_message())
            if frame.get("type") == "request":
                reply = {"jsonrpc": "2.0", "id": frame["payload"]["id"], "result": {"tools": []}}
                msg = {"type": "response", "sessionId": session, "payload": reply}
                await ws.send_message(json.dumps(msg))


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    return at(0.5), at(0.9), at(0.99)


def report(name: str, base: list[float], other: list[float], labels: tuple[str, str]) -> None:
    b, o = percentiles(base), percentiles(other)
    print(f"{name}: p50 / p90 / p99 (us)")
    print(f"  {labels[0]:<28} {b[0]:9.0f} {b[1]:9.0f} {b[2]:9.0f}")
    print(f"  {labels[1]:<28} {o[0]:9.0f} {o[1]:9.0f} {o[2]:9.0f}")
    print(f"  {'added':<28} {o[0] - b[0]:9.0f} {o[1] - b[1]:9.0f} {o[2] - b[2]:9.0f}")


async def run(requests: int, calls: int) -> None:
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="state-latency-"))
    (directory / "relay").write_text(RELAY_SECRET + "\n", encoding="utf-8")
    (directory / "inbound").write_text(TOKEN + "\n", encoding="utf-8")
    os.chmod(directory / "inbound", 0o600)
    redis_port, upstream_port = free_port(), free_port()
    redis = f"redis://127.0.0.1:{redis_port}/0"
    redis_args = [
        redis_bin,
        "--port",
        str(redis_port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
    ]
    with contextlib.ExitStack() as stack:
        stack.enter_context(process(redis_args, directory / "redis.log"))
        wait_port(redis_port)
        async with trio.open_nursery() as nursery:
            await nursery.start(upstream, upstream_port)
            local_cm, local_port = spawn(config(directory, "local", "", upstream_port, False))
            shared_cm, shared_port = spawn(config(directory, "shared", redis, upstream_port, False))
            stack.enter_context(local_cm)
            stack.enter_context(shared_cm)
            wait_port(local_port)
            wait_port(shared_port)
            await trio.sleep(0.5)  # the backend connected
            await keepalive_latencies(local_port, 200)  # warm up both
            await keepalive_latencies(shared_port, 200)
            base = await keepalive_latencies(local_port, requests)
            shared = await keepalive_latencies(shared_port, requests)
            report("rate (keep-alive GET)", base, shared, ("per-process limits", "[state] redis"))

            a_cm, a_port = spawn(config(directory, "a", redis, upstream_port, True))
            b_cm, b_port = spawn(config(directory, "b", redis, upstream_port, True))
            stack.enter_context(a_cm)
            stack.enter_context(b_cm)
            wait_port(a_port)
            wait_port(b_port)
            await trio.sleep(0.5)
            url = f"ws://127.0.0.1:{a_port}/reverse-proxy/ws"
            headers = [(b"Authorization", f"Bearer {TOKEN}".encode())]
            async with open_websocket_url(url, extra_headers=headers) as ws:
                await ws.send_message(json.dumps({"type": "register", "server": {"name": "b"}}))
                session = json.loads(await ws.get_message())["sessionId"]
                nursery.start_soon(tunnel_server, ws, session)
                await trio.sleep(0.5)  # published in the directory
                await call_latencies(a_port, session, 50)
                await call_latencies(b_port, session, 50)
                here = await call_latencies(a_port, session, calls)
                there = await call_latencies(b_port, session, calls)
                report("tunnel (tools/list)", here, there, ("on the holder", "on another replica"))
            nursery.cancel_scope.cancel()
    shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.state_latency", description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args(argv)
    trio.run(run, args.requests, args.calls)


if __name__ == "__main__":
    main()
