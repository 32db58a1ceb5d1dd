"""Review of upstream groups (issue 14) as a hostile client, a hostile upstream and a
careless operator, over real sockets on 127.0.0.1.

Pinned behaviour (passing): each upstream of a group sees only its own injected credential,
on a retry and on a WebSocket upgrade; a body in hand (Content-Length gathered, HTTP/1.0,
chunked complete in the first read) is replayed whole on the next upstream and a request
pipelined behind it is still answered; an ``Expect: 100-continue`` upload and a response
after an interim 1xx are never retried; an upstream's active-stream count comes back to 0
when the client goes away mid-wait.

The bugs this review found (each test failed before its fix): an underscore-spelled
session id, a missing backup key naming its source in the 500, a far-future
``Retry-After`` date turning a 503 into a 500, and health checks that never ran under ASGI.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Final

import h11
import pytest
import trio

from proxycore import Config
from proxycore.config import HealthCheck, Inject, RetryPolicy
from proxycore.proxy.asgi import ProxyApp
from tests.e2e.groups_support import (
    Client,
    Reply,
    Req,
    Upstream,
    entry,
    eventually,
    group_config,
    group_route,
    run_proxy,
    scrape_admin,
    upstream_value,
)
from tests.helpers import start_app

RETRY_503: Final = RetryPolicy(attempts=2, on=("connect_error", "503"))
KEY_A: Final = "key-of-upstream-a-0123456789"
KEY_B: Final = "key-of-upstream-b-0123456789"


async def unavailable(up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
    return 503, [], b"unavailable"


async def echo(up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
    return 200, [], up.name.encode() + b":" + req.body


async def test_a_retry_sends_each_upstream_only_its_own_credential(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A (x-api-key) answers 503; the retry goes to B (Authorization: Bearer). Neither sees
    the other's key nor the client's own copies of either field."""
    monkeypatch.setenv("REVIEW_KEY_A", KEY_A)
    monkeypatch.setenv("REVIEW_KEY_B", KEY_B)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a", unavailable), Upstream("b", echo)
            await a.start(nursery)
            await b.start(nursery)
            route = group_route(
                [
                    entry(a, inject=Inject(header="x-api-key", token_env="REVIEW_KEY_A")),
                    entry(
                        b,
                        backup=True,
                        inject=Inject(
                            header="Authorization", scheme="Bearer", token_env="REVIEW_KEY_B"
                        ),
                    ),
                ],
                retry=RETRY_503,
            )
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                forged = [(b"x-api-key", b"client-key"), (b"authorization", b"Bearer client")]
                status, _, body = await client.request(b"GET", b"/x", forged)
            assert (status, body) == (200, b"b:")
            (to_a,), (to_b,) = a.requests, b.requests
            assert [v for n, v in to_a.headers if n == b"x-api-key"] == [KEY_A.encode()]
            assert to_a.header(b"authorization") is None
            assert [v for n, v in to_b.headers if n == b"authorization"] == [
                b"Bearer " + KEY_B.encode()
            ]
            assert to_b.header(b"x-api-key") is None
            nursery.cancel_scope.cancel()


