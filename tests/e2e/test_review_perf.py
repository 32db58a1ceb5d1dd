"""Adversarial review of the SSE-path, held-stream and accept-loop performance commits.

Real sockets on 127.0.0.1 (port 0), the real clock; ``fail_after`` caps only turn a hang
into a failure. Where a test needs the trio run to stall (as a loaded process does), it
blocks the thread with ``time.sleep``: the proxy runs in the test's own trio run, so the
stall is deterministic (it only ever makes things later, never earlier).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from typing import Final

import pytest
import trio

from proxycore import Config, Route, ServerSettings, Timeouts
from proxycore.config import RetryPolicy, SSESettings, UpstreamEntry
from proxycore.net.watch import downstream_watch
from proxycore.ops.server import Server
from tests.e2e.test_lifecycle import start_server
from tests.helpers import CountedUpstream, read_until, start_proxy, start_raw_server

CAP: Final = 30.0

_OPENED: list[trio.SocketStream] = []


def track(stream: trio.SocketStream) -> trio.SocketStream:
    """A client stream closed at the test's end whatever happens (a failing assertion
    must not leave a socket for the garbage collector: warnings are errors)."""
    _OPENED.append(stream)
    return stream


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPENED:
        fd = _OPENED.pop().socket.detach()  # closing a trio socket needs a trio run
        if fd >= 0:
            os.close(fd)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]


async def wait_lines(caplog: pytest.LogCaptureFixture, n: int) -> list[dict[str, object]]:
    while len(lines := access_lines(caplog)) < n:  # noqa: ASYNC110
        await trio.sleep(0.01)
    return lines


def stall_run_loop(seconds: float) -> None:
    """Block the trio run (proxy, upstream and client tasks alike) as a loaded process's
    run loop is busy: whatever became ready meanwhile is seen in one scheduler pass."""
    time.sleep(seconds)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def shrink_listener_sndbuf(port: int, size: int = 4096) -> None:
    """Give the proxy's listening socket on ``port`` a small ``SO_SNDBUF``: the sockets it
    accepts inherit it (Linux), so a client that stops reading blocks the proxy's writes
    after a few KiB instead of megabytes (loopback autotuning)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            dup = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        with dup:
            try:
                listening = dup.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                bound = dup.getsockname()
            except OSError:
                continue
            if listening and isinstance(bound, tuple) and bound[1] == port:
                dup.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
                return
    raise AssertionError(f"no listener on port {port}")


