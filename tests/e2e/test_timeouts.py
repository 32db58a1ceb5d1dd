"""Every proxy timeout, end to end on real sockets and the real clock.

Not on ``autojump_clock``: trio's MockClock docs warn that autojump with real I/O in
flight jumps early, and it did (a loaded CI machine defers loopback delivery, so every
task can be blocked while a byte is still on its way, and the clock jumps to the next
timeout). So each timeout is scaled down to tenths of a second, and elapsed times are
asserted only from below, measured from a point before the proxy's timer started (a
timer never fires early). "Not before X" properties that need an upper bound are
checked causally instead: the upstream or client does something at a later time that
would change the outcome if the timer had not fired (see
``test_header_timeout_counts_from_the_connection_start``). Exact expiry times of the
body pumps are asserted on the mock clock over scripted streams in
``tests/inmem/test_pipes.py``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Final

import h11
import trio

from proxycore import ServerSettings, Timeouts
from tests.apps import sse_event
from tests.helpers import read_http_response, read_until, start_proxy, start_raw_server

MINUTE: Final = 60.0
HOUR: Final = 3600.0
#: Outer cap for every test (real time).
CAP: Final = 10.0
#: The timeouts under test, scaled down (real seconds).
IDLE: Final = 0.5
SHORT: Final = 0.3
#: An upstream URL that is never contacted (tests of the client side).
UNUSED_UPSTREAM: Final = "http://127.0.0.1:9/"

SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK: Final = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """``data`` framed as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


async def wait_eof(stream: trio.SocketStream) -> bytes:
    """Read until the peer closes or resets the connection; return what was read."""
    got = bytearray()
    try:
        while data := await stream.receive_some(65536):
            got += data
    except trio.BrokenResourceError:
        pass
    return bytes(got)


