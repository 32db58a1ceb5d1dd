"""Streaming through the proxy: no buffering, backpressure, cancellation, truncation.

Upstreams are raw sockets (``start_raw_server``) wherever bytes or timing matter, so a
test controls exactly what is on the wire and when; hypercorn (``start_app``) serves
the ASGI apps. The client is a raw socket whose response is parsed by h11 (client
role), so a body cut short is told apart from a complete one.

"No buffering" is proven in lockstep wherever possible: the upstream sends the next
piece only after the test has read the previous one *through the proxy*, so a proxy
that held bytes back would deadlock the test (and trip ``fail_after``) instead of
merely being slower. No wall-clock speed is asserted.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Final

import h11
import pytest
import trio

from tests.apps import echo_app, make_sse_app, sse_event
from tests.helpers import read_until, start_app, start_proxy, start_raw_server

KiB: Final = 1024
MiB: Final = 1024 * KiB

SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
#: A response with neither Content-Length nor Transfer-Encoding: it ends when the upstream closes.
CLOSE_DELIMITED_HEAD: Final = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """``data`` framed as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def reset(stream: trio.SocketStream) -> None:
    """Make the next close of ``stream`` send a TCP RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def wait_eof(stream: trio.SocketStream) -> None:
    """Read (and drop) until the peer closes or resets the connection."""
    try:
        while await stream.receive_some(64 * KiB):
            pass
    except trio.BrokenResourceError:
        pass


class ProxyClient:
    """A raw client connection; h11 (client role) writes the request and parses the response."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.body = bytearray()
        #: The proxy closed (or reset) the connection.
        self.eof = False

    async def send(self, *events: h11.Event) -> None:
        data = b"".join(self.h11.send(event) or b"" for event in events)
        await self.stream.send_all(data)

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        *,
        end: bool = True,
    ) -> None:
        """Send a request head (and, with ``end``, the end of a body-less message)."""
        request = h11.Request(method=method, target=target, headers=[(b"host", b"proxy"), *headers])
        await self.send(request, *([h11.EndOfMessage()] if end else []))

    async def _event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type), f"unexpected h11 sentinel {event!r}"
                return event
            try:
                data = await self.stream.receive_some(64 * KiB)
            except trio.BrokenResourceError:
                data = b""
            self.eof = not data
            self.h11.receive_data(data)

    async def head(self) -> h11.Response:
        """The final response head (1xx are skipped)."""
        while True:
            event = await self._event()
            if isinstance(event, h11.Response):
                return event
            assert isinstance(event, h11.InformationalResponse), f"expected a head, got {event!r}"

    async def body_at_least(self, size: int) -> bytes:
        """Read body data until ``size`` bytes in total have arrived; return them all."""
        while len(self.body) < size:
            event = await self._event()
            assert isinstance(event, h11.Data), f"expected body data, got {event!r}"
            self.body += event.data
        return bytes(self.body)

    async def read_to_end(self) -> bool:
        """Read the rest of the response.

        True if it ended cleanly (``EndOfMessage``); False if the proxy closed the
        connection before the body's end (for a chunked body: no ``0\\r\\n\\r\\n``).
        """
        while True:
            try:
                event = await self._event()
            except h11.RemoteProtocolError:
                if self.eof:
                    return False  # h11: "peer closed connection without sending complete..."
                raise
            if isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                raise AssertionError(f"unexpected {event!r}")


@asynccontextmanager
async def open_client(host: str, port: int) -> AsyncIterator[ProxyClient]:
    """A :class:`ProxyClient` connected to ``host:port``, closed on exit."""
    async with await trio.open_tcp_stream(host, port) as stream:
        yield ProxyClient(stream)


def header(response: h11.Response, name: bytes) -> bytes | None:
    values = [v for n, v in response.headers if n == name]
    return values[0] if values else None


# --------------------------------------------------------------------------- SSE, no batching