async def small_client(host: str, port: int) -> trio.SocketStream:
    """A client socket with a small receive buffer (connected)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, port))
    return trio.SocketStream(sock)


def push(stream: trio.SocketStream, data: bytes) -> int:
    """Send as much of ``data`` as the socket takes now (no wait); return how much."""
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while sent < len(data):
            sent += os.write(stream.socket.fileno(), data[sent:])
    return sent


# -- lazy idle deadline ------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_lazy_idle_stale_deadline_cuts_an_active_stream_after_a_stall(
    caplog: pytest.LogCaptureFixture, framing: str
) -> None:
    """An active body (last chunk well within ``idle``) whose pump wakes from a read after
    the *stale* lazy deadline passed (the run loop was busy) and whose next write blocks
    (a slow reader) is cut as a "write stalled" although nothing was idle.

    Before 38bd723 the deadline was ``last chunk + idle`` at all times, so the stall never
    fires: the body goes through whole."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    idle = 2.0
    size = 1 << 20
    payload = bytes(range(256)) * (size // 256)
    step = trio.Event()
    big = trio.Event()
    up_stream: list[trio.SocketStream] = []
    rest = payload[200:] if framing == "length" else chunk(payload[200:]) + b"0\r\n\r\n"
    pushed = [0]

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        up_stream.append(stream)
        if framing == "length":
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + payload[:100]
            )
        else:
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(payload[:100])
            )
        await step.wait()
        if framing == "length":
            await stream.send_all(payload[100:200])
        else:
            await stream.send_all(chunk(payload[100:200]))
        await big.wait()
        await stream.send_all(rest[pushed[0] :])
        await stream.receive_some(10)  # until the proxy closes it

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", timeouts=Timeouts(idle=idle)
            )
            shrink_listener_sndbuf(pport)
            client = track(await small_client(host, pport))
            await client.send_all(b"GET /big HTTP/1.1\r\nHost: proxy\r\n\r\n")
            got = await read_until(client, b"\r\n\r\n")
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            # The pump armed its scope at the start: deadline = start + idle. Half of idle
            # later a chunk moves the body (lazy: the deadline stays where it was).
            await trio.sleep(idle / 2)
            step.set()
            want = (
                200 if framing == "length" else len(chunk(payload[:100]) + chunk(payload[100:200]))
            )
            while len(body) < want:
                body += await client.receive_some(65536)
            # The upstream sends the rest; the run loop stalls past the stale deadline
            # (start + idle) but well within idle of the last chunk.
            pushed[0] = push(up_stream[0], rest)
            stall_run_loop(idle * 0.65)
            big.set()
            # A slow but alive reader: reads everything, steadily.
            total = len(body)
            end = size if framing == "length" else None
            while True:
                data = await client.receive_some(65536)
                if not data:
                    break
                body += data
                if end is not None and len(body) >= end:
                    break
                if end is None and body.endswith(b"0\r\n\r\n"):
                    break
            assert len(body) > total
            if framing == "length":
                assert len(body) == size, f"cut after {len(body)} of {size} body bytes"
            else:
                assert body.endswith(b"0\r\n\r\n"), f"cut after {len(body)} body bytes"
            (line,) = await wait_lines(caplog, 1)
            assert line["outcome"] == "complete", line
            await client.aclose()
            nursery.cancel_scope.cancel()


# -- held streams: the process's downstream watch (probes) -------------------------------

SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENT: Final = b"data: one\n\n"