class ProxyClient:
    """A raw client connection; h11 (client role) writes requests and parses responses."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.body = bytearray()
        #: The proxy closed (or reset) the connection.
        self.eof = False

    async def request(
        self, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        request = h11.Request(method=method, target=target, headers=[(b"host", b"proxy"), *headers])
        data = (self.h11.send(request) or b"") + (self.h11.send(h11.EndOfMessage()) or b"")
        await self.stream.send_all(data)

    async def _event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type), f"unexpected h11 sentinel {event!r}"
                return event
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.eof = not data
            self.h11.receive_data(data)

    async def head(self) -> h11.Response:
        while True:
            event = await self._event()
            if isinstance(event, h11.Response):
                return event
            assert isinstance(event, h11.InformationalResponse), f"expected a head, got {event!r}"

    async def body_at_least(self, size: int) -> bytes:
        while len(self.body) < size:
            event = await self._event()
            assert isinstance(event, h11.Data), f"expected body data, got {event!r}"
            self.body += event.data
        return bytes(self.body)

    async def read_to_end(self) -> bool:
        """Read the rest of the response: True on a clean end, False if cut by a close."""
        while True:
            try:
                event = await self._event()
            except h11.RemoteProtocolError:
                if self.eof:
                    return False
                raise
            if isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                raise AssertionError(f"unexpected {event!r}")

    def next_cycle(self) -> None:
        """Reuse the connection for another request (after a complete exchange)."""
        self.h11.start_next_cycle()
        self.body.clear()


@asynccontextmanager
async def open_client(host: str, port: int) -> AsyncIterator[ProxyClient]:
    """A :class:`ProxyClient` connected to ``host:port``, closed on exit."""
    async with await trio.open_tcp_stream(host, port) as stream:
        yield ProxyClient(stream)


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    values = [v for n, v in headers if n.lower() == name]
    return values[0] if values else None


async def closed_within(event: trio.Event, seconds: float = 5.0) -> None:
    """Wait (bounded) for the upstream to see its connection closed."""
    with trio.move_on_after(seconds):
        await event.wait()
    assert event.is_set(), "the upstream connection was not closed"


def error_type(body: bytes) -> str:
    """The ``type`` of a proxy-made JSON error body."""
    error = json.loads(body)["error"]
    assert set(error) == {"type", "message", "request_id"}
    kind = error["type"]
    assert isinstance(kind, str)
    return kind


# --------------------------------------------------------------------------- idle


def test_default_timeouts() -> None:
    """The defaults the tests below scale down: idle and response an hour, no total, and
    75 s keep-alive / 30 s header timeouts on the client side."""
    assert (Timeouts().idle, Timeouts().response, Timeouts().total) == (HOUR, HOUR, 0.0)
    settings = ServerSettings()
    assert (settings.keepalive_timeout, settings.header_timeout) == (75.0, 30.0)


async def test_silences_shorter_than_idle_survive() -> None:
    """Two silences of half the idle timeout: the stream survives although it lasts longer
    than ``idle`` (idle is per gap, not per stream)."""
    idle = 1.0
    events = [sse_event(n) for n in range(3)]

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(events[0]))
        for event in events[1:]:
            await trio.sleep(idle / 2)
            await stream.send_all(chunk(event))
        await stream.send_all(LAST_CHUNK)
        await wait_eof(stream)

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", timeouts=Timeouts(idle=idle)
            )
            async with open_client(host, pport) as client:
                start = trio.current_time()
                await client.request(b"GET", b"/events")
                assert (await client.head()).status_code == 200
                assert await client.body_at_least(len(events[0])) == events[0]
                assert await client.read_to_end()
                ended = trio.current_time() - start
                assert bytes(client.body) == b"".join(events)
                assert ended >= idle  # longer than idle in all, and not cut
            nursery.cancel_scope.cancel()


async def test_stream_silent_past_idle_is_cut_at_idle() -> None:
    """A silence longer than ``idle``: cut (no clean end), upstream connection closed."""
    first, second = sse_event(1), sse_event(2)
    upstream_closed = trio.Event()
    upstream_closed_at: list[float] = []

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(first))
        with trio.move_on_after(4 * IDLE):
            await wait_eof(stream)
            upstream_closed_at.append(trio.current_time())
            upstream_closed.set()
            return
        await stream.send_all(chunk(second) + LAST_CHUNK)  # a proxy that didn't cut gets this

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", timeouts=Timeouts(idle=IDLE)
            )
            async with open_client(host, pport) as client:
                start = trio.current_time()
                await client.request(b"GET", b"/events")
                assert (await client.head()).status_code == 200
                assert await client.body_at_least(len(first)) == first
                assert not await client.read_to_end(), "the cut stream was passed off as complete"
                cut = trio.current_time() - start
                assert bytes(client.body) == first
                assert cut >= IDLE
                await closed_within(upstream_closed)
                assert upstream_closed_at[0] - start >= IDLE
            nursery.cancel_scope.cancel()


async def test_stalled_request_body_times_out_with_408_and_closes_upstream() -> None:
    """``client_body`` bounds the request body: half a body, then silence past it."""
    upstream_body = bytearray()
    upstream_closed = trio.Event()
    upstream_closed_at: list[float] = []

    async def upstream(stream: trio.SocketStream) -> None:
        data = await read_until(stream, b"\r\n\r\n")
        upstream_body.extend(data.partition(b"\r\n\r\n")[2])
        upstream_body.extend(await wait_eof(stream))  # never answers
        upstream_closed_at.append(trio.current_time())
        upstream_closed.set()

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", timeouts=Timeouts(client_body=IDLE)
            )
            async with await trio.open_tcp_stream(host, pport) as client:
                start = trio.current_time()
                await client.send_all(
                    b"POST /upload HTTP/1.1\r\nHost: proxy\r\nContent-Length: 100\r\n\r\n"
                    + b"a" * 50
                )
                status, headers, body = await read_http_response(client, b"POST")
                answered = trio.current_time() - start
                assert status == 408
                assert error_type(body) == "request_timeout"
                assert header(headers, b"connection") == b"close"
                assert answered >= IDLE
                assert await wait_eof(client) == b""
                await closed_within(upstream_closed)
                assert upstream_closed_at[0] - start >= IDLE
                # The half body was streamed upstream at once, not held back.
                assert bytes(upstream_body) == b"a" * 50
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- response, total


async def test_response_timeout_gives_504() -> None:
    """The upstream takes the request and never answers: 504 JSON at ``response``."""
    upstream_closed = trio.Event()
    upstream_closed_at: list[float] = []

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await wait_eof(stream)  # accepts, reads the request, never answers
        upstream_closed_at.append(trio.current_time())
        upstream_closed.set()

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", timeouts=Timeouts(response=SHORT)
            )
            async with await trio.open_tcp_stream(host, pport) as client:
                start = trio.current_time()
                await client.send_all(b"GET /slow HTTP/1.1\r\nHost: proxy\r\n\r\n")
                status, headers, body = await read_http_response(client)
                answered = trio.current_time() - start
                assert status == 504
                assert header(headers, b"content-type") == b"application/json"
                assert error_type(body) == "upstream_timeout"
                assert answered >= SHORT
                await closed_within(upstream_closed)
                assert upstream_closed_at[0] - start >= SHORT
            nursery.cancel_scope.cancel()


async def test_total_timeout_cuts_a_stream_that_never_goes_idle() -> None:
    """An event every tenth of ``total`` forever (never idle, default idle of an hour):
    ``total`` cuts it, after the events sent so far, and closes the upstream."""
    total = 0.5
    upstream_closed = trio.Event()
    upstream_closed_at: list[float] = []

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD)
        async with trio.open_nursery() as nursery:

            async def emit() -> None:
                n = 0
                while True:
                    await stream.send_all(chunk(sse_event(n)))
                    n += 1
                    await trio.sleep(total / 10)

            nursery.start_soon(emit)
            await wait_eof(stream)
            upstream_closed_at.append(trio.current_time())
            upstream_closed.set()
            nursery.cancel_scope.cancel()

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", timeouts=Timeouts(total=total)
            )
            async with open_client(host, pport) as client:
                start = trio.current_time()
                await client.request(b"GET", b"/events")
                assert (await client.head()).status_code == 200
                assert not await client.read_to_end(), "the cut stream was passed off as complete"
                cut = trio.current_time() - start
                assert cut >= total
                sent = bytes(client.body).count(b"\n\n")
                assert sent >= 1
                assert bytes(client.body) == b"".join(sse_event(n) for n in range(sent))
                await closed_within(upstream_closed)
                assert upstream_closed_at[0] - start >= total
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- connect


def _unanswered_port() -> tuple[socket.socket, socket.socket]:
    """A listening port whose accept queue is full, so new SYNs are dropped.

    On Linux ``listen(0)`` queues one connection; with it connected and never accepted,
    further connection attempts hang (the kernel drops their SYNs). Returns the
    listener and the filler connection (close both when done).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    filler = socket.create_connection(address, timeout=5)
    # Check the premise: a new connection attempt gets no answer.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect_ex(address)
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            err = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert err == 0, f"premise: connect failed with errno {err} instead of hanging"
            try:
                probe.getpeername()
            except OSError:
                continue
            raise AssertionError("premise: a connect to a full accept queue completed")
    finally:
        probe.close()
    return listener, filler


