"""Lifecycle robustness: nothing outside one exchange ends a running proxy.

- ``accept()`` errors (a firewall's EPERM, a connection gone before it was accepted,
  resource exhaustion, an errno nobody expected) are skipped, counted and logged once
  per errno per interval; only a listener that is itself unusable ends the loop. The
  errors are injected through a fake listening socket given to ``accept``.
- An admin request whose handler fails (or whose merged worker scrape is malformed)
  is a 500 for that request only: the admin listener, and the process, go on.
- A SIGHUP that reaches a process before its handler exists is held, not fatal: the
  pid file appears only once the handler is installed, and the supervisor passes a
  SIGHUP on to a starting (or restarting) worker only once it reported ready. These
  run ``python -m proxycore serve`` as real processes (killed as a group at the end).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest
import trio

from proxycore.net.listener import accept, bind_listener
from proxycore.ops.admin import AdminApp, serve_admin
from proxycore.ops.server import AcceptErrors, Server
from tests.e2e.test_lifecycle import (
    LISTENING,
    RawUpstream,
    get,
    metric,
    proxy_config,
    server_metric,
    spawn_proxycore,
    wait_for_log,
)
from tests.e2e.test_workers import (
    RESTARTS,
    WORKERS,
    free_port,
    group_is_gone,
    scrape,
    wait_for_bytes,
    wait_ready,
    worker_pids,
)
from tests.helpers import http_request, read_until, start_raw_server

# --------------------------------------------------------------------------- accept errors


class FakeListener:
    """A listening socket whose ``accept()`` fails with each of ``errors`` in turn, then
    returns ``conn`` (peer ``127.0.0.1:40000``)."""

    def __init__(self, errors: list[int], conn: socket.socket) -> None:
        self.errors = list(errors)
        self.conn = conn

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        if self.errors:
            number = self.errors.pop(0)
            raise OSError(number, os.strerror(number))
        return self.conn, ("127.0.0.1", 40000)

    def fileno(self) -> int:
        return self.conn.fileno()


#: What a listener can meet: a firewall's refusal, the network errors Linux passes on
#: from the new connection, resource exhaustion (EMFILE: a short pause) and an errno
#: no list names (EIO: a short pause too).
SKIPPED: Final = (
    errno.EPERM,
    errno.ECONNABORTED,
    errno.EPERM,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.EPROTO,
    errno.ENOPROTOOPT,
    errno.EOPNOTSUPP,
    errno.ECONNRESET,
    errno.EMFILE,
    errno.EIO,
    errno.EPERM,
)


def accept_errors(server: Server, name: str) -> float | None:
    return server_metric(server, "proxycore_accept_errors_total", errno=name)


def warnings_about(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "proxycore.server"
        and r.levelno == logging.WARNING
        and f"({name})" in r.getMessage()
    ]


async def test_accept_skips_counts_and_logs_once_per_errno_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.server")
    server = Server(proxy_config("http://127.0.0.1:9/"))  # not run: its counters are used
    mine, theirs = socket.socketpair()
    with mine, theirs, trio.fail_after(10):
        listener = FakeListener(list(SKIPPED), mine)
        sock, peer = await accept(listener, server.accept_errors)
        assert (sock, peer) == (mine, ("127.0.0.1", 40000)), "the loop did not go on"
        assert listener.errors == []

        names = {errno.errorcode[n] for n in SKIPPED}
        for name in names:
            assert accept_errors(server, name) == SKIPPED.count(getattr(errno, name)), name
            assert len(warnings_about(caplog, name)) == 1, name  # EPERM: 3 errors, 1 line

        # Within the interval, a fourth EPERM is counted, not logged.
        listener.errors = [errno.EPERM]
        await accept(listener, server.accept_errors)
        assert accept_errors(server, "EPERM") == 4
        assert len(warnings_about(caplog, "EPERM")) == 1

        # Once the interval is over, the next one is logged, with what was not.
        caplog.clear()
        quick = AcceptErrors(server.state.metrics, interval=0.05)
        listener.errors = [errno.EPERM, errno.EPERM]
        await accept(listener, quick)
        await trio.sleep(0.06)
        listener.errors = [errno.EPERM]
        await accept(listener, quick)
        logged = warnings_about(caplog, "EPERM")
        assert len(logged) == 2, logged
        assert "1 more since the last report" in logged[1], logged
        assert accept_errors(server, "EPERM") == 7


async def test_accept_on_an_unusable_listener_raises() -> None:
    """The one thing that still ends the loop: the listening socket itself is gone."""
    calls: list[int] = []
    listener = bind_listener("127.0.0.1", 0)
    listener.close()
    with pytest.raises(OSError) as raised:
        await accept(listener, calls.append)
    assert raised.value.errno == errno.EBADF
    assert calls == []


# --------------------------------------------------------------------------- admin


async def admin_get(port: int, target: str) -> tuple[int, bytes]:
    status, _, body = await http_request("127.0.0.1", port, "GET", target)
    return status, body


def admin_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "proxycore.admin" and r.levelno >= logging.ERROR
    ]


async def test_failing_admin_handler_is_a_500_for_that_request_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.admin")
    ready = [True]

    async def broken_metrics() -> bytes:
        raise RuntimeError("the scrape went wrong\nbadly")

    def flaky_ready() -> bool:
        if ready[0]:
            return True
        raise KeyError("worker")

    app = AdminApp(flaky_ready, broken_metrics)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_admin, app, "127.0.0.1", 0)
            assert await admin_get(port, "/metrics") == (500, b"internal error\n")
            assert await admin_get(port, "/healthz") == (200, b"ok\n")
            assert await admin_get(port, "/readyz") == (200, b"ready\n")
            ready[0] = False
            assert (await admin_get(port, "/readyz?x=1"))[0] == 500
            assert await admin_get(port, "/healthz") == (200, b"ok\n")
            nursery.cancel_scope.cancel()
    errors = admin_errors(caplog)
    assert len(errors) == 2, errors  # one line per failed request, no traceback
    assert "/metrics" in errors[0] and "RuntimeError: the scrape went wrong badly" in errors[0]
    assert "/readyz" in errors[1] and "KeyError" in errors[1] and "x=1" not in errors[1]
    assert all(r.exc_info is None for r in caplog.records)


GOOD_PAGE: Final = (
    b"# TYPE proxycore_requests counter\n"
    b'proxycore_requests_total{route="/",status_class="2xx"} 5.0\n'
)
MALFORMED_PAGE: Final = b'proxycore_requests_total{route="/" 5\n'


async def test_malformed_worker_scrape_is_a_500_and_the_supervisor_admin_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from proxycore.ops.supervisor import merged_metrics

    caplog.set_level(logging.INFO, logger="proxycore.admin")
    page = [MALFORMED_PAGE]

    async def worker_admin(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        body = page[0]
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        await stream.send_all(head + body)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            worker = ("127.0.0.1", await start_raw_server(nursery, worker_admin))

            async def metrics() -> bytes:
                return await merged_metrics([worker], restarts=0)

            _, port = await nursery.start(
                serve_admin, AdminApp(lambda: True, metrics), "127.0.0.1", 0
            )
            assert (await admin_get(port, "/metrics"))[0] == 500
            assert await admin_get(port, "/readyz") == (200, b"ready\n")
            page[0] = GOOD_PAGE
            status, body = await admin_get(port, "/metrics")
            assert status == 200
            labels = {"route": "/", "status_class": "2xx"}
            assert metric(body, "proxycore_requests_total", **labels) == 5
            assert metric(body, "proxycore_workers") == 1
            nursery.cancel_scope.cancel()
    errors = admin_errors(caplog)
    assert len(errors) == 1 and "ValueError" in errors[0], errors


# --------------------------------------------------------------------------- SIGHUP at start


def _text(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")


def _has(log: Path, pattern: re.Pattern[str]) -> bool:
    return pattern.search(_text(log)) is not None


def _count(log: Path, text: str) -> int:
    return _text(log).count(text)


async def hup_until(
    process: trio.Process, log: Path, done: Callable[[], bool], *, worker_exits: int = 0
) -> int:
    """Send SIGHUP to ``process`` at once, then every 2 ms until ``done()``; fail as soon
    as it exits, or a worker exits more than ``worker_exits`` times. Returns how many
    were sent."""
    sent = 0
    while True:
        if process.poll() is not None:
            raise AssertionError(
                f"died ({process.returncode}) after {sent} SIGHUP(s):\n{_text(log)}"
            )
        if _count(log, "exited with") > worker_exits:
            raise AssertionError(f"a worker died after {sent} SIGHUP(s):\n{_text(log)}")
        process.send_signal(signal.SIGHUP)
        sent += 1
        if done():
            return sent
        await trio.sleep(0.002)


RELOADED: Final = "reloaded config (generation"
#: Processes started by the pid-file test. Before the fix the pid file appeared a few
#: milliseconds before the handler; each start had a good chance to hit that window.
ATTEMPTS: Final = 5


async def test_sighup_from_the_moment_the_pid_file_exists_never_kills(tmp_path: Path) -> None:
    """``proxycore reload`` signals the pid in the pid file: SIGHUPs sent from the moment
    it appears, while the process is still starting, are reloads (none is fatal)."""
    config, pid_path = tmp_path / "proxy.toml", tmp_path / "proxy.pid"
    upstream = RawUpstream(b"A")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            url = await upstream.start(nursery)
            config.write_text(
                '[server]\nlisten = "127.0.0.1:0"\n\n'
                f'[[routes]]\nprefix = "/"\nupstream = "{url}"\n',
                encoding="utf-8",
            )
            args = ["serve", "--config", str(config), "--pid-file", str(pid_path)]
            for attempt in range(ATTEMPTS):
                log = tmp_path / f"err{attempt}.log"
                async with spawn_proxycore([*args, "--no-access-log"], log) as process:
                    with trio.fail_after(10):  # polled tightly: signal the moment it appears
                        while not pid_path.exists():
                            assert process.poll() is None, log.read_text(encoding="utf-8")
                            await trio.lowlevel.checkpoint()
                    assert int(pid_path.read_text(encoding="ascii")) == process.pid
                    await hup_until(process, log, functools.partial(_has, log, LISTENING))
                    port = int((await wait_for_log(log, LISTENING, process))[1])
                    await wait_for_log(log, re.compile(re.escape(RELOADED)), process)
                    assert await get("127.0.0.1", port) == (200, b"A")

                    process.send_signal(signal.SIGTERM)
                    with trio.fail_after(10):
                        code = await process.wait()
                    assert code == 0, log.read_text(encoding="utf-8")
                    assert not pid_path.exists()
            nursery.cancel_scope.cancel()


async def test_sighup_while_workers_start_or_restart_kills_none(tmp_path: Path) -> None:
    """SIGHUPs to the supervisor from its first log line on, and again while a killed
    worker is restarted: the supervisor holds them until its handler exists, and passes
    them on to a worker only once it reported ready (each then reloads once up)."""
    config, log = tmp_path / "proxy.toml", tmp_path / "err.log"
    upstream = RawUpstream(b"A")
    admin = free_port()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            url = await upstream.start(nursery)
            config.write_text(
                '[server]\nlisten = "127.0.0.1:0"\nshutdown_grace = 5\n\n'
                f'[admin]\nlisten = "127.0.0.1:{admin}"\n\n'
                f'[[routes]]\nprefix = "/"\nupstream = "{url}"\n',
                encoding="utf-8",
            )
            args = ["serve", "--config", str(config), "--workers", "2", "--no-access-log"]
            async with spawn_proxycore(args, log) as supervisor:
                await wait_for_bytes(log, b"starting 2 workers", within=10)
                await hup_until(supervisor, log, lambda: len(worker_pids(log)) >= 2)
                with trio.fail_after(20):
                    await wait_ready(admin)
                port = int(re.findall(r"on 127\.0\.0\.1:(\d+)", log.read_text("utf-8"))[0])
                assert await get("127.0.0.1", port) == (200, b"A")
                first, _ = worker_pids(log)

                # A worker dies; SIGHUPs keep coming while it is restarted.
                os.kill(first, signal.SIGKILL)
                await hup_until(supervisor, log, lambda: len(worker_pids(log)) >= 3, worker_exits=1)
                with trio.fail_after(20):
                    await wait_ready(admin)
                    while True:  # each worker reloads once it is up
                        if _count(log, RELOADED) >= 3:
                            break
                        await trio.sleep(0.05)
                merged = await scrape(admin)
                assert merged[WORKERS] == 2
                assert merged[RESTARTS] == 1, log.read_text(encoding="utf-8")
                assert _count(log, "exited with") == 1, log.read_text(encoding="utf-8")
                assert "SIGHUP: reloading every worker" in log.read_text(encoding="utf-8")
                assert await get("127.0.0.1", port) == (200, b"A")

                supervisor.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    code = await supervisor.wait()
                assert code == 0, log.read_text(encoding="utf-8")
                assert group_is_gone(supervisor.pid)
            nursery.cancel_scope.cancel()