class Held(CountedUpstream):
    """Upstream connections that answer a slow SSE stream (after ``delay``) and hold it
    until the proxy closes them; ``closed`` counts the connections the proxy closed."""

    def __init__(self, delay: float = 0.0, status: bytes = b"200 OK") -> None:
        super().__init__()
        self.delay = delay
        self.status = status

    async def serve(self, stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        if self.status != b"200 OK":
            await stream.send_all(b"HTTP/1.1 %s\r\nContent-Length: 0\r\n\r\n" % self.status)
        else:
            await trio.sleep(self.delay)
            await stream.send_all(SSE_HEAD + chunk(EVENT))
        while await stream.receive_some(1024):
            pass  # drain until the proxy closes the connection


def rst(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("how", ["close", "reset", "half-close"])
async def test_probe_client_gone_mid_stream_every_way(
    caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.access")
    up = Held()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, up.handler)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            client = track(await trio.open_tcp_stream(host, pport))
            await client.send_all(b"GET /s HTTP/1.1\r\nHost: p\r\n\r\n")
            await read_until(client, EVENT)
            if how == "reset":
                rst(client)
                await client.aclose()
            elif how == "close":
                await client.aclose()
            else:
                await client.send_eof()
            await up.until(closed=1)
            (line,) = await wait_lines(caplog, 1)
            assert (line["status"], line["outcome"]) == (200, "client_gone")
            assert len(downstream_watch()) == 0
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_probe_retry_then_slow_stream_client_gone(caplog: pytest.LogCaptureFixture) -> None:
    """A 503 retried on another upstream whose head is slow (the no-nursery path twice):
    the client closing is still seen, and every upstream connection is closed."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    bad, good = Held(status=b"503 Service Unavailable"), Held(delay=0.05)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            p1 = await start_raw_server(nursery, bad.handler)
            p2 = await start_raw_server(nursery, good.handler)
            route = Route(
                prefix="/",
                upstreams=(
                    UpstreamEntry(url=f"http://127.0.0.1:{p1}/", weight=1000),
                    UpstreamEntry(url=f"http://127.0.0.1:{p2}/", weight=1),
                ),
                balance="round_robin",
                retry=RetryPolicy(attempts=2, on=("503",), budget_percent=100),
            )
            host, pport = await start_proxy(nursery, [route])
            client = track(await trio.open_tcp_stream(host, pport))
            await client.send_all(b"GET /s HTTP/1.1\r\nHost: p\r\n\r\n")
            got = await read_until(client, EVENT)
            assert got.startswith(b"HTTP/1.1 200 ")
            assert (bad.opened, good.opened) == (1, 1)  # the 503 was retried
            await client.aclose()
            await good.until(closed=1)
            (line,) = await wait_lines(caplog, 1)
            assert line["outcome"] == "client_gone"
            assert len(downstream_watch()) == 0
            nursery.cancel_scope.cancel()


async def test_probe_pipelined_during_slow_head_no_desync(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The next request pipelined while the first waits for a slow head (watched): both
    answered in order on one connection, the upstream connection reused in step."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    seen: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            target = head.split(b" ")[1]
            seen.append(target)
            await trio.sleep(0.05)
            body = b"answer for " + target
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            client = track(await trio.open_tcp_stream(host, pport))
            await client.send_all(b"GET /one HTTP/1.1\r\nHost: p\r\n\r\n")
            await trio.sleep(0.02)  # the first waits for its head (watched after 5 ms)
            await client.send_all(b"GET /two HTTP/1.1\r\nHost: p\r\n\r\n")
            got = await read_until(client, b"answer for /two")
            assert got.index(b"answer for /one") < got.index(b"answer for /two")
            assert seen == [b"/one", b"/two"]
            lines = await wait_lines(caplog, 2)
            assert [line["outcome"] for line in lines] == ["complete", "complete"]
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_probe_watch_task_restarts_after_linger(caplog: pytest.LogCaptureFixture) -> None:
    """The watch's system task ends once nothing was watched for ``linger``; a stream held
    after that starts it again and a client closing is still seen."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    up = Held()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, up.handler)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            watch = downstream_watch()
            watch.linger = 0.05
            for n in (1, 2):
                client = track(await trio.open_tcp_stream(host, pport))
                await client.send_all(b"GET /s HTTP/1.1\r\nHost: p\r\n\r\n")
                await read_until(client, EVENT)
                assert len(watch) == 1
                await client.aclose()
                await up.until(closed=n)
                await wait_lines(caplog, n)
                while watch.running:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert watch.starts >= 2
            assert [line["outcome"] for line in access_lines(caplog)] == ["client_gone"] * 2
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "bad",
    [
        b"+5\r\nhello\r\n",
        b" 5\r\nhello\r\n",
        b"5 \r\nhello\r\n",
        b"0x5\r\nhello\r\n",
        b"5\nhello\r\n",
        b"5\r\nhellox\r\n",
        b"5\r\nhello\n",
        b"5_0\r\nhello\r\n",
        b"fffffffffffffffff\r\n",
        b"5;a\x00b\r\nhello\r\n",
        b"-5\r\nhello\r\n",
    ],
)
async def test_probe_malformed_upstream_chunks_are_refused(
    caplog: pytest.LogCaptureFixture, bad: bytes
) -> None:
    """Framing the old scanner and h11 refuse, in a read that starts with good whole
    chunks (the scanner's fast path) after a read of whole chunks: the good chunks go
    through, the client never sees a clean end, the access line names the upstream's
    protocol error."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    good = chunk(b"data: a\n\n") * 3

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await trio.sleep(0.01)
        await stream.send_all(good)  # whole chunks: the fast path, a read of their own
        await trio.sleep(0.01)
        await stream.send_all(good + bad + b"0\r\n\r\n")
        await stream.receive_some(10)

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            client = track(await trio.open_tcp_stream(host, pport))
            await client.send_all(b"GET /c HTTP/1.1\r\nHost: p\r\n\r\n")
            got = b""
            while data := await client.receive_some(65536):
                got += data
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert body.startswith(good)
            assert not body.endswith(b"0\r\n\r\n"), body
            (line,) = await wait_lines(caplog, 1)
            assert line["outcome"] == "upstream_protocol_error", line
            await client.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_probe_lazy_idle_silent_body_fails_late_enough_both_sides_closed(
    caplog: pytest.LogCaptureFixture, framing: str
) -> None:
    """A body that moves (well within ``idle``) then goes silent: it fails no earlier than
    ``idle`` after its last chunk (the stale lazy deadline only re-arms), as an upstream
    timeout, with the client cut (no clean end) and the upstream connection closed."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    idle = 0.6
    upstream_closed = trio.Event()
    last_chunk_at: list[float] = []

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        if framing == "length":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nab")
        else:
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"ab")
            )
        for _ in range(3):
            await trio.sleep(idle / 2)
            await stream.send_all(b"cd" if framing == "length" else chunk(b"cd"))
            last_chunk_at.append(trio.current_time())
        try:
            assert await stream.receive_some(10) == b""
        finally:
            upstream_closed.set()

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", timeouts=Timeouts(idle=idle)
            )
            client = track(await trio.open_tcp_stream(host, pport))
            await client.send_all(b"GET /s HTTP/1.1\r\nHost: p\r\n\r\n")
            got = b""
            while data := await client.receive_some(65536):
                got += data
            ended = trio.current_time()
            await upstream_closed.wait()
            # Nothing was cut while the body moved (counted in the body: the head's
            # random X-Request-ID can hold "cd").
            assert got.partition(b"\r\n\r\n")[2].count(b"cd") == 3
            assert not got.endswith(b"0\r\n\r\n")
            assert ended >= last_chunk_at[-1] + idle * 0.95
            (line,) = await wait_lines(caplog, 1)
            assert (line["status"], line["outcome"]) == (200, "upstream_timeout"), line
            nursery.cancel_scope.cancel()


