"""A held stream whose client goes away, on real sockets (127.0.0.1, port 0, real clock).

The native front end watches a client whose request is complete through the process's
downstream watch (``proxycore/net/watch.py``), not a task per stream. These tests hold
streams open through the proxy and check, end to end, that:

- a client that closes mid-stream cancels the exchange: the upstream connection is
  closed and the access line says ``client_gone`` (status 200: the head went out);
- so does a client that closes while the response head is still slow to come (the
  slow-head watcher registers it after 5 ms);
- a client that pipelines its next request mid-stream is not gone: the stream runs to
  its end, then the next request is answered on the same connection;
- many held streams at once: each close is seen, nothing else is cut;
- with the route's SSE features on (the SSE relay) the same holds.

No wall-clock upper bounds: a generous ``fail_after`` cap only turns a hang into a failure.
"""

from __future__ import annotations

import json
import logging
from typing import Final

import pytest
import trio

from proxycore import Route
from proxycore.config import SSESettings
from proxycore.net.watch import downstream_watch
from tests.helpers import CountedUpstream, read_until, start_proxy, start_raw_server

CAP: Final = 20.0
SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENT: Final = b"data: one\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class HeldUpstream(CountedUpstream):
    """An upstream that sends an event-stream head and one event, then holds the stream
    until ``release`` (then one more event and the end) or until the proxy closes it."""

    def __init__(self, head_delay: float = 0.0) -> None:
        super().__init__()
        self.head_delay = head_delay
        self.release = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        if self.head_delay:
            with trio.move_on_after(self.head_delay):
                await stream.receive_some(1024)  # b"": the proxy closed it
                return
        await stream.send_all(SSE_HEAD + chunk(EVENT))
        async with trio.open_nursery() as nursery:

            async def finish() -> None:
                await self.release.wait()
                await stream.send_all(chunk(b"data: two\n\n") + b"0\r\n\r\n")

            nursery.start_soon(finish)
            # The proxy sends nothing more on this connection: a read ends at its close.
            await stream.receive_some(1024)
            nursery.cancel_scope.cancel()


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]


async def open_stream(host: str, port: int) -> trio.SocketStream:
    client = await trio.open_tcp_stream(host, port)
    await client.send_all(
        b"GET /events HTTP/1.1\r\nHost: proxy\r\nAccept: text/event-stream\r\n\r\n"
    )
    got = await read_until(client, EVENT)
    assert got.startswith(b"HTTP/1.1 200 ")
    return client


async def wait_lines(caplog: pytest.LogCaptureFixture, n: int) -> list[dict[str, object]]:
    while len(lines := access_lines(caplog)) < n:  # noqa: ASYNC110
        await trio.sleep(0.01)
    return lines


@pytest.mark.parametrize("sse_features", [False, True], ids=["pump", "sse-relay"])
async def test_a_held_stream_whose_client_closes_is_cancelled(
    caplog: pytest.LogCaptureFixture, sse_features: bool
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.access")
    upstream = HeldUpstream()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream.handler)
            route = Route(
                prefix="/",
                upstream=f"http://127.0.0.1:{port}/",
                sse=SSESettings(heartbeat=60.0 if sse_features else 0.0),
            )
            host, pport = await start_proxy(nursery, [route])
            client = await open_stream(host, pport)
            watch = downstream_watch()
            assert len(watch) == 1  # held through the process's watch, no task of its own
            await client.aclose()
            await upstream.until(closed=1)  # the proxy closed the upstream connection
            (line,) = await wait_lines(caplog, 1)
            assert (line["status"], line["outcome"]) == (200, "client_gone")
            assert len(watch) == 0
            nursery.cancel_scope.cancel()


async def test_a_client_gone_while_the_head_is_slow(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.access")
    upstream = HeldUpstream(head_delay=CAP)  # never answers in time
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream.handler)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            client = await trio.open_tcp_stream(host, pport)
            await client.send_all(b"GET /slow HTTP/1.1\r\nHost: proxy\r\n\r\n")
            await upstream.until(opened=1)
            watch = downstream_watch()
            while not len(watch):  # noqa: ASYNC110  (the slow-head watcher registers it)
                await trio.sleep(0.005)
            await client.aclose()
            await upstream.until(closed=1)
            (line,) = await wait_lines(caplog, 1)
            assert line["outcome"] == "client_gone"
            assert line["status"] == 499
            nursery.cancel_scope.cancel()


async def test_a_pipelined_request_mid_stream_is_not_a_client_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.access")
    upstream = HeldUpstream()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream.handler)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            client = await open_stream(host, pport)
            watch = downstream_watch()
            assert len(watch) == 1
            await client.send_all(b"GET /next HTTP/1.1\r\nHost: proxy\r\n\r\n")
            while len(watch):  # noqa: ASYNC110  (the bytes end the watch, nothing else)
                await trio.sleep(0.005)
            assert access_lines(caplog) == []  # the stream goes on
            upstream.release.set()
            got = await read_until(client, b"0\r\n\r\n")
            assert b"data: two" in got
            # The pipelined request is answered next, on the same connection (its upstream
            # stream was released already: it ends at once).
            (first,) = await wait_lines(caplog, 1)
            assert (first["status"], first["outcome"]) == (200, "complete")
            if got.count(b"0\r\n\r\n") < 2:
                got += await read_until(client, b"data: two\n\n\r\n0\r\n\r\n")
            assert got.count(b"HTTP/1.1 200 ") == 1  # the first head was read before
            lines = await wait_lines(caplog, 2)
            assert lines[1]["outcome"] == "complete"
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_many_held_streams_each_close_is_seen(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.access")
    upstream = HeldUpstream()
    n = 40
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream.handler)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            clients = [await open_stream(host, pport) for _ in range(n)]
            watch = downstream_watch()
            assert len(watch) == n
            for client in clients[: n // 2]:
                await client.aclose()
            await upstream.until(closed=n // 2)
            lines = await wait_lines(caplog, n // 2)
            assert {line["outcome"] for line in lines} == {"client_gone"}
            assert len(watch) == n - n // 2  # the others are still held
            upstream.release.set()  # the rest end normally
            for client in clients[n // 2 :]:
                await read_until(client, b"0\r\n\r\n")
            lines = await wait_lines(caplog, n)
            assert [line["outcome"] for line in lines[n // 2 :]] == ["complete"] * (n - n // 2)
            assert len(watch) == 0
            for client in clients[n // 2 :]:
                await client.aclose()
            nursery.cancel_scope.cancel()
