"""Issue 10, sections 4 and 5, end to end: the forward-auth decision cache, hooks on
WebSocket upgrades, headers set by hooks, internal addresses in error bodies,
``serve --listen`` and ``ws://`` upstreams.

Real sockets on 127.0.0.1 (and 127.0.0.2 as a second client address); upstreams are
hypercorn apps (``tests/apps.py``, ``tests/ws_apps.py``) or raw socket servers where the
bytes an upstream received matter.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import h11
import pytest
import trio
import trustme

from proxycore import Config, Route, ServerSettings, serve
from proxycore.config import Inbound
from proxycore.proxy.asgi import ProxyApp
from proxycore.proxy.hooks import ExchangeInfo, Headers, Hooks, Request, Response
from proxycore.tools.sim import Receive, Scope, Send
from tests.apps import echo_app
from tests.e2e.test_asgi import free_port
from tests.e2e.test_tls import serve_tls_app, write_ca, write_cert
from tests.e2e.test_websocket import WsClient, http_handshake, ws_route
from tests.helpers import http_request, read_http_response, read_until, start_app, start_raw_server
from tests.ws_apps import WsUpstream, make_ws_headers_app, ws_echo_app

CAP: Final = 10.0
#: Starting a Python process (imports included) is slower than anything in-process.
PROCESS_CAP: Final = 60.0


async def start_proxy(
    nursery: trio.Nursery,
    routes: Sequence[Route],
    *,
    inbound: Inbound | None = None,
    hooks: Hooks | None = None,
) -> tuple[str, int]:
    config = Config(
        routes=tuple(routes),
        server=ServerSettings(listen=("127.0.0.1:0",)),
        inbound=inbound or Inbound(),
    )
    addresses: list[tuple[str, int]] = await nursery.start(
        functools.partial(serve, config, hooks=hooks)
    )
    return addresses[0]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The per-exchange access lines (not the WebSocket session lines)."""
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]
    return [line for line in lines if line.get("type") != "websocket"]


# =========================================================================== forward-auth cache


