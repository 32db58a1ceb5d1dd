"""The shared upstream core (``proxycore/proxy/upstream.py``) over scripted streams.

:class:`~proxycore.proxy.upstream.UpstreamCall` runs here with the native front end's
two ends (:class:`~proxycore.proxy.relay.RawRequestBody`,
:class:`~proxycore.proxy.relay.RawResponseSink`) on a scripted client, a real
:class:`~proxycore.net.pool.Pool` holding scripted upstream connections, and a scripted
``connect`` that records every new connection. No socket is opened.

Three decisions are pinned down, each by tests that fail if it breaks:

- **reuse**: the upstream connection goes back to the pool only after a keep-alive
  response whose body ended cleanly with nothing read past it, and only if the whole
  request body went upstream;
- **the stale retry**: a pooled connection that dies before any response byte is retried
  once, on a *new* connection (never another pooled one), only for an idempotent
  request without a body, and never twice;
- **the framing choice** for the client: Content-Length and chunked passed through,
  close-delimited re-chunked for HTTP/1.1, chunked decoded for HTTP/1.0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import pytest
import trio

from proxycore import Config, Route
from proxycore.config import Timeouts
from proxycore.errors import UpstreamReset
from proxycore.http.headers import Headers, may_retry, request_framing
from proxycore.net.pool import (
    Origin,
    StaleConnection,
    UpstreamConnection,
    with_stale_retry,
)
from proxycore.net.stream import CHUNK, StreamBroken
from proxycore.proxy.ledger import Ledger
from proxycore.proxy.relay import RawRequestBody, RawResponseSink
from proxycore.proxy.state import ProxyState
from proxycore.proxy.upstream import UpstreamCall
from tests.inmem.scripted import EOF, Pause, ScriptedStream, ScriptItem
from tests.inmem.single import one_upstream

ORIGIN: Final = Origin("http", "upstream.test", 80)
GET: Final = b"GET / HTTP/1.1\r\nHost: upstream.test\r\n\r\n"
OK_HELLO: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
#: A pooled connection the upstream closed after checkout found it alive: the Pause
#: keeps ``has_pending_input`` False at checkout, then the first read sees EOF.
STALE: Final[list[ScriptItem]] = [Pause(0), EOF]


class Client:
    """The client connection as the relays see it (``ClientSide``): a scripted stream,
    the two connection buffers, and a client that never closes on its own."""

    def __init__(self, script: Sequence[ScriptItem] = ()) -> None:
        self.stream = ScriptedStream(script)
        self.rbuf = bytearray(CHUNK)
        self.wbuf = bytearray(CHUNK)

    async def wait_closed(self) -> bool:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


class Exchange:
    """One exchange's worth of the native front end around an ``UpstreamCall``."""

    def __init__(
        self,
        *,
        method: bytes = b"GET",
        headers: Headers | None = None,
        data: bytes = b"",
        client_11: bool = True,
        client_script: Sequence[ScriptItem] = (),
    ) -> None:
        self.method = method
        self.headers = headers or []
        self.state = ProxyState(
            Config(routes=(Route(prefix="/", upstream="http://upstream.test/"),))
        )
        self.ledger = Ledger(self.state, method.decode(), "127.0.0.1", "r1", logging.getLogger("t"))
        self.client = Client(client_script)
        version = b"1.1" if client_11 else b"1.0"
        self.framing = request_framing(self.headers, version)
        self.body = RawRequestBody(self.client, self.ledger.record, data, self.framing)
        self.sink = RawResponseSink(self.client, self.ledger, method, client_11)
        #: Scripts for the connections ``connect`` opens, in order; and those it opened.
        self.scripts: list[Sequence[ScriptItem]] = []
        self.opened: list[UpstreamConnection] = []

    async def connect(self, origin: Origin) -> UpstreamConnection:
        conn = UpstreamConnection(origin, ScriptedStream(self.scripts.pop(0)))
        self.opened.append(conn)
        return conn

    def pooled(self, script: Sequence[ScriptItem]) -> UpstreamConnection:
        """An idle keep-alive connection in the pool (``uses == 1``)."""
        conn = UpstreamConnection(ORIGIN, ScriptedStream(script))
        self.state.pool.checkin(conn)
        return conn

    async def forward(self, head: bytes = GET, *, retry: bool | None = None) -> None:
        call = UpstreamCall(
            self.ledger,
            self.state.pool,
            self.body,
            self.sink,
            method=self.method,
            timeouts=Timeouts(connect=1, response=5, idle=5),
            server=self.state.snapshot.config.server,
            connect=self.connect,
        )
        if retry is None:
            retry = may_retry(self.method, self.framing)
        with trio.fail_after(10):
            attempts, head_for = one_upstream(ORIGIN, head + self.body.start, self.ledger.record)
            await call.forward(attempts, head_for, retry=retry)

    @property
    def written(self) -> bytes:
        """What the client was sent."""
        return self.client.stream.written

    def pooled_now(self) -> int:
        return self.state.pool.counts().get(ORIGIN, 0)


