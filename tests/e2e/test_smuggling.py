"""Request smuggling and malformed heads, byte for byte: raw client sockets, and a raw upstream
that records every connection and every byte it receives.

Each ambiguous or malformed request must be answered ``400`` with the connection closed, and
nothing of it may reach the upstream. "Nothing reached the upstream" is proven after the fact:
a good request on a fresh connection is then the upstream's first and only connection (had the
bad one caused a connection, the upstream would have accepted it first).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Final

import pytest
import trio

from proxycore import Route
from tests.helpers import http_request, start_proxy, start_raw_server

OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHECK: Final = b"GET /check HTTP/1.1\r\n"


@dataclass
class UpstreamConn:
    received: bytearray = field(default_factory=bytearray)
    closed: trio.Event = field(default_factory=trio.Event)


class RecordingUpstream:
    """Raw upstream: records each connection's bytes and answers ``200 ok`` to every complete
    request head except a POST's (enough for body-less GETs; a POST upload stays open)."""

    def __init__(self) -> None:
        self.conns: list[UpstreamConn] = []
        self.got_head = trio.Event()
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> RecordingUpstream:
        self.port = await start_raw_server(nursery, self._handle)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = UpstreamConn()
        self.conns.append(conn)
        answered = 0
        try:
            while data := await stream.receive_some(65536):
                conn.received += data
                heads = conn.received.split(b"\r\n\r\n")[:-1]
                if heads:
                    self.got_head.set()
                for head in heads[answered:]:
                    answered += 1
                    if not head.upper().startswith(b"POST"):
                        await stream.send_all(OK)
        finally:
            conn.closed.set()

    def everything(self) -> bytes:
        return b"".join(bytes(c.received) for c in self.conns)


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    got = bytearray()
    try:
        while data := await stream.receive_some(65536):
            got += data
    except trio.BrokenResourceError:
        pass
    return bytes(got)


async def send_raw(host: str, port: int, data: bytes) -> bytes:
    """``data`` on a fresh connection; everything the proxy sends until it closes."""
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(data)
        return await read_to_eof(stream)


