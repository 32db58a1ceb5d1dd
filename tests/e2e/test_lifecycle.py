"""Lifecycle of a running proxy: reload, graceful shutdown, force, and signals.

In-process tests run ``proxycore.ops.server.Server`` in the test's trio run, with raw
upstreams (``RawUpstream``) that the test drives step by step, so "the stream was
still running when X happened" is a fact, not a timing guess. Timing is real (no
MockClock: the sockets are real), so grace periods are kept short where the test has
to wait them out. The last tests run ``python -m proxycore serve`` as a real process
and talk to it with signals; whatever they start is killed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Final

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from proxycore import Config, Route, ServerSettings
from proxycore.config import AdminSettings
from proxycore.ops.server import Server
from tests.apps import sse_event
from tests.e2e.test_streaming import LAST_CHUNK, SSE_HEAD, chunk, header, open_client
from tests.helpers import http_request, read_until, start_raw_server

Address = tuple[str, int]

#: The proxy's log line for each bound listener (``configure_logging`` format).
LISTENING: Final = re.compile(r"proxycore INFO proxycore\.server: listening on 127\.0\.0\.1:(\d+)")


# --------------------------------------------------------------------------- upstream


class RawUpstream:
    """A raw HTTP/1.1 keep-alive upstream that answers GETs according to their path.

    - ``/stream``: SSE head and event 0 at once; event 1 and the terminal chunk once
      ``release`` is set.
    - ``/forever``: SSE head and event 0, then silence until the proxy closes the
      connection (``closed`` is set then).
    - ``/slow``: sets ``got_slow``; answers 200 with ``name`` once ``release`` is set.
    - anything else: 200 with ``name`` as the body.

    ``targets`` lists every request target received, in order.
    """

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.targets: list[bytes] = []
        self.release = trio.Event()
        self.got_slow = trio.Event()
        self.closed = trio.Event()

    def plain(self) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
            len(self.name),
            self.name,
        )

    async def handle(self, stream: trio.SocketStream) -> None:
        while True:
            try:
                head = await read_until(stream, b"\r\n\r\n")
            except EOFError:
                return
            target = head.split(b" ", 2)[1]
            self.targets.append(target)
            if target == b"/stream":
                await stream.send_all(SSE_HEAD + chunk(sse_event(0)))
                await self.release.wait()
                await stream.send_all(chunk(sse_event(1)) + LAST_CHUNK)
            elif target == b"/forever":
                await stream.send_all(SSE_HEAD + chunk(sse_event(0)))
                try:
                    while await stream.receive_some(65536):
                        pass
                finally:
                    self.closed.set()
                return
            elif target == b"/slow":
                self.got_slow.set()
                await self.release.wait()
                await stream.send_all(self.plain())
            else:
                await stream.send_all(self.plain())

    async def start(self, nursery: trio.Nursery) -> str:
        """Serve in ``nursery``; return the upstream URL."""
        port = await start_raw_server(nursery, self.handle)
        return f"http://127.0.0.1:{port}/"


# --------------------------------------------------------------------------- proxy


def proxy_config(upstream: str, *, grace: float = 5.0, admin: bool = False) -> Config:
    """One catch-all route to ``upstream``, listening on 127.0.0.1, a free port."""
    return Config(
        routes=(Route(prefix="/", upstream=upstream),),
        server=ServerSettings(listen=("127.0.0.1:0",), shutdown_grace=grace),
        admin=AdminSettings(listen="127.0.0.1:0" if admin else None),
    )


@dataclasses.dataclass
class RunningProxy:
    server: Server
    host: str = ""
    port: int = 0
    #: Set when ``server.run`` has returned; ``stopped_at`` is when (trio clock).
    stopped: trio.Event = dataclasses.field(default_factory=trio.Event)
    stopped_at: float = 0.0

    @property
    def admin(self) -> Address:
        assert self.server.admin_address is not None
        return self.server.admin_address


async def start_server(nursery: trio.Nursery, server: Server) -> RunningProxy:
    """Run ``server`` in ``nursery``; return once it listens."""
    proxy = RunningProxy(server)

    async def run(
        *, task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await server.run(task_status=task_status)
        proxy.stopped_at = trio.current_time()
        proxy.stopped.set()

    addresses: list[Address] = await nursery.start(run)
    proxy.host, proxy.port = addresses[0]
    return proxy


async def get(host: str, port: int, target: str = "/") -> tuple[int, bytes]:
    status, _, body = await http_request(host, port, "GET", target)
    return status, body


async def connect_fails(host: str, port: int) -> bool:
    """True if a TCP connection to ``host:port`` is refused (or reset at once)."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    async with stream:
        try:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True