def stream_of(conn: UpstreamConnection) -> ScriptedStream:
    stream = conn.stream
    assert isinstance(stream, ScriptedStream)
    return stream


def split(response: bytes) -> tuple[list[bytes], bytes]:
    """``(head lines after the status line, body)`` of what the client got."""
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def field(lines: list[bytes], name: bytes) -> bytes | None:
    for line in lines[1:]:
        n, _, v = line.partition(b": ")
        if n.lower() == name:
            return v
    return None


# --------------------------------------------------------------------------- reuse


async def test_keep_alive_response_puts_the_connection_back() -> None:
    x = Exchange()
    x.scripts.append([OK_HELLO])
    await x.forward()
    (conn,) = x.opened
    assert x.pooled_now() == 1
    assert not stream_of(conn).closed
    assert x.state.pool.checkout(ORIGIN) is conn
    assert x.written.endswith(b"\r\n\r\nhello")


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", id="close"
        ),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", id="http10"),
        pytest.param(OK_HELLO + b"HTTP/1.1 200", id="leftover-bytes"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nX",
            id="leftover-after-chunked",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\nX", id="leftover-after-no-body"),
    ],
)
async def test_connection_is_closed_when_the_response_forbids_reuse(response: bytes) -> None:
    x = Exchange()
    x.scripts.append([response])
    await x.forward()
    (conn,) = x.opened
    assert x.pooled_now() == 0
    assert stream_of(conn).closed


async def test_close_delimited_response_closes_the_connection() -> None:
    x = Exchange()
    x.scripts.append([b"HTTP/1.1 200 OK\r\n\r\nhello", EOF])
    await x.forward()
    assert x.pooled_now() == 0
    assert stream_of(x.opened[0]).closed


async def test_incomplete_request_body_closes_the_connection() -> None:
    """The upstream answered before the request body was all there: the connection is
    mid-request, never reused, though the response itself was a clean keep-alive one."""
    x = Exchange(method=b"POST", headers=[(b"Content-Length", b"10")], data=b"abc")
    assert not x.body.done
    x.scripts.append([OK_HELLO])
    await x.forward(b"POST / HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 10\r\n\r\n")
    assert not x.body.done
    assert x.written.endswith(b"hello")
    assert x.pooled_now() == 0
    assert stream_of(x.opened[0]).closed


async def test_whole_request_body_then_keep_alive_response_reuses() -> None:
    """The counterpart: the rest of the body is pumped, then the connection is reused."""
    x = Exchange(
        method=b"POST", headers=[(b"Content-Length", b"6")], data=b"abc", client_script=[b"def"]
    )
    x.scripts.append([Pause(0.01), OK_HELLO])
    await x.forward(b"POST / HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 6\r\n\r\n")
    assert x.body.done
    assert stream_of(x.opened[0]).written.endswith(b"\r\n\r\nabcdef")
    assert x.pooled_now() == 1


# --------------------------------------------------------------------------- stale retry


