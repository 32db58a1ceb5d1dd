"""The WebSocket upgrade (``proxy/ws_handshake.py``, ``proxy/websocket.py``) over trio
memory streams: no sockets.

``relay_websocket`` gets an :class:`UpgradeRequest` whose client is one end of a memory
stream pair (the test holds the other end, the client's head in ``replay``), and a
connector whose upstream is another pair: the test's end either scripts raw bytes (the
101 check, refusals, a silent or closing upstream) or runs trio-websocket's server side.
Each test checks what the client got, what the upstream got, the returned
:class:`UpgradeResult` and the lent access record. The peers are in ``ws_peers.py``.

Every test runs on ``autojump_clock``: no real I/O, so timeouts are exact.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

import pytest
import trio
import trio.testing
from trio.testing import MockClock
from trio_websocket import ConnectionClosed, wrap_server_stream

from proxycore.config import WebSocketSettings
from proxycore.errors import (
    BadRequest,
    ClientGone,
    InternalError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
)
from proxycore.http.headers import Headers
from proxycore.http.router import Match
from proxycore.observe.accesslog import ExchangeRecord
from proxycore.proxy.websocket import relay_websocket
from proxycore.proxy.ws_handshake import (
    ClientStream,
    UpgradeRequest,
    UpgradeRequired,
    UpgradeResult,
    UpstreamSocket,
    check_client,
)
from tests.inmem.ws_peers import (
    CONNECT_S,
    HEAD,
    KEY,
    RID,
    ROUTE,
    Drain,
    Upstream,
    accept_script,
    accept_token,
    client_frame,
    head_fields,
    raw_script,
    read_all,
    read_head,
    run,
    server_frame,
    upgrade,
)

# --------------------------------------------------------------------------- client checks

BAD_CLIENTS: Final = {
    "http-1.0": ({"http_11": False}, BadRequest, "HTTP/1.1"),
    "body": ({"has_body": True}, BadRequest, "must not have a body"),
    "version-8": (
        {"headers": [(b"Sec-WebSocket-Version", b"8"), (b"Sec-WebSocket-Key", KEY)]},
        UpgradeRequired,
        "version 13",
    ),
    "no-key": ({"headers": [(b"Sec-WebSocket-Version", b"13")]}, BadRequest, "Key"),
    "non-ascii-target": ({"target": b"/ws/\xc3\xa9"}, BadRequest, "invalid bytes"),
    "non-ascii-protocol": (
        {"headers": [*head_fields(HEAD), (b"Sec-WebSocket-Protocol", b"\xff")]},
        BadRequest,
        "invalid bytes",
    ),
}


@pytest.mark.parametrize(("changes", "error", "message"), BAD_CLIENTS.values(), ids=BAD_CLIENTS)
async def test_a_bad_client_handshake_is_refused_before_the_upstream(
    autojump_clock: MockClock, changes: dict[str, object], error: type[Exception], message: str
) -> None:
    """``check_client`` refuses what trio-websocket's server side would (400, 426): the
    error is raised before any connect and nothing is written to the client."""
    proxy_end, client_end = trio.testing.memory_stream_pair()
    upstream = Upstream()
    result, record = await run(upgrade(proxy_end, **changes), upstream, raw_script(b""))
    assert isinstance(result, error) and message in str(result)
    assert upstream.opened == 0 and record.upstream == ""
    assert await read_all(client_end) == (b"", False)
    if isinstance(result, UpgradeRequired):
        assert result.status == 426
        assert (b"Sec-WebSocket-Version", b"13") in result.headers


def test_check_client_returns_the_offered_subprotocols_in_order() -> None:
    proxy_end, _ = trio.testing.memory_stream_pair()
    assert check_client(upgrade(proxy_end)) == ["chat.v2", "chat.v1"]


# --------------------------------------------------------------------------- accepted


async def test_accept_sends_101_after_the_upstreams_then_relays_both_ways(
    autojump_clock: MockClock,
) -> None:
    """The upstream handshake comes first (path + query, Host, X-Forwarded-For, our
    request id, admission's drop and extra, one key of its own); then the client's 101
    with the upstream's Set-Cookie and our X-Request-ID, no extensions. The head the proxy
    had read (``replay``) is what trio-websocket parsed; messages then flow both ways and
    the client's close frame (code and reason) reaches the upstream and comes back."""
    proxy_end, client_end = trio.testing.memory_stream_pair()
    up = upgrade(proxy_end)
    upstream = Upstream()
    up_path, up_got, up_close = [""], [""], [0]
    up_headers: Headers = []
    client_got = [b""]

    async def script(stream: trio.abc.Stream) -> None:
        head = await read_head(stream)
        up_headers.extend((n.lower(), v) for n, v in head_fields(head))
        async with trio.open_nursery() as readers:
            request = await wrap_server_stream(readers, ClientStream(stream, head))
            up_path[0] = request.path
            ws = await request.accept(
                subprotocol="chat.v1", extra_headers=[(b"Set-Cookie", b"ws=1")]
            )
            message = await ws.get_message()
            assert isinstance(message, str)
            up_got[0] = message
            await ws.send_message("reply")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            up_close[0] = closed.value.reason.code
            await trio.sleep_forever()

    async def client() -> None:
        client_got[0] = await read_head(client_end)
        await client_end.send_all(client_frame(0x1, b"hello"))
        while server_frame(0x1, b"reply") not in client_got[0]:
            chunk = await client_end.receive_some()
            assert chunk
            client_got[0] += chunk
        await client_end.send_all(client_frame(0x8, b"\x03\xe8bye"))

    result, record = await run(up, upstream, script, client)
    assert up_path == ["/chat?room=1"] and up_got == ["hello"] and up_close == [1000]
    fields = dict(up_headers)
    assert fields[b"host"] == b"up.example:8080"
    assert fields[b"x-forwarded-for"] == b"203.0.113.7" and fields[b"x-request-id"] == RID
    assert fields[b"x-user"] == b"alice" and fields[b"cookie"] == b"c=1"
    assert b"authorization" not in fields
    assert [n for n, _ in up_headers].count(b"sec-websocket-key") == 1
    assert fields[b"sec-websocket-key"] != KEY  # trio-websocket's own, never the client's
    reply_head = client_got[0]
    assert reply_head.startswith(b"HTTP/1.1 101 ")
    reply = {n.lower(): v for n, v in head_fields(reply_head)}
    assert reply[b"sec-websocket-accept"] == accept_token(KEY)
    assert reply[b"sec-websocket-protocol"] == b"chat.v1"
    assert reply[b"set-cookie"] == b"ws=1" and reply[b"x-request-id"] == RID
    assert b"sec-websocket-extensions" not in reply
    rest, client_closed = await read_all(client_end)
    assert rest.startswith(server_frame(0x8, b"\x03\xe8bye"))  # the close passed back
    assert isinstance(result, UpgradeResult) and result.head_sent
    assert result.linger is not client_closed  # linger exactly when left open
    assert (record.status, record.outcome) == (101, "websocket_closed")
    assert (record.bytes_in, record.bytes_out) == (5, 5)
    assert record.upstream == "http://up.example:8080" and record.ttfb is not None
    assert upstream.closed == 1


async def test_on_response_head_sees_the_101_and_its_headers_reach_the_client(
    autojump_clock: MockClock,
) -> None:
    proxy_end, client_end = trio.testing.memory_stream_pair()
    seen: list[int] = []

    async def hook(status: int, headers: Headers) -> None:
        seen.append(status)
        headers.append((b"X-Head-Hook", b"seen"))

    heads: list[bytes] = []

    async def client() -> None:
        heads.append(await read_head(client_end))
        await client_end.send_all(client_frame(0x8, b"\x03\xe8"))

    up = upgrade(proxy_end, response_head=hook)
    result, record = await run(up, Upstream(), accept_script([]), client)
    assert seen == [101] and len(heads) == 1
    assert (b"X-Head-Hook", b"seen") in head_fields(heads[0])
    assert isinstance(result, UpgradeResult) and result.head_sent and record.status == 101


async def test_a_failing_101_hook_is_its_error_and_the_client_gets_no_101(
    autojump_clock: MockClock,
) -> None:
    proxy_end, client_end = trio.testing.memory_stream_pair()

    async def hook(status: int, headers: Headers) -> None:
        raise InternalError("the on_response_head hook failed")

    upstream = Upstream()
    result, record = await run(upgrade(proxy_end, response_head=hook), upstream, accept_script([]))
    assert isinstance(result, InternalError)
    assert await read_all(client_end) == (b"", False)
    assert record.status == 0 and upstream.closed == 1


# --------------------------------------------------------------------------- the 101 check


async def test_a_101_with_a_wrong_accept_token_is_a_protocol_error(
    autojump_clock: MockClock,
) -> None:
    """A 101 is checked (wsproto): a wrong ``Sec-WebSocket-Accept`` is a 502
    (``UpstreamProtocolError``), nothing goes to the client, nothing is tunnelled."""
    proxy_end, client_end = trio.testing.memory_stream_pair()
    bad = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_token(b"not-the-key") + b"\r\n\r\n"
    )
    result, record = await run(upgrade(proxy_end), Upstream(), raw_script(bad))
    assert isinstance(result, UpstreamProtocolError) and result.status == 502
    assert "'chat'" in str(result) and "up.example" not in str(result)
    assert "up.example:8080" in result.detail  # the address is for the log only
    assert await read_all(client_end) == (b"", False)
    assert record.status == 0