class _FailingEpoll:
    """``select.epoll`` whose registrations fail (``epoll_ctl``: ENOSPC, the per-user
    ``max_user_watches`` reached) or that can't be made at all (EMFILE)."""

    real: Final = select.epoll

    def __init__(self, mode: str) -> None:
        if mode == "create":
            raise OSError(errno.EMFILE, "Too many open files")
        self._ep = self.real()

    def fileno(self) -> int:
        return self._ep.fileno()

    def register(self, fd: int, mask: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def modify(self, fd: int, mask: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def unregister(self, fd: int) -> None:
        self._ep.unregister(fd)

    def poll(self, timeout: float = -1) -> list[tuple[int, int]]:
        return self._ep.poll(timeout)

    def close(self) -> None:
        self._ep.close()


@pytest.mark.parametrize("mode", ["register", "create"])
async def test_a_watch_that_cannot_register_still_sees_the_client_go(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """When the process's watch can't take a client socket (``add`` False: epoll_ctl
    failed) the held stream must still be watched some other way ("the caller watches it
    some other way", net/watch.py), and a failure to make the epoll must not kill a good
    stream. Before 0b85bb7 a task per stream watched it (trio's own epoll)."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    monkeypatch.setattr(select, "epoll", lambda: _FailingEpoll(mode))
    up = Held()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, up.handler)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            client = track(await trio.open_tcp_stream(host, pport))
            await client.send_all(b"GET /s HTTP/1.1\r\nHost: p\r\n\r\n")
            got = await read_until(client, EVENT)
            assert got.startswith(b"HTTP/1.1 200 ")
            await trio.sleep(0.05)
            assert access_lines(caplog) == []  # the stream is still held, not cut
            await client.aclose()
            with trio.move_on_after(5.0):
                await up.until(closed=1)
            assert up.closed == 1, "the client went away; the upstream stream is still held"
            (line,) = await wait_lines(caplog, 1)
            assert line["outcome"] == "client_gone"
            nursery.cancel_scope.cancel()


async def test_a_request_arriving_as_the_keepalive_deadline_passes_is_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The next request on a keep-alive connection arrives just as ``keepalive_timeout``
    passes (the run loop was busy): the read woke with its bytes, so it must be answered
    (or the connection closed before anything is read), never read, forwarded and then
    dropped. The connection's one idle scope stays cancelled once its deadline passed,
    and the exchange runs inside it."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    hits: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            hits.append(head.split(b" ")[1])
            await trio.sleep(0.01)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    keepalive = 1.0
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", server={"keepalive_timeout": keepalive}
            )
            client = track(await trio.open_tcp_stream(host, pport))
            await client.send_all(b"GET /one HTTP/1.1\r\nHost: p\r\n\r\n")
            await read_until(client, b"ok")
            await wait_lines(caplog, 1)
            await trio.sleep(keepalive * 0.8)
            os.write(client.socket.fileno(), b"GET /two HTTP/1.1\r\nHost: p\r\n\r\n")
            stall_run_loop(keepalive * 0.5)  # the run loop stalls across the deadline
            got = b""
            while data := await client.receive_some(65536):
                got += data
                if got.endswith(b"ok"):
                    break
            if hits == [b"/one", b"/two"]:
                assert got.startswith(b"HTTP/1.1 200 "), "forwarded upstream, never answered"
            nursery.cancel_scope.cancel()


async def test_probe_fd_reuse_churn_held_streams(caplog: pytest.LogCaptureFixture) -> None:
    """Clients come and go while others are held (the closed ones' fd numbers go to the
    next ones): every close is seen once, no held stream is cut by another's event, and
    the pipelined/HTTP/1.0 variants behave as the rest."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    up = Held()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, up.handler)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            keep: list[trio.SocketStream] = []
            rounds = 30
            for n in range(rounds):
                client = track(await trio.open_tcp_stream(host, pport))
                version = b"1.0" if n % 3 == 0 else b"1.1"
                await client.send_all(b"GET /s HTTP/%s\r\nHost: p\r\n\r\n" % version)
                await read_until(client, EVENT)
                if n % 2:
                    keep.append(client)
                else:
                    await client.aclose()
                    await up.until(closed=n // 2 + 1)
            lines = await wait_lines(caplog, rounds // 2)
            assert [line["outcome"] for line in lines] == ["client_gone"] * (rounds // 2)
            assert len(downstream_watch()) == len(keep)
            for client in keep:
                await client.aclose()
            await up.until(closed=rounds)
            lines = await wait_lines(caplog, rounds)
            assert {line["outcome"] for line in lines} == {"client_gone"}
            assert len(downstream_watch()) == 0
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("sse_features", [False, True], ids=["pump", "sse-relay"])
async def test_probe_drain_with_held_streams(
    caplog: pytest.LogCaptureFixture, sse_features: bool
) -> None:
    """A graceful shutdown while streams are held (no nursery, the process's watch): it
    ends once the grace is over, every held client is cut (no clean end), every upstream
    connection closed, one access line each, and nothing is left in the watch."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    up = Held()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, up.handler)
            route = Route(
                prefix="/",
                upstream=f"http://127.0.0.1:{port}/",
                sse=SSESettings(heartbeat=60.0 if sse_features else 0.0),
            )
            config = Config(
                routes=(route,),
                server=ServerSettings(listen=("127.0.0.1:0",), shutdown_grace=0.3),
            )
            proxy = await start_server(nursery, Server(config))
            clients = []
            for _ in range(3):
                client = track(await trio.open_tcp_stream(proxy.host, proxy.port))
                await client.send_all(b"GET /s HTTP/1.1\r\nHost: p\r\n\r\n")
                await read_until(client, EVENT)
                clients.append(client)
            assert len(downstream_watch()) == 3
            proxy.server.shutdown()
            await proxy.stopped.wait()
            await up.until(closed=3)
            for client in clients:
                rest = b""
                while data := await client.receive_some(65536):
                    rest += data
                assert not rest.endswith(b"0\r\n\r\n")
            assert len(await wait_lines(caplog, 3)) == 3
            assert len(downstream_watch()) == 0
            nursery.cancel_scope.cancel()