def assert_400_and_closed(data: bytes) -> None:
    """Exactly one response: a proxy-made 400 JSON error with ``Connection: close``."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 400 "), data
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    assert fields[b"connection"] == b"close"
    assert fields[b"content-type"] == b"application/json"
    assert int(fields[b"content-length"]) == len(body), data  # nothing after this response
    assert json.loads(body)["error"]["type"] == "bad_request"


async def assert_upstream_untouched(host: str, port: int, up: RecordingUpstream) -> None:
    assert up.conns == []
    status, _, body = await http_request(host, port, "GET", "/check")
    assert (status, body) == (200, b"ok")
    assert len(up.conns) == 1
    assert up.conns[0].received.startswith(CHECK)
    assert up.conns[0].received.count(b"\r\n\r\n") == 1


def post(*header_lines: bytes, body: bytes = b"") -> bytes:
    head = b"POST /x HTTP/1.1\r\nHost: x\r\n" + b"".join(line + b"\r\n" for line in header_lines)
    return head + b"\r\n" + body


def get(*header_lines: bytes, host: bytes = b"Host: x") -> bytes:
    head = b"GET /x HTTP/1.1\r\n" + host + b"\r\n"
    return head + b"".join(line + b"\r\n" for line in header_lines) + b"\r\n"


BAD_REQUESTS: Final = {
    "cl-and-te": post(
        b"Content-Length: 5",
        b"Transfer-Encoding: chunked",
        body=b"0\r\n\r\n",
    ),
    "te-and-cl": post(
        b"Transfer-Encoding: chunked",
        b"Content-Length: 5",
        body=b"0\r\n\r\n",
    ),
    "two-differing-cl": post(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"),
    "cl-list-differing": post(b"Content-Length: 5, 6", body=b"hello!"),
    "te-chunked-identity": post(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"),
    "te-identity-chunked": post(b"Transfer-Encoding: identity, chunked", body=b"0\r\n\r\n"),
    "te-xchunked": post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
    "te-twice": post(
        b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"
    ),
    "obs-fold": get(b"X-A: a", b" b"),
    "obs-fold-tab": get(b"X-A: a", b"\tb"),
    "ctl-0x01": get(b"X-A: a\x01b"),
    "ctl-0x7f": get(b"X-A: a\x7fb"),
    "nul": get(b"X-A: a\x00b"),
    "bare-cr": get(b"X-A: a\rb"),
    "space-before-colon": get(host=b"Host : x"),
    "chunk-size-zz": post(b"Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-bare-lf": post(b"Transfer-Encoding: chunked", body=b"5\nhello\r\n0\r\n\r\n"),
    "chunk-size-17-digits": post(
        b"Transfer-Encoding: chunked", body=b"00000000000000005\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk-data-overrun": post(b"Transfer-Encoding: chunked", body=b"5\r\nhello!\r\n0\r\n\r\n"),
    "chunk-trailer-content-length": post(
        b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n"
    ),
    "duplicate-host": get(b"Host: other"),
    "missing-host": b"GET /x HTTP/1.1\r\nX-A: a\r\n\r\n",
    "absolute-form": b"GET http://evil/ HTTP/1.1\r\nHost: evil\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_ambiguous_or_malformed_request_is_400_closed_and_never_forwarded(
    request_bytes: bytes,
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            host, port = await start_proxy(nursery, up.url)
            reply = await send_raw(host, port, request_bytes)
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_400_and_closed(reply)


async def test_connect_authority_form_is_405_closed_and_never_forwarded() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            host, port = await start_proxy(nursery, up.url)
            reply = await send_raw(
                host, port, b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n"
            )
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), reply
    assert b"\r\nConnection: close" in head
    assert json.loads(body)["error"]["type"] == "method_not_allowed"


async def test_malformed_chunk_size_mid_body_never_completes_upstream_request() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            host, port = await start_proxy(nursery, up.url)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(post(b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n"))
                await up.got_head.wait()
                await stream.send_all(b"zz\r\nworld\r\n0\r\n\r\n")
                reply = await read_to_eof(stream)
            await up.conns[0].closed.wait()
            nursery.cancel_scope.cancel()
    assert_400_and_closed(reply)
    assert len(up.conns) == 1
    received = bytes(up.conns[0].received)
    assert received.startswith(b"POST /x HTTP/1.1\r\n")
    assert b"zz" not in received
    assert not received.endswith(b"0\r\n\r\n")


SMUGGLED: Final = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
PIPELINED: Final = b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
FIRST: Final = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "bad",
    [
        post(b"Content-Length: 4", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
        post(b"Transfer-Encoding: chunked", b"Content-Length: 40", body=b"0\r\n\r\n" + SMUGGLED),
        post(b"Content-Length: 0", b"Content-Length: 37", body=SMUGGLED),
        post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + SMUGGLED),
        get(b"X-A: a", b" b"),
        b"GET http://evil/ HTTP/1.1\r\nHost: evil\r\n\r\n",
        post(b"Transfer-Encoding: chunked", body=b"zz\r\n\r\n" + SMUGGLED),
    ],
    ids=["cl-te", "te-cl", "cl-cl", "xchunked", "obs-fold", "absolute-form", "bad-chunk"],
)
async def test_requests_pipelined_after_a_refused_one_are_not_processed(bad: bytes) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            host, port = await start_proxy(nursery, up.url)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(FIRST)
                first = await read_to_ok(stream)
                await stream.send_all(bad + PIPELINED)
                reply = await read_to_eof(stream)
            nursery.cancel_scope.cancel()
    assert first.startswith(b"HTTP/1.1 200 ")
    assert_400_and_closed(reply)
    everything = up.everything()
    assert everything.startswith(FIRST.split(b"\r\n")[0])
    assert b"/second" not in everything
    assert b"/smuggled" not in everything


async def read_to_ok(stream: trio.SocketStream) -> bytes:
    """One proxied ``200 ok`` response (its body is the last thing sent)."""
    got = bytearray()
    while not got.endswith(b"\r\n\r\nok"):
        data = await stream.receive_some(65536)
        assert data, bytes(got)
        got += data
    return bytes(got)


@pytest.mark.parametrize(
    "request_bytes",
    [
        get(b"Authorization: Bearer SUPERSECRET", b"this line has no colon"),
        get(b"Authorization Bearer SUPERSECRET"),
        get(b"Authorization : Bearer SUPERSECRET"),
        get(b"Authorization: Bearer SUPERSECRET\x01"),
        get(b"Authorization: Bearer SUPERSECRET\x00"),
        get(b"Authorization: Bearer", b" SUPERSECRET"),
        get(b"Authorization: Bearer SUPERSECRET", b"X-Bad\x01Name: v"),
        get(b"Authorization: Bearer SUPERSECRET", b"Content-Length: x"),
    ],
    ids=[
        "no-colon-after",
        "no-colon",
        "space-before-colon",
        "ctl",
        "nul",
        "obs-fold",
        "bad-name",
        "bad-length",
    ],
)
async def test_error_for_malformed_head_never_quotes_it(
    request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxycore")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            host, port = await start_proxy(nursery, [Route("/", up.url)])
            reply = await send_raw(host, port, request_bytes)
            nursery.cancel_scope.cancel()
    assert_400_and_closed(reply)
    assert b"SUPERSECRET" not in reply
    access = [r for r in caplog.records if r.name == "proxycore.access"]
    assert len(access) == 1 and json.loads(access[0].getMessage())["status"] == 400
    assert "SUPERSECRET" not in caplog.text
    for record in caplog.records:
        assert "SUPERSECRET" not in record.getMessage()
        assert "SUPERSECRET" not in str(record.args)
        assert record.exc_info is None or "SUPERSECRET" not in str(record.exc_info[1])
    assert up.conns == []