async def test_garbage_instead_of_a_response_is_a_protocol_error(
    autojump_clock: MockClock,
) -> None:
    proxy_end, client_end = trio.testing.memory_stream_pair()
    result, _ = await run(upgrade(proxy_end), Upstream(), raw_script(b"SSH-2.0-x\r\n\r\n"))
    assert isinstance(result, UpstreamProtocolError)
    assert await read_all(client_end) == (b"", False)


async def test_an_upstream_closing_mid_handshake_is_a_reset(autojump_clock: MockClock) -> None:
    proxy_end, client_end = trio.testing.memory_stream_pair()
    result, _ = await run(upgrade(proxy_end), Upstream(), raw_script(b"", close=True))
    assert isinstance(result, UpstreamReset) and result.status == 502
    assert await read_all(client_end) == (b"", False)


async def test_a_silent_upstream_times_out_after_the_connect_timeout(
    autojump_clock: MockClock,
) -> None:
    proxy_end, client_end = trio.testing.memory_stream_pair()
    start = trio.current_time()
    result, _ = await run(upgrade(proxy_end), Upstream(), raw_script(b""))
    assert isinstance(result, UpstreamConnectTimeout) and result.status == 502
    assert result.outcome == "upstream_connect_timeout"
    assert trio.current_time() - start == pytest.approx(CONNECT_S, abs=0.05)
    assert await read_all(client_end) == (b"", False)