async def test_connect_timeout_gives_502() -> None:
    listener, filler = _unanswered_port()
    port = listener.getsockname()[1]
    try:
        with trio.fail_after(CAP):
            async with trio.open_nursery() as nursery:
                host, pport = await start_proxy(
                    nursery, f"http://127.0.0.1:{port}/", timeouts=Timeouts(connect=SHORT)
                )
                async with await trio.open_tcp_stream(host, pport) as client:
                    start = trio.current_time()
                    await client.send_all(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
                    status, _, body = await read_http_response(client)
                    answered = trio.current_time() - start
                    assert status == 502
                    assert error_type(body) == "upstream_unreachable"
                    assert answered >= SHORT
                nursery.cancel_scope.cancel()
    finally:
        filler.close()
        listener.close()


# --------------------------------------------------------------------------- client side


async def test_partial_request_head_gets_408_after_header_timeout() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            host, port = await start_proxy(
                nursery, UNUSED_UPSTREAM, server={"header_timeout": SHORT}
            )
            async with await trio.open_tcp_stream(host, port) as client:
                start = trio.current_time()
                await client.send_all(b"GET /slowloris HTTP/1.1\r\nHost: proxy\r\n")
                status, headers, body = await read_http_response(client)
                answered = trio.current_time() - start
                assert status == 408
                assert error_type(body) == "request_timeout"
                assert header(headers, b"connection") == b"close"
                assert answered >= SHORT
                assert await wait_eof(client) == b""
            nursery.cancel_scope.cancel()


async def test_header_timeout_counts_from_the_connection_start() -> None:
    """``header_timeout`` bounds the whole head: a late first byte doesn't restart the clock.

    The first bytes come at 0.6 of the timeout and the head would be complete at 1.4 of
    it: a proxy that restarted the clock at the first byte would get the whole head
    (and answer 502, the upstream is unused) instead of the 408.
    """
    timeout = 1.0
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            host, port = await start_proxy(
                nursery, UNUSED_UPSTREAM, server={"header_timeout": timeout}
            )
            async with await trio.open_tcp_stream(host, port) as client:
                start = trio.current_time()

                async def finish_head_late() -> None:
                    await trio.sleep_until(start + 1.4 * timeout)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await client.send_all(b"\r\n")

                await trio.sleep(0.6 * timeout)
                await client.send_all(b"GET /slowloris HTTP/1.1\r\nHost: proxy\r\n")
                nursery.start_soon(finish_head_late)
                status, _, body = await read_http_response(client)
                answered = trio.current_time() - start
                assert status == 408, f"{status} after {answered:g} s, header_timeout is 1 s"
                assert error_type(body) == "request_timeout"
                assert answered >= timeout
            nursery.cancel_scope.cancel()


async def test_silent_new_connection_is_closed_quietly_after_header_timeout() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            host, port = await start_proxy(
                nursery, UNUSED_UPSTREAM, server={"header_timeout": SHORT}
            )
            # Timed from before the connect: the proxy's clock starts at its accept, which
            # may come before open_tcp_stream returns here.
            start = trio.current_time()
            async with await trio.open_tcp_stream(host, port) as client:
                assert await wait_eof(client) == b"", "expected a quiet close, without a response"
                closed = trio.current_time() - start
                assert closed >= SHORT
            nursery.cancel_scope.cancel()


async def test_idle_keepalive_connection_is_closed_after_keepalive_timeout() -> None:
    """``keepalive_timeout``: still usable after half of it, closed once it passed."""
    keepalive = 1.0

    async def upstream(stream: trio.SocketStream) -> None:
        while True:
            try:
                await read_until(stream, b"\r\n\r\n")
            except EOFError:
                return
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", server={"keepalive_timeout": keepalive}
            )
            async with open_client(host, pport) as client:

                async def ping() -> None:
                    await client.request(b"GET", b"/ping")
                    assert (await client.head()).status_code == 200
                    assert await client.read_to_end()
                    assert bytes(client.body) == b"ok"

                await ping()
                await trio.sleep(keepalive / 2)
                client.next_cycle()
                idle_from = trio.current_time()  # before the proxy's timer restarts
                await ping()  # still open: the second request works
                assert await wait_eof(client.stream) == b"", "expected a quiet close"
                closed = trio.current_time() - idle_from
                assert closed >= keepalive
            nursery.cancel_scope.cancel()