def reserved_port() -> socket.socket:
    """A socket bound (not listening) to a free loopback port: connecting to it is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


# --------------------------------------------------------------------------- metrics


def metric(text: bytes | str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with exactly ``labels`` in a Prometheus text page."""
    page = text.decode("utf-8") if isinstance(text, bytes) else text
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def server_metric(server: Server, name: str, **labels: str) -> float | None:
    return metric(server.state.metrics.exposition(), name, **labels)


# --------------------------------------------------------------------------- reload


async def test_reload_under_load_keeps_stream_on_old_upstream_and_new_requests_go_to_new() -> None:
    a, b = RawUpstream(b"A"), RawUpstream(b"B")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = Server(proxy_config(await a.start(nursery)))
            b_url = await b.start(nursery)
            proxy = await start_server(nursery, server)
            assert server.state.snapshot.generation == 1
            assert server_metric(server, "proxycore_config_generation") == 1
            async with open_client(proxy.host, proxy.port) as client:
                await client.request(b"GET", b"/stream")
                assert (await client.head()).status_code == 200
                assert await client.body_at_least(len(sse_event(0))) == sse_event(0)

                assert server.reload(proxy_config(b_url))
                assert server.state.snapshot.generation == 2
                assert server_metric(server, "proxycore_config_generation") == 2
                assert server_metric(server, "proxycore_reloads_total", outcome="ok") == 1

                # A request started after the reload goes to B ...
                assert await get(proxy.host, proxy.port, "/after") == (200, b"B")
                # ... while the stream in flight is still A's, and completes cleanly.
                a.release.set()
                assert await client.read_to_end(), "the stream was cut by the reload"
                assert bytes(client.body) == sse_event(0) + sse_event(1)

                # The next exchange on the same (kept-alive) client connection uses B.
                client.h11.start_next_cycle()
                client.body.clear()
                await client.request(b"GET", b"/next")
                assert (await client.head()).status_code == 200
                assert await client.read_to_end()
                assert bytes(client.body) == b"B"
            assert a.targets == [b"/stream"]
            assert b.targets == [b"/after", b"/next"]
            nursery.cancel_scope.cancel()