async def test_a_connect_error_propagates_and_nothing_is_sent(autojump_clock: MockClock) -> None:
    proxy_end, client_end = trio.testing.memory_stream_pair()
    record = ExchangeRecord(started=trio.current_time())

    async def refuse(up: UpgradeRequest) -> UpstreamSocket:
        raise UpstreamConnectError(f"cannot connect to {up.where}: refused")

    with pytest.raises(UpstreamConnectError, match="route 'chat'"):
        await relay_websocket(upgrade(proxy_end), record, connect=refuse)
    assert await read_all(client_end) == (b"", False)


async def test_a_client_gone_during_the_upstream_handshake_is_client_gone(
    autojump_clock: MockClock,
) -> None:
    """The client's reader ending stops the wait on a silent upstream at once."""
    proxy_end, client_end = trio.testing.memory_stream_pair()
    start = trio.current_time()

    async def script(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await client_end.aclose()
        await trio.sleep_forever()

    result, _ = await run(upgrade(proxy_end), Upstream(), script)
    assert isinstance(result, ClientGone)
    assert trio.current_time() - start < CONNECT_S


# --------------------------------------------------------------------------- refusals


async def test_a_refusal_is_relayed_as_a_plain_response_then_the_connection_lingers(
    autojump_clock: MockClock,
) -> None:
    """Any status but 101: that status, the end-to-end headers and the body go to the
    client with ``Connection: close`` and our request id; nothing after it. The result
    says a head was sent and the connection must close lingering."""
    proxy_end, client_end = trio.testing.memory_stream_pair()
    body = b"not allowed"
    refusal = (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Why: nope\r\n"
        b"Connection: close, X-Hop\r\nX-Hop: 1\r\nX-Request-ID: theirs\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    seen: list[int] = []

    async def hook(status: int, headers: Headers) -> None:
        seen.append(status)

    upstream = Upstream()
    result, record = await run(
        upgrade(proxy_end, response_head=hook), upstream, raw_script(refusal)
    )
    assert result == UpgradeResult(head_sent=True, linger=True)
    data, closed = await read_all(client_end)
    assert not closed  # the connection closes it (lingering), not the upgrade
    head, got_body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n") and got_body == body
    fields = {n.lower(): v for n, v in head_fields(data)}
    assert fields[b"x-why"] == b"nope" and fields[b"connection"] == b"close"
    assert fields[b"x-request-id"] == RID and fields[b"content-length"] == b"%d" % len(body)
    assert b"x-hop" not in fields
    assert (record.status, record.outcome, record.bytes_out) == (403, "websocket_refused", 11)
    assert seen == [403] and upstream.closed == 1


async def test_a_refusal_without_a_body_status_sends_no_body(autojump_clock: MockClock) -> None:
    proxy_end, client_end = trio.testing.memory_stream_pair()
    refusal = b"HTTP/1.1 204 No Content\r\nX-Why: nope\r\n\r\n"
    result, record = await run(upgrade(proxy_end), Upstream(), raw_script(refusal))
    assert result == UpgradeResult(head_sent=True, linger=True)
    data, _ = await read_all(client_end)
    assert data.startswith(b"HTTP/1.1 204 ") and data.endswith(b"\r\n\r\n")
    assert b"content-length" not in data.lower()
    assert (record.status, record.bytes_out) == (204, 0)


async def test_a_failing_refusal_hook_is_its_error_and_nothing_is_sent(
    autojump_clock: MockClock,
) -> None:
    proxy_end, client_end = trio.testing.memory_stream_pair()

    async def hook(status: int, headers: Headers) -> None:
        raise InternalError("the on_response_head hook set an invalid header")

    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    result, _ = await run(upgrade(proxy_end, response_head=hook), Upstream(), raw_script(refusal))
    assert isinstance(result, InternalError)
    assert await read_all(client_end) == (b"", False)


# --------------------------------------------------------------------------- session ends


async def test_a_drain_closes_the_session_with_1001_and_unregisters(
    autojump_clock: MockClock,
) -> None:
    proxy_end, client_end = trio.testing.memory_stream_pair()
    drain = Drain()
    up = upgrade(proxy_end, drain=drain)

    async def client() -> None:
        await read_head(client_end)
        await trio.testing.wait_all_tasks_blocked()  # the session is up: its timer waits
        assert drain.idle_waits
        drain.draining = True
        for scope in list(drain.idle_waits):
            scope.cancel()

    result, record = await run(up, Upstream(), accept_script([]), client)
    assert isinstance(result, UpgradeResult) and result.head_sent
    assert record.outcome == "websocket_shutdown" and not drain.idle_waits
    data, _ = await read_all(client_end)
    assert server_frame(0x8, b"\x03\xe9server shutting down") in data


async def test_a_too_big_client_message_closes_with_1009_and_the_connection_lingers(
    autojump_clock: MockClock,
) -> None:
    """Over ``max_message_bytes``: trio-websocket closes the client side with 1009 and stops
    reading, leaving the socket open; the upstream gets 1009 too. The result asks the
    connection to close it lingering (so the client reads the close frame, not a reset)."""
    proxy_end, client_end = trio.testing.memory_stream_pair()
    route = replace(ROUTE, ws=WebSocketSettings(max_message_bytes=10, ping_interval=0))
    up = upgrade(proxy_end, match=Match(route, b"/chat"))
    up_close = [0]

    async def script(stream: trio.abc.Stream) -> None:
        head = await read_head(stream)
        async with trio.open_nursery() as readers:
            request = await wrap_server_stream(readers, ClientStream(stream, head))
            ws = await request.accept()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            up_close[0] = closed.value.reason.code
            await trio.sleep_forever()

    async def client() -> None:
        await read_head(client_end)
        await client_end.send_all(client_frame(0x1, b"x" * 20))

    result, record = await run(up, Upstream(), script, client)
    data, client_closed = await read_all(client_end)
    assert data[:1] == b"\x88" and data[2:4] == b"\x03\xf1"  # close 1009, first after the 101
    assert not client_closed and up_close == [1009]
    assert result == UpgradeResult(head_sent=True, linger=True)
    assert record.status == 101 and record.bytes_in == 0