@pytest.mark.parametrize(
    "stale",
    [pytest.param(STALE, id="eof"), pytest.param([Pause(0), StreamBroken("reset")], id="reset")],
)
async def test_stale_pooled_connection_is_retried_once_on_a_new_connection(
    stale: list[ScriptItem],
) -> None:
    """The retry opens a new connection: it never takes another pooled one (which may be
    just as stale), even when the pool holds a good-looking one."""
    x = Exchange()
    older = x.pooled([b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nold"])
    newest = x.pooled(stale)  # checkout hands out the most recently used first
    x.scripts.append([b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew"])
    await x.forward()
    assert len(x.opened) == 1
    assert x.written.endswith(b"\r\n\r\nnew")
    assert stream_of(newest).written == GET
    assert stream_of(newest).closed
    assert stream_of(older).writes == []  # never used
    assert x.pooled_now() == 2  # the older one, and the new one after its clean response


async def test_stale_on_write_is_retried_on_a_new_connection() -> None:
    """A pooled connection whose head write fails is stale too."""
    x = Exchange()
    stale = x.pooled([])
    stream_of(stale).close()
    x.scripts.append([OK_HELLO])
    await x.forward()
    assert len(x.opened) == 1
    assert x.written.endswith(b"hello")


async def test_stale_is_not_retried_for_a_post_with_a_body() -> None:
    """The body may have reached the upstream: a POST is never sent twice."""
    x = Exchange(method=b"POST", headers=[(b"Content-Length", b"3")], data=b"abc")
    assert x.body.done
    x.pooled(STALE)
    x.scripts.append([OK_HELLO])
    with pytest.raises(UpstreamReset, match="upstream closed the connection"):
        await x.forward(b"POST / HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 3\r\n\r\n")
    assert x.opened == []


async def test_stale_is_retried_at_most_once() -> None:
    """The second attempt failing the same way is the answer: no third connection."""
    x = Exchange()
    x.pooled(STALE)

    async def connect(origin: Origin) -> UpstreamConnection:
        conn = UpstreamConnection(origin, ScriptedStream(STALE))
        conn.uses = 1  # looks reused: only the retry count can stop a loop
        x.opened.append(conn)
        return conn

    x.connect = connect  # type: ignore[method-assign]
    with pytest.raises(UpstreamReset, match=r"^upstream closed the connection$"):
        await x.forward()
    assert len(x.opened) == 1


async def test_fresh_connection_closing_at_once_is_not_retried() -> None:
    x = Exchange()
    x.scripts.append([EOF])
    x.scripts.append([OK_HELLO])
    with pytest.raises(UpstreamReset, match="before responding"):
        await x.forward()
    assert len(x.opened) == 1


async def test_with_stale_retry_uses_the_pool_then_connect() -> None:
    """The helper itself: a pooled connection first; on StaleConnection one more attempt
    on ``connect``'s connection; ``retry=False`` or a second stale propagates."""
    x = Exchange()
    pooled = x.pooled([])
    fresh = UpstreamConnection(ORIGIN, ScriptedStream())
    seen: list[UpstreamConnection] = []

    async def connect(origin: Origin) -> UpstreamConnection:
        return fresh

    async def attempt(conn: UpstreamConnection) -> str:
        seen.append(conn)
        if conn is pooled:
            raise StaleConnection
        return "ok"

    pool = x.state.pool
    assert await with_stale_retry(pool, ORIGIN, attempt, connect=connect) == "ok"
    assert seen == [pooled, fresh]

    pool.checkin(pooled)
    with pytest.raises(StaleConnection):
        await with_stale_retry(pool, ORIGIN, attempt, connect=connect, retry=False)

    async def always_stale(conn: UpstreamConnection) -> str:
        seen.append(conn)
        raise StaleConnection

    pool.checkin(pooled)
    seen.clear()
    with pytest.raises(StaleConnection):
        await with_stale_retry(pool, ORIGIN, always_stale, connect=connect)
    assert seen == [pooled, fresh]


# --------------------------------------------------------------------------- framing choice


async def test_content_length_body_is_passed_through() -> None:
    x = Exchange()
    x.scripts.append([b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello", b" world"])
    await x.forward()
    lines, body = split(x.written)
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert field(lines, b"content-length") == b"11"
    assert field(lines, b"transfer-encoding") is None
    assert body == b"hello world"


async def test_chunked_body_is_passed_through_to_http11() -> None:
    chunks = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    x = Exchange()
    x.scripts.append(
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks[:6], chunks[6:]]
    )
    await x.forward()
    lines, body = split(x.written)
    assert field(lines, b"transfer-encoding") == b"chunked"
    assert body == chunks  # byte for byte, extensions included
    assert x.pooled_now() == 1


async def test_chunked_body_is_decoded_for_http10() -> None:
    x = Exchange(client_11=False)
    x.scripts.append(
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"0\r\n\r\n"]
    )
    await x.forward()
    lines, body = split(x.written)
    assert field(lines, b"transfer-encoding") is None
    assert field(lines, b"connection") == b"close"
    assert body == b"hello"
    assert x.sink.close


async def test_close_delimited_body_is_rechunked_for_http11() -> None:
    x = Exchange()
    x.scripts.append([b"HTTP/1.1 200 OK\r\n\r\nhello", b" world", EOF])
    await x.forward()
    lines, body = split(x.written)
    assert field(lines, b"transfer-encoding") == b"chunked"
    assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert not x.sink.close  # the client connection stays usable: its body is framed


async def test_close_delimited_body_stays_close_delimited_for_http10() -> None:
    x = Exchange(client_11=False)
    x.scripts.append([b"HTTP/1.1 200 OK\r\n\r\nhello", b" world", EOF])
    await x.forward()
    lines, body = split(x.written)
    assert field(lines, b"transfer-encoding") is None
    assert field(lines, b"content-length") is None
    assert field(lines, b"connection") == b"close"
    assert body == b"hello world"
    assert x.sink.close


async def test_head_response_keeps_its_length_and_has_no_body() -> None:
    """The reader is primed with the method: a HEAD response's Content-Length describes
    no body, so nothing is read or relayed after the head and the connection is reused."""
    x = Exchange(method=b"HEAD")
    x.scripts.append([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"])
    await x.forward(b"HEAD / HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
    lines, body = split(x.written)
    assert field(lines, b"content-length") == b"5"
    assert body == b""
    assert x.pooled_now() == 1


@pytest.mark.parametrize("client_11", [True, False])
async def test_interim_responses_reach_http11_clients_only(client_11: bool) -> None:
    x = Exchange(client_11=client_11)
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    x.scripts.append([early, b"HTTP/1.1 100 Continue\r\n\r\n", OK_HELLO])
    await x.forward()
    hint = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nX-Request-ID: r1\r\n\r\n"
    assert x.written.startswith(hint) is client_11
    assert b" 100 " not in x.written  # the proxy answers Expect itself
    assert x.written.endswith(b"\r\n\r\nhello")