def _toml(upstream: str, extra: str = "") -> str:
    return (
        f'[server]\nlisten = "127.0.0.1:0"\n{extra}\n'
        f'[[routes]]\nprefix = "/"\nupstream = "{upstream}"\n'
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param('[[routes]]\nprefix = "/"\nupstream = \n', "invalid TOML", id="syntax"),
        pytest.param(
            _toml("http://127.0.0.1:9/", "bogus_key = 1\n"),
            "server.bogus_key: unknown key",
            id="schema",
        ),
        pytest.param(None, "cannot read config", id="missing-file"),
    ],
)
async def test_bad_reload_keeps_old_routes_and_logs_one_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | None, problem: str
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.server")
    path = tmp_path / "proxycore.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    a, b = RawUpstream(b"A"), RawUpstream(b"B")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = Server(proxy_config(await a.start(nursery)))
            b_url = await b.start(nursery)
            proxy = await start_server(nursery, server)
            caplog.clear()

            assert server.reload_from(str(path)) is False
            assert await get(proxy.host, proxy.port) == (200, b"A")
            assert server.state.snapshot.generation == 1
            assert server_metric(server, "proxycore_reloads_total", outcome="error") == 1
            assert not server_metric(server, "proxycore_reloads_total", outcome="ok")
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1, [r.getMessage() for r in errors]
            assert errors[0].name == "proxycore.server"
            message = errors[0].getMessage()
            assert str(path) in message and problem in message, message

            # The counterpart: once the file is right, the same call switches to B.
            path.write_text(_toml(b_url), encoding="utf-8")
            assert server.reload_from(str(path)) is True
            assert await get(proxy.host, proxy.port) == (200, b"B")
            assert server.state.snapshot.generation == 2
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("what", ["listen", "admin"])
async def test_reload_with_changed_address_warns_and_keeps_serving_on_old_address(
    caplog: pytest.LogCaptureFixture, what: str
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.server")
    a, b = RawUpstream(b"A"), RawUpstream(b"B")
    # Held (bound, not listening) for the whole test: a connection there is refused
    # unless the proxy (wrongly) started listening on it.
    with reserved_port() as first, reserved_port() as second, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = Server(proxy_config(await a.start(nursery)))
            b_url = await b.start(nursery)
            proxy = await start_server(nursery, server)
            served = f"127.0.0.1:{proxy.port}"

            def moved(sock: socket.socket) -> Config:
                address = f"127.0.0.1:{sock.getsockname()[1]}"
                config = proxy_config(b_url)
                if what == "listen":
                    return dataclasses.replace(
                        config, server=dataclasses.replace(config.server, listen=(address,))
                    )
                return dataclasses.replace(config, admin=AdminSettings(listen=address))

            for sock in (first, second):
                caplog.clear()
                assert server.reload(moved(sock)) is True
                warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
                assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
                message = warnings[0].getMessage()
                assert "restart" in message, message
                # It names what is still served (as configured, or as bound), never an
                # address asked for by an earlier reload and not listened on.
                assert "127.0.0.1:0" in message or served in message, message
                if sock is second:
                    assert f"127.0.0.1:{first.getsockname()[1]}" not in message, message

                # Still serving on the old address, with the new routes.
                assert await get(proxy.host, proxy.port) == (200, b"B")
                assert await connect_fails("127.0.0.1", sock.getsockname()[1])
            assert server.admin_address is None
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- shutdown


async def test_shutdown_closes_idle_keepalive_connection_at_once_and_refuses_new_ones() -> None:
    a = RawUpstream(b"A")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = Server(proxy_config(await a.start(nursery), grace=5.0))
            proxy = await start_server(nursery, server)
            async with open_client(proxy.host, proxy.port) as idle:
                await idle.request(b"GET", b"/")
                assert (await idle.head()).status_code == 200
                assert await idle.read_to_end()
                assert not proxy.stopped.is_set()

                start = trio.current_time()
                server.shutdown()
                with trio.fail_after(1):  # "at once": well inside the 5 s grace
                    with contextlib.suppress(trio.BrokenResourceError):
                        assert await idle.stream.receive_some(1) == b""
                    await proxy.stopped.wait()  # nothing in flight: no reason to wait
                assert proxy.stopped_at - start < 1
            assert await connect_fails(proxy.host, proxy.port)
            nursery.cancel_scope.cancel()


async def test_shutdown_lets_in_flight_exchange_finish_with_connection_close() -> None:
    a = RawUpstream(b"A")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = Server(proxy_config(await a.start(nursery), grace=5.0, admin=True))
            proxy = await start_server(nursery, server)
            async with open_client(proxy.host, proxy.port) as client:
                await client.request(b"GET", b"/slow")
                await a.got_slow.wait()

                server.shutdown()
                await trio.testing.wait_all_tasks_blocked()  # the drain has begun
                assert await connect_fails(proxy.host, proxy.port)
                assert not proxy.stopped.is_set()
                await trio.sleep(0.5)
                a.release.set()  # the response finishes 0.5 s into the drain

                response = await client.head()
                assert response.status_code == 200
                assert header(response, b"connection") == b"close"
                assert await client.read_to_end()
                assert bytes(client.body) == b"A"
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await client.stream.receive_some(1) == b""
                with trio.fail_after(1):  # the last exchange done: no need to wait longer
                    await proxy.stopped.wait()
            nursery.cancel_scope.cancel()


async def test_shutdown_cuts_stream_at_grace_deadline_and_readyz_turns_503_at_once() -> None:
    grace = 1.0
    a = RawUpstream(b"A")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = Server(proxy_config(await a.start(nursery), grace=grace, admin=True))
            proxy = await start_server(nursery, server)
            admin_host, admin_port = proxy.admin
            assert await get(admin_host, admin_port, "/readyz") == (200, b"ready\n")
            async with open_client(proxy.host, proxy.port) as client:
                await client.request(b"GET", b"/forever")
                assert (await client.head()).status_code == 200
                assert await client.body_at_least(len(sse_event(0))) == sse_event(0)

                start = trio.current_time()
                server.shutdown()
                assert await get(admin_host, admin_port, "/readyz") == (503, b"not ready\n")
                assert await get(admin_host, admin_port, "/healthz") == (200, b"ok\n")
                await trio.testing.wait_all_tasks_blocked()
                assert await connect_fails(proxy.host, proxy.port)

                assert not await client.read_to_end(), "a cut stream was passed off as complete"
                assert bytes(client.body) == sse_event(0)
                cut_at = trio.current_time()
                await proxy.stopped.wait()
                await a.closed.wait()  # the upstream side was closed too
            assert grace <= cut_at - start < grace + 1
            assert grace <= proxy.stopped_at - start < grace + 1
            nursery.cancel_scope.cancel()


async def test_force_during_drain_cuts_everything_at_once() -> None:
    a = RawUpstream(b"A")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = Server(proxy_config(await a.start(nursery), grace=30.0))
            proxy = await start_server(nursery, server)
            async with (
                open_client(proxy.host, proxy.port) as stream1,
                open_client(proxy.host, proxy.port) as stream2,
            ):
                for client in (stream1, stream2):
                    await client.request(b"GET", b"/forever")
                    assert (await client.head()).status_code == 200
                    await client.body_at_least(len(sse_event(0)))

                server.shutdown()
                await trio.sleep(0.2)
                assert not proxy.stopped.is_set(), "the drain did not wait for the streams"

                start = trio.current_time()
                server.force()
                with trio.fail_after(1):
                    await proxy.stopped.wait()
                    for client in (stream1, stream2):
                        assert not await client.read_to_end()
                    await a.closed.wait()
                assert proxy.stopped_at - start < 0.5
            assert len(a.targets) == 2
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- signals


def _open_append(path: Path) -> IO[bytes]:
    return open(path, "ab")  # closed by the caller once the child has it


@asynccontextmanager
async def spawn_proxycore(args: list[str], log: Path) -> AsyncIterator[trio.Process]:
    """Run ``python -m proxycore ARGS`` in a new process group, stderr appended to ``log``.

    On exit the whole group (the process and any worker it started) is killed and
    reaped, whatever happened in the test (even under cancellation).
    """
    with _open_append(log) as err:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxycore", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with trio.move_on_after(5):
                await process.wait()


async def wait_for_log(
    log: Path, pattern: re.Pattern[str], process: trio.Process, within: float = 10.0
) -> re.Match[str]:
    """Poll ``log`` until ``pattern`` matches; fail if ``process`` exits first."""
    with trio.fail_after(within):
        while True:
            text = await trio.Path(log).read_text(encoding="utf-8", errors="replace")
            found = pattern.search(text)
            if found:
                return found
            if process.poll() is not None:
                raise AssertionError(f"proxycore exited ({process.returncode}):\n{text}")
            await trio.sleep(0.05)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file


async def test_sighup_via_reload_command_and_sigterm_end_to_end(tmp_path: Path) -> None:
    config, pid_path, log = tmp_path / "proxy.toml", tmp_path / "proxy.pid", tmp_path / "err.log"
    a, b = RawUpstream(b"A"), RawUpstream(b"B")
    grace = 5.0
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a_url, b_url = await a.start(nursery), await b.start(nursery)
            extra = f"shutdown_grace = {grace}\n"
            _write(config, _toml(a_url, extra))
            args = ["serve", "--config", str(config), "--pid-file", str(pid_path)]
            async with spawn_proxycore(args, log) as process:
                port = int((await wait_for_log(log, LISTENING, process))[1])
                assert int(pid_path.read_text(encoding="ascii")) == process.pid
                assert await get("127.0.0.1", port) == (200, b"A")

                _write(config, _toml(b_url, extra))
                result = await trio.run_process(
                    [sys.executable, "-m", "proxycore", "reload", "--pid-file", str(pid_path)],
                    capture_stdout=True,
                    capture_stderr=True,
                )
                assert f"sent SIGHUP to {process.pid}" in result.stdout.decode()
                await wait_for_log(log, re.compile(r"reloaded config \(generation 2\)"), process)
                assert await get("127.0.0.1", port) == (200, b"B")

                process.send_signal(signal.SIGTERM)
                with trio.fail_after(grace):
                    code = await process.wait()
                text = log.read_text(encoding="utf-8")
                assert code == 0, text
                assert "SIGTERM: graceful shutdown" in text
                assert not pid_path.exists(), "the pid file was left behind"
            nursery.cancel_scope.cancel()


async def test_second_sigterm_during_drain_stops_at_once(tmp_path: Path) -> None:
    config, log = tmp_path / "proxy.toml", tmp_path / "err.log"
    a = RawUpstream(b"A")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            _write(config, _toml(await a.start(nursery), "shutdown_grace = 60\n"))
            async with spawn_proxycore(["serve", "--config", str(config)], log) as process:
                port = int((await wait_for_log(log, LISTENING, process))[1])
                async with open_client("127.0.0.1", port) as client:
                    await client.request(b"GET", b"/forever")
                    assert (await client.head()).status_code == 200
                    await client.body_at_least(len(sse_event(0)))

                    process.send_signal(signal.SIGTERM)
                    await wait_for_log(log, re.compile("SIGTERM: graceful shutdown"), process)
                    await trio.sleep(0.3)
                    assert process.poll() is None, "the drain did not wait for the stream"

                    process.send_signal(signal.SIGTERM)
                    with trio.fail_after(3):
                        code = await process.wait()
                        assert not await client.read_to_end()
                        await a.closed.wait()
                    assert code == 0, log.read_text(encoding="utf-8")
                    assert "second SIGTERM: stopping now" in log.read_text(encoding="utf-8")
            nursery.cancel_scope.cancel()