async def test_sse_events_are_relayed_one_at_a_time_in_lockstep() -> None:
    """Each event reaches the client before the upstream has even produced the next one."""
    events = [sse_event(n) for n in range(10)]
    go_send, go_recv = trio.open_memory_channel[None](0)

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD)
        for event in events:
            await go_recv.receive()  # the test got everything sent so far through the proxy
            await stream.send_all(chunk(event))
        await go_recv.receive()
        await stream.send_all(LAST_CHUNK)
        await wait_eof(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            async with open_client(host, pport) as client:
                await client.request(b"GET", b"/events")
                # The head is relayed on its own, before any body byte exists.
                response = await client.head()
                assert response.status_code == 200
                assert header(response, b"content-type") == b"text/event-stream"
                for n in range(len(events)):
                    await go_send.send(None)
                    expected = b"".join(events[: n + 1])
                    assert await client.body_at_least(len(expected)) == expected
                await go_send.send(None)
                assert await client.read_to_end()
                assert bytes(client.body) == b"".join(events)
            nursery.cancel_scope.cancel()


async def test_sse_event_arrivals_are_spread_like_emissions() -> None:
    """hypercorn emits 10 events 50 ms apart; they arrive spread out, not in one batch."""
    count, interval = 10, 0.05
    events = [sse_event(n) for n in range(count)]
    arrivals: list[float] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, make_sse_app(count, interval))
            host, port = await start_proxy(nursery, f"http://{up_host}:{up_port}/")
            async with open_client(host, port) as client:
                await client.request(b"GET", b"/sse")
                assert (await client.head()).status_code == 200
                for n in range(count):
                    await client.body_at_least(sum(len(e) for e in events[: n + 1]))
                    arrivals.append(trio.current_time())
                assert await client.read_to_end()
            nursery.cancel_scope.cancel()
    assert bytes(client.body) == b"".join(events)
    # A lower bound only (a slow machine makes the spread larger, never smaller): a
    # proxy that batched the stream would deliver the events nearly at once.
    assert arrivals[-1] - arrivals[0] >= 0.5 * (count - 1) * interval


# --------------------------------------------------------------------------- backpressure


def _tcp_max(name: str) -> int:
    """The kernel's largest autotuned TCP buffer (``net.ipv4.<name>``), or 6 MiB."""
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 6 * MiB