class _Responses:
    """Responses read off one raw client stream, in order (pipelining: h11 client state
    only tracks the cycles; the request bytes are written raw by the test)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def next(self, method: bytes) -> tuple[int, bytes]:
        h = self.h11
        if h.our_state is h11.DONE:
            h.start_next_cycle()
        h.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        h.send(h11.EndOfMessage())
        status, body = 0, bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(body)
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:
                raise AssertionError(f"unexpected {event!r}")


async def test_a_gathered_post_is_replayed_whole_and_the_pipelined_request_after_it_kept() -> None:
    """The body arrives in two writes, the second with the next request right behind it;
    A answers 503, B must get the whole body, and the pipelined GET its own answer."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a", unavailable), Upstream("b", echo)
            await a.start(nursery)
            await b.start(nursery)
            route = group_route([entry(a), entry(b, backup=True)], retry=RETRY_503)
            proxy = await run_proxy(nursery, group_config([route]))
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)
            async with stream:
                await stream.send_all(
                    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123"
                )
                await stream.send_all(b"456789GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
                responses = _Responses(stream)
                assert await responses.next(b"POST") == (200, b"b:0123456789")
                # The GET went to A (the primary, back in favour), which says 503 too; the
                # retry is B's again: what matters is that it was read as a request.
                status, body = await responses.next(b"GET")
                assert (status, body) in ((200, b"b:"), (503, b"unavailable"))
            assert [r.body for r in a.requests if r.method == b"POST"] == [b"0123456789"]
            assert [r.body for r in b.requests if r.method == b"POST"] == [b"0123456789"]
            assert any(r.target == b"/next" for r in a.requests + b.requests)
            nursery.cancel_scope.cancel()


async def early_hints_then_503(up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
    await stream.send_all(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
    )
    return None


async def test_no_retry_once_an_interim_response_reached_the_client() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a", early_hints_then_503), Upstream("b")
            await a.start(nursery)
            await b.start(nursery)
            route = group_route([entry(a), entry(b, backup=True)], retry=RETRY_503)
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                status, _, body = await client.request(b"GET", b"/x")
            assert (status, body) == (503, b"busy")
            assert b.requests == []
            nursery.cancel_scope.cancel()


async def test_active_streams_come_back_to_zero_when_the_client_goes_away() -> None:
    held = trio.Event()

    async def hold(up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
        held.set()
        await trio.Event().wait()  # never set: the client's going away ends it
        return None

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a", hold), Upstream("b", hold)
            await a.start(nursery)
            await b.start(nursery)
            proxy = await run_proxy(nursery, group_config([group_route([entry(a), entry(b)])]))
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)
            await stream.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            await held.wait()

            async def active() -> float:
                samples = await scrape_admin(proxy)
                return sum(
                    upstream_value(samples, "proxycore_upstream_active_streams", "/", up.netloc)
                    for up in (a, b)
                )

            assert await active() == 1
            await stream.aclose()

            async def released() -> bool:
                return await active() == 0

            await eventually(released)
            nursery.cancel_scope.cancel()


async def test_an_underscore_session_id_never_reaches_the_upstream(tmp_path: Path) -> None:
    key_file = tmp_path / "session.key"
    key_file.write_text(secrets.token_hex(32))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a = Upstream("a")
            await a.start(nursery)
            b = Upstream("b")
            await b.start(nursery)
            route = group_route([entry(a), entry(b)], prefix="/mcp/", affinity="mcp_session")
            proxy = await run_proxy(nursery, group_config([route], session_key_file=str(key_file)))
            async with await Client.open(proxy) as client:
                await client.request(
                    b"POST", b"/mcp/", [(b"Mcp_Session_Id", b"victim-session-at-a")], b"{}"
                )
            nursery.cancel_scope.cancel()
    assert all(r.header(b"mcp_session_id") is None for r in a.requests + b.requests)


async def test_a_backup_whose_key_is_missing_names_no_token_source_to_the_client(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "secrets" / "backup-provider.key"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a", unavailable), Upstream("b")
            await a.start(nursery)
            await b.start(nursery)
            route = group_route(
                [
                    entry(a),
                    entry(
                        b,
                        backup=True,
                        inject=Inject(header="x-api-key", token_file=str(missing)),
                    ),
                ],
                retry=RETRY_503,
            )
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                status, _, body = await client.request(b"GET", b"/x")
            nursery.cancel_scope.cancel()
    assert b.requests == []  # no key, no request: that part holds
    assert status >= 500
    assert b"backup-provider.key" not in body and str(tmp_path).encode() not in body


async def overflowing_retry_after(
    up: Upstream, req: Req, stream: trio.SocketStream
) -> Reply | None:
    return 503, [(b"retry-after", b"Mon, 01 Jan 99999999999 00:00:00 GMT")], b"busy"


async def test_a_retry_after_date_that_overflows_still_retries_on_another_upstream() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a", overflowing_retry_after), Upstream("b")
            await a.start(nursery)
            await b.start(nursery)
            route = group_route([entry(a), entry(b, backup=True)], retry=RETRY_503)
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                status, _, body = await client.request(b"GET", b"/x")
            nursery.cancel_scope.cancel()
    assert (status, body) == (200, b"b")


async def test_an_http_10_post_is_gathered_and_replayed_whole() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a", unavailable), Upstream("b", echo)
            await a.start(nursery)
            await b.start(nursery)
            route = group_route([entry(a), entry(b, backup=True)], retry=RETRY_503)
            proxy = await run_proxy(nursery, group_config([route]))
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)
            async with stream:
                await stream.send_all(b"POST /p HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")
                reply = bytearray()
                while chunk := await stream.receive_some(65536):  # 1.0: closed after it
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 200 ") or reply.startswith(b"HTTP/1.0 200 ")
            assert reply.endswith(b"\r\n\r\nb:hello")
            assert [r.body for r in a.requests] == [b"hello"]
            assert [r.body for r in b.requests] == [b"hello"]
            nursery.cancel_scope.cancel()


async def test_an_expect_continue_upload_is_not_retried_after_its_body_went() -> None:
    """``Expect: 100-continue``: the body is not gathered (the client waits for the 100),
    so a 503 after it is relayed, never replayed on the next upstream."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a", unavailable), Upstream("b", echo)
            await a.start(nursery)
            await b.start(nursery)
            route = group_route([entry(a), entry(b, backup=True)], retry=RETRY_503)
            proxy = await run_proxy(nursery, group_config([route]))
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)
            async with stream:
                await stream.send_all(
                    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                    b"Expect: 100-continue\r\n\r\n"
                )
                head = bytearray()
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(65536)
                assert head.startswith(b"HTTP/1.1 100 ")
                await stream.send_all(b"hello")
                responses = _Responses(stream)
                if rest := bytes(head).partition(b"\r\n\r\n")[2]:
                    responses.h11.receive_data(rest)  # (b"" would mean EOF to h11)
                assert await responses.next(b"POST") == (503, b"unavailable")
            assert [r.body for r in a.requests] == [b"hello"]
            assert b.requests == []
            nursery.cancel_scope.cancel()


async def test_a_chunked_body_in_hand_is_replayed_whole() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a", unavailable), Upstream("b", echo)
            await a.start(nursery)
            await b.start(nursery)
            route = group_route([entry(a), entry(b, backup=True)], retry=RETRY_503)
            proxy = await run_proxy(nursery, group_config([route]))
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)
            async with stream:
                await stream.send_all(
                    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\nX-Api-Key: smuggled\r\n\r\n"
                    b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
                )
                responses = _Responses(stream)
                assert await responses.next(b"POST") == (200, b"b:hello")
                status, _ = await responses.next(b"GET")
                assert status in (200, 503)
            posts = [r for r in a.requests + b.requests if r.method == b"POST"]
            assert [(r.upstream, r.body) for r in posts] == [("a", b"hello"), ("b", b"hello")]
            nursery.cancel_scope.cancel()


async def refuse_upgrade(up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
    return 403, [(b"content-type", b"text/plain")], b"no"


async def test_each_websocket_upgrade_carries_only_its_upstreams_credential(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REVIEW_KEY_A", KEY_A)
    monkeypatch.setenv("REVIEW_KEY_B", KEY_B)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a", refuse_upgrade), Upstream("b", refuse_upgrade)
            await a.start(nursery)
            await b.start(nursery)
            route = group_route(
                [
                    entry(a, inject=Inject(header="x-api-key", token_env="REVIEW_KEY_A")),
                    entry(
                        b,
                        inject=Inject(
                            header="Authorization", scheme="Bearer", token_env="REVIEW_KEY_B"
                        ),
                    ),
                ],
                balance="round_robin",
                websocket=True,
            )
            proxy = await run_proxy(nursery, group_config([route]))
            for _ in range(2):
                stream = await trio.open_tcp_stream(proxy.host, proxy.port)
                async with stream:
                    await stream.send_all(
                        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"x-api-key: client-key\r\nAuthorization: Bearer client\r\n\r\n"
                    )
                    reply = bytearray()
                    while chunk := await stream.receive_some(65536):
                        reply += chunk
                assert reply.startswith(b"HTTP/1.1 403 ")
            (to_a,), (to_b,) = a.requests, b.requests
            assert [v for n, v in to_a.headers if n == b"x-api-key"] == [KEY_A.encode()]
            assert to_a.header(b"authorization") is None
            assert [v for n, v in to_b.headers if n == b"authorization"] == [
                b"Bearer " + KEY_B.encode()
            ]
            assert to_b.header(b"x-api-key") is None
            nursery.cancel_scope.cancel()


async def test_a_single_upstreams_503_is_relayed_whatever_its_retry_after() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a = Upstream("a", overflowing_retry_after)
            await a.start(nursery)
            proxy = await run_proxy(nursery, group_config([group_route([entry(a)])]))
            async with await Client.open(proxy) as client:
                status, _, body = await client.request(b"GET", b"/x")
            nursery.cancel_scope.cancel()
    assert (status, body) == (503, b"busy")


async def test_the_asgi_front_end_runs_the_groups_health_checks() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = Upstream("a"), Upstream("b")
            await a.start(nursery)
            await b.start(nursery)
            a.health_status = 503
            check = HealthCheck(interval=0.05, timeout=1.0, unhealthy_threshold=1)
            route = group_route([entry(a), entry(b)], health_check=check)
            await start_app(nursery, ProxyApp(Config(routes=(route,))))

            async def checked() -> bool:
                return a.health_hits > 0 and b.health_hits > 0

            with trio.move_on_after(5) as waited:  # ~100 intervals
                await eventually(checked, within=6)
            nursery.cancel_scope.cancel()
    assert not waited.cancelled_caught, "no health check reached either upstream"