class AddressAuth:
    """An auth service deciding on the client address too: ``Cookie: session=good`` passes
    only from ``X-Forwarded-For: 127.0.0.1``; any request under ``/public/`` passes (with or
    without credentials); anything else is 401. ``calls`` holds each call's headers."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        headers = {bytes(n).decode().lower(): bytes(v).decode() for n, v in scope["headers"]}
        self.calls.append(headers)
        public = headers.get("x-forwarded-uri", "").startswith("/public/")
        good = "session=good" in headers.get("cookie", "")
        allowed = public or (good and headers.get("x-forwarded-for") == "127.0.0.1")
        status = 200 if allowed else 401
        extra = [(b"x-user", b"alice" if good else b"anonymous")] if allowed else []
        await send({"type": "http.response.start", "status": status, "headers": extra})
        await send({"type": "http.response.body", "body": b""})


async def start_auth_stack(
    nursery: trio.Nursery, *, cache_anonymous: bool = False
) -> tuple[tuple[str, int], AddressAuth]:
    up_host, up_port = await start_app(nursery, echo_app)
    auth = AddressAuth()
    auth_host, auth_port = await start_app(nursery, auth)
    inbound = Inbound(
        mode="forward_auth",
        url=f"http://{auth_host}:{auth_port}/verify",
        identity_headers=(("X-User", "X-Authenticated-User"),),
        cache_seconds=30,
        cache_anonymous=cache_anonymous,
    )
    proxy = await start_proxy(
        nursery, [Route("/", f"http://{up_host}:{up_port}/")], inbound=inbound
    )
    return proxy, auth


async def request_from(
    source_ip: str, proxy: tuple[str, int], target: str, headers: Sequence[tuple[str, str]] = ()
) -> int:
    """A GET from ``source_ip`` (a loopback address other than 127.0.0.1 works on Linux)."""
    sock = trio.socket.socket()
    await sock.bind((source_ip, 0))
    await sock.connect(proxy)
    async with trio.SocketStream(sock) as stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=target, headers=[("Host", "p"), *headers])
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status, _, _ = await read_http_response(stream)
    return status


async def test_forward_auth_cache_is_keyed_on_the_client_address() -> None:
    cookie = [("Cookie", "session=good")]
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            proxy, auth = await start_auth_stack(nursery)
            assert await request_from("127.0.0.1", proxy, "/x", cookie) == 200
            assert await request_from("127.0.0.1", proxy, "/x", cookie) == 200
            assert len(auth.calls) == 1  # the cache answered the second
            # Same cookie, method, host and URI, another client: the service decides again.
            assert await request_from("127.0.0.2", proxy, "/x", cookie) == 401
            assert [c["x-forwarded-for"] for c in auth.calls] == ["127.0.0.1", "127.0.0.2"]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("cache_anonymous", "calls"), [(False, 3), (True, 1)])
async def test_forward_auth_caches_decisions_without_credentials_only_if_configured(
    cache_anonymous: bool, calls: int
) -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            proxy, auth = await start_auth_stack(nursery, cache_anonymous=cache_anonymous)
            for _ in range(3):
                assert await request_from("127.0.0.1", proxy, "/public/x") == 200
            assert len(auth.calls) == calls
            assert all("cookie" not in c and "authorization" not in c for c in auth.calls)
            nursery.cancel_scope.cancel()


# =========================================================================== hooks on upgrades


async def test_a_hook_refusing_everything_refuses_websocket_upgrades() -> None:
    async def refuse(request: Request) -> Response:
        return Response(403, [(b"Content-Type", b"text/plain")], b"refused by the hook")

    upstream = WsUpstream()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_port = await upstream.start(nursery)
            proxy = await start_proxy(nursery, [ws_route(up_port)], hooks=Hooks(on_request=refuse))
            status, headers, body = await http_handshake(proxy, b"/ws/x")
            assert (status, body) == (403, b"refused by the hook")
            assert (b"connection", b"close") in headers
            assert upstream.sessions == 0
            nursery.cancel_scope.cancel()


async def test_hooks_change_the_upgrade_handshakes_both_ways() -> None:
    async def tag(request: Request) -> None:
        request.headers.append((b"X-Hooked", b"yes"))

    statuses: list[int] = []

    async def head(info: ExchangeInfo, status: int, headers: Headers) -> None:
        statuses.append(status)
        headers.append((b"X-Head-Hook", b"seen"))

    hooks = Hooks(on_request=tag, on_response_head=head)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            _, up_port = await start_app(nursery, make_ws_headers_app())
            proxy = await start_proxy(nursery, [ws_route(up_port)], hooks=hooks)
            async with WsClient(nursery, proxy) as ws:
                message = await ws.get_message()
                assert isinstance(message, str)
                seen = {name.lower(): value for name, value in json.loads(message)["headers"]}
                assert seen.get("x-hooked") == "yes"  # on_request's headers went upstream
                reply = {bytes(n).lower(): bytes(v) for n, v in ws.handshake_headers}
                assert reply.get(b"x-head-hook") == b"seen"  # on_response_head saw the 101
            assert statuses == [101]
            nursery.cancel_scope.cancel()


# =========================================================================== hook-set headers


async def add_header(name: bytes, value: bytes, request: Request) -> None:
    request.headers.append((name, value))


async def answer_with(name: bytes, value: bytes, request: Request) -> Response:
    return Response(200, [(name, value)], b"answer")


async def add_response_header(
    name: bytes, value: bytes, info: ExchangeInfo, status: int, headers: Headers
) -> None:
    headers.append((name, value))


CRLF_VALUE: Final = b"a\r\nInjected: 1"
BAD_HEADERS: Final = {
    "request-crlf": ("on_request", b"X-Evil", CRLF_VALUE),
    "request-lf": ("on_request", b"X-Evil", b"a\nInjected: 1"),
    "request-nul": ("on_request", b"X-Evil", b"a\x00Injected"),
    "request-ctl": ("on_request", b"X-Evil", b"a\x01Injected"),
    "request-name": ("on_request", b"X-Evil: x\r\nInjected", b"1"),
    "request-space": ("on_request", b"X Injected", b"1"),
    "answer-crlf": ("answer", b"X-Evil", CRLF_VALUE),
    "answer-name": ("answer", b"Injected:", b"1"),
    "response-crlf": ("on_response_head", b"X-Evil", CRLF_VALUE),
    "response-name": ("on_response_head", b"Injected\r\n", b"1"),
}


def bad_hooks(where: str, name: bytes, value: bytes) -> Hooks:
    if where == "on_request":
        return Hooks(on_request=functools.partial(add_header, name, value))
    if where == "answer":
        return Hooks(on_request=functools.partial(answer_with, name, value))
    return Hooks(on_response_head=functools.partial(add_response_header, name, value))


async def raw_exchange(proxy: tuple[str, int], request: bytes) -> bytes:
    """Send ``request`` (with ``Connection: close``) and return every byte until EOF."""
    async with await trio.open_tcp_stream(*proxy) as stream:
        await stream.send_all(request)
        got = b""
        while data := await stream.receive_some(65536):
            got += data
    return got


def parse_response(data: bytes) -> tuple[int, bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "p")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    status, body = 0, b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, body
        else:
            raise AssertionError(f"unexpected {event!r}")


@pytest.mark.parametrize(("where", "name", "value"), BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
async def test_invalid_headers_from_hooks_are_a_500_never_bytes_on_the_wire(
    caplog: pytest.LogCaptureFixture, where: str, name: bytes, value: bytes
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore")
    received: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        received.append(await read_until(stream, b"\r\n\r\n"))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    request = b"GET /x HTTP/1.1\r\nHost: p\r\nX-Request-ID: hdr-1\r\nConnection: close\r\n\r\n"
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_port = await start_raw_server(nursery, upstream)
            route = Route("/", f"http://127.0.0.1:{up_port}/")
            proxy = await start_proxy(nursery, [route], hooks=bad_hooks(where, name, value))
            data = await raw_exchange(proxy, request)
            nursery.cancel_scope.cancel()
    assert b"Injected" not in data
    assert all(b"Injected" not in head for head in received)
    if where != "on_response_head":
        assert received == []  # refused before the upstream was asked
    status, body = parse_response(data)
    assert status == 500
    error = json.loads(body)["error"]
    assert (error["type"], error["request_id"]) == ("internal_error", "hdr-1")
    hook = "on_request" if where == "answer" else where
    assert error["message"] == f"the {hook} hook set an invalid header"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "invalid header" in errors[0].getMessage()
    assert "hdr-1" in errors[0].getMessage()
    assert "Injected" not in caplog.text  # the log says what is wrong, not what was set


async def test_hook_headers_with_htab_and_obs_text_pass() -> None:
    async def tag(request: Request) -> None:
        request.headers.append((b"X-Tabbed", b"a\tb \xe9"))

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            route = Route("/", f"http://{up_host}:{up_port}/")
            proxy = await start_proxy(nursery, [route], hooks=Hooks(on_request=tag))
            status, _, body = await http_request(*proxy, "GET", "/x")
            nursery.cancel_scope.cancel()
    assert status == 200
    assert ["x-tabbed", "a\tb \xe9"] in json.loads(body)["headers"]


async def test_a_hook_answer_with_a_1xx_status_is_a_500() -> None:
    async def switch(request: Request) -> Response:
        return Response(101, [(b"Upgrade", b"websocket")])

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            route = Route("/", f"http://{up_host}:{up_port}/")
            proxy = await start_proxy(nursery, [route], hooks=Hooks(on_request=switch))
            status, _, body = await http_request(*proxy, "GET", "/x")
            nursery.cancel_scope.cancel()
    assert status == 500
    assert json.loads(body)["error"]["type"] == "internal_error"


async def test_asgi_app_validates_hook_headers_too() -> None:
    hooks = Hooks(on_request=functools.partial(add_header, b"X-Evil", CRLF_VALUE))
    received: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        received.append(await read_until(stream, b"\r\n\r\n"))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_port = await start_raw_server(nursery, upstream)
            config = Config(routes=(Route("/", f"http://127.0.0.1:{up_port}/"),))
            host, port = await start_app(nursery, ProxyApp(config, hooks=hooks))
            status, _, body = await http_request(host, port, "GET", "/x")
            nursery.cancel_scope.cancel()
    assert status == 500 and received == []
    assert json.loads(body)["error"]["message"] == "the on_request hook set an invalid header"


# =========================================================================== error bodies


def assert_hides(body: bytes, *secrets: bytes) -> dict[str, Any]:
    """A JSON error body that names none of ``secrets``; the error object."""
    for secret in secrets:
        assert secret not in body, body
    error: dict[str, Any] = json.loads(body)["error"]
    return error


async def test_connect_errors_name_the_route_and_log_the_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.access")
    port = free_port()
    address = f"127.0.0.1:{port}"
    routes = [
        Route("/api/", f"http://{address}/", name="api"),
        Route("/ws/", f"http://{address}/", name="chat", websocket=True),
    ]
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, routes)
            rid = [("X-Request-ID", "leak-1")]
            status, _, body = await http_request(*proxy, "GET", "/api/x", rid)
            ws_status, _, ws_body = await http_handshake(
                proxy, b"/ws/x", b"X-Request-ID: leak-2\r\n"
            )
            nursery.cancel_scope.cancel()
    assert status == ws_status == 502
    secrets = (b"127.0.0.1", str(port).encode())
    error = assert_hides(body, *secrets)
    assert error["type"] == "upstream_unreachable"
    assert "'api'" in error["message"] and "refused" in error["message"].lower()
    assert "'chat'" in assert_hides(ws_body, *secrets)["message"]
    lines = {line["request_id"]: line for line in access_lines(caplog)}
    for rid_value in ("leak-1", "leak-2"):
        assert address in lines[rid_value]["detail"]
        assert lines[rid_value]["outcome"] == "upstream_connect_error"


async def test_asgi_connect_errors_name_the_route_and_log_the_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.access")
    port = free_port()
    app = ProxyApp(Config(routes=(Route("/", f"http://127.0.0.1:{port}/", name="api"),)))
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            host, proxy_port = await start_app(nursery, app)
            rid = [("X-Request-ID", "leak-3")]
            status, _, body = await http_request(host, proxy_port, "GET", "/x", rid)
            nursery.cancel_scope.cancel()
    assert status == 502
    assert "'api'" in assert_hides(body, b"127.0.0.1", str(port).encode())["message"]
    (line,) = access_lines(caplog)
    assert f"127.0.0.1:{port}" in line["detail"]


async def test_tls_errors_do_not_quote_the_upstream_address(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = write_cert(tmp_path, ca, "upstream.test")  # not valid for 127.0.0.1
    ca_file = str(write_ca(tmp_path, ca))
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_port: int = await nursery.start(serve_tls_app, echo_app, pem)
            upstream = f"https://127.0.0.1:{up_port}/"
            routes = [
                Route("/api/", upstream, name="api", ca_file=ca_file),
                Route("/ws/", upstream, name="chat", websocket=True, ca_file=ca_file),
            ]
            proxy = await start_proxy(nursery, routes)
            status, _, body = await http_request(*proxy, "GET", "/api/x")
            ws_status, _, ws_body = await http_handshake(proxy, b"/ws/x")
            nursery.cancel_scope.cancel()
    assert status == ws_status == 502
    for raw in (body, ws_body):
        message = assert_hides(raw, b"127.0.0.1", str(up_port).encode())["message"]
        assert "TLS" in message and "mismatch" in message, message


# =========================================================================== serve --listen


async def test_serve_routes_listens_where_listen_says(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PC_LISTEN_TEST_TOKEN": "tok-listen"}
    with trio.fail_after(PROCESS_CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            routes = tmp_path / "routes.json"
            entry = {
                "path": "/local/",
                "upstream": f"http://{up_host}:{up_port}/",
                "auth_scheme": "Bearer",
                "token_env": "PC_LISTEN_TEST_TOKEN",
            }
            routes.write_text(json.dumps({"routes": [entry]}))
            cmd = [sys.executable, "-m", "proxycore", "serve", "--routes", str(routes)]
            cmd += ["--listen", f"127.0.0.1:{port}", "--no-access-log"]
            process = await trio.lowlevel.open_process(cmd, env=env, stderr=subprocess.DEVNULL)
            try:
                while True:
                    assert process.returncode is None, "the proxy exited"
                    try:
                        status, _, body = await http_request("127.0.0.1", port, "GET", "/local/x")
                        break
                    except OSError:
                        await trio.sleep(0.05)
            finally:
                process.terminate()
                with trio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            nursery.cancel_scope.cancel()
    assert status == 200
    echoed = json.loads(body)
    assert echoed["path"] == "/x"
    assert ["authorization", "Bearer tok-listen"] in echoed["headers"]


# =========================================================================== ws:// upstreams


async def test_ws_scheme_upstream_works_on_a_websocket_route() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, ws_echo_app)
            route = Route("/ws/", f"ws://{up_host}:{up_port}/", websocket=True)
            proxy = await start_proxy(nursery, [route])
            async with WsClient(nursery, proxy) as ws:
                await ws.send_message("over ws://")
                assert await ws.get_message() == "over ws://"
                await ws.send_message(b"\x00binary")
                assert await ws.get_message() == b"\x00binary"
            nursery.cancel_scope.cancel()