async def test_slow_reader_throttles_upstream_and_memory_stays_bounded() -> None:
    """256 MiB pushed as fast as possible to a client that pauses and reads slowly.

    Everything runs in this process, so tracemalloc sees every Python allocation of
    the proxy (and of the test's upstream and client). All 256 MiB are streamed: it
    takes a few seconds here.
    """
    total = 256 * MiB
    block_size = 64 * KiB
    slow_part = 8 * MiB
    # Kernel socket buffers (upstream send, proxy receive and send, client receive) hold
    # what the proxy has not forwarded yet: ~4 MiB measured on loopback when idle, but
    # autotuning may grow each to the kernel's maximum under load (22 MiB seen once with
    # a busy core). The bound is those four maxima plus 4 MiB; a proxy that buffered
    # would let ~256 MiB through.
    in_flight_bound = 2 * (_tcp_max("tcp_rmem") + _tcp_max("tcp_wmem")) + 4 * MiB
    # Peak growth of traced allocations while streaming: ~1 MiB measured (the proxy's
    # 4 KiB buffers, the test's 64 KiB blocks and reads, trio bookkeeping). 8 MiB is
    # generous and still 32x below the body size a buffering proxy would hold.
    memory_bound = 8 * MiB

    sent = 0
    sent_digest = hashlib.sha256()

    async def upstream(stream: trio.SocketStream) -> None:
        nonlocal sent
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for i in range(total // block_size):
            block = i.to_bytes(8, "big") * (block_size // 8)
            sent_digest.update(block)
            await stream.send_all(block)
            sent += len(block)
        await wait_eof(stream)

    async def plateau() -> int:
        """Wait until ``sent`` has not moved for 3 samples 0.2 s apart; return it."""
        last, still = -1, 0
        while still < 3:
            await trio.sleep(0.2)
            still = still + 1 if sent == last else 0
            last = sent
        return last

    received = 0
    received_digest = hashlib.sha256()
    tracemalloc.start()
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                port = await start_raw_server(nursery, upstream)
                host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
                async with await trio.open_tcp_stream(host, pport) as client:
                    baseline = tracemalloc.get_traced_memory()[0]
                    tracemalloc.reset_peak()
                    await client.send_all(b"GET /huge HTTP/1.1\r\nHost: proxy\r\n\r\n")
                    data = await read_until(client, b"\r\n\r\n")
                    head, _, start = data.partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200 ")
                    assert b"content-length: %d" % total in head.lower()
                    received = len(start)
                    received_digest.update(start)

                    # 1. Paused (not reading at all): the upstream is soon stopped by TCP.
                    paused_at = await plateau()
                    assert paused_at - received < in_flight_bound

                    # 2. Slow reads of 4 KiB: the upstream only runs ahead by the buffers.
                    max_ahead = 0
                    while received < slow_part:
                        data = await client.receive_some(4 * KiB)
                        assert data
                        received += len(data)
                        received_digest.update(data)
                        max_ahead = max(max_ahead, sent - received)
                        if received % (64 * KiB) < len(data):
                            await trio.sleep(0.002)
                    assert max_ahead < in_flight_bound

                    # 3. Paused again after the slow phase.
                    paused_at = await plateau()
                    assert paused_at - received < in_flight_bound

                    # 4. The rest, fast: the whole body arrives intact.
                    while received < total:
                        data = await client.receive_some(64 * KiB)
                        assert data
                        received += len(data)
                        received_digest.update(data)
                    peak = tracemalloc.get_traced_memory()[1]
                nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    assert received == sent == total
    assert received_digest.digest() == sent_digest.digest()
    assert peak - baseline < memory_bound, (
        f"traced memory grew by {(peak - baseline) / MiB:.1f} MiB"
    )


# --------------------------------------------------------------------------- client goes away


async def test_client_disconnect_mid_stream_closes_idle_upstream() -> None:
    """The client leaves after one event while the upstream is silent (not writing)."""
    upstream_closed = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(sse_event(0)))
        await wait_eof(stream)  # idle: would stream "forever", never writes again
        upstream_closed.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            async with open_client(host, pport) as client:
                await client.request(b"GET", b"/events")
                assert (await client.head()).status_code == 200
                assert await client.body_at_least(len(sse_event(0))) == sse_event(0)
                await client.stream.aclose()
                with trio.fail_after(3):
                    await upstream_closed.wait()
            nursery.cancel_scope.cancel()


async def test_client_disconnect_before_response_head_closes_upstream() -> None:
    """The client leaves while the proxy is still waiting for a slow response head."""
    got_request = trio.Event()
    upstream_closed = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        got_request.set()
        await wait_eof(stream)  # a slow head: never answers
        upstream_closed.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            async with open_client(host, pport) as client:
                await client.request(b"GET", b"/slow")
                await got_request.wait()
                await client.stream.aclose()
                with trio.fail_after(3):
                    await upstream_closed.wait()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- request bodies


async def test_chunked_upload_is_streamed_not_buffered() -> None:
    """Each uploaded piece comes back from the echo upstream before the next is sent."""
    pieces = [b"piece %d|" % i * (i + 1) for i in range(6)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            host, port = await start_proxy(nursery, f"http://{up_host}:{up_port}/")
            async with open_client(host, port) as client:
                headers = [(b"transfer-encoding", b"chunked"), (b"x-echo-stream-body", b"1")]
                await client.request(b"POST", b"/upload", headers, end=False)
                sent = b""
                for i, piece in enumerate(pieces):
                    await client.send(h11.Data(data=piece))
                    sent += piece
                    if i == 0:
                        response = await client.head()
                        assert response.status_code == 200
                    # The upload is not finished, yet the piece made the round trip.
                    assert await client.body_at_least(len(sent)) == sent
                await client.send(h11.EndOfMessage())
                assert await client.read_to_end()
                assert bytes(client.body) == b"".join(pieces)
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- upstream fails


@pytest.mark.parametrize(
    ("head", "framed", "how"),
    [
        pytest.param(SSE_HEAD, True, "fin", id="chunked-fin"),
        pytest.param(SSE_HEAD, True, "rst", id="chunked-rst"),
        pytest.param(CLOSE_DELIMITED_HEAD, False, "rst", id="close-delimited-rst"),
    ],
)
async def test_upstream_failure_mid_stream_cuts_client_without_clean_end(
    head: bytes, framed: bool, how: str
) -> None:
    """The client gets the events sent so far, then a close with no ``0\\r\\n\\r\\n``.

    A FIN ends a close-delimited body cleanly, so for that framing only a reset is a
    failure; a chunked body is unfinished either way.
    """
    events = [sse_event(n) for n in range(3)]
    got_events = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(head + b"".join(chunk(e) if framed else e for e in events))
        await got_events.wait()  # the client has the events: nothing is lost in flight
        if how == "rst":
            reset(stream)
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            async with open_client(host, pport) as client:
                await client.request(b"GET", b"/events")
                response = await client.head()
                assert response.status_code == 200
                assert header(response, b"transfer-encoding") == b"chunked"
                expected = b"".join(events)
                assert await client.body_at_least(len(expected)) == expected
                got_events.set()
                assert not await client.read_to_end(), "a failed stream was passed off as complete"
                assert bytes(client.body) == expected
            nursery.cancel_scope.cancel()
