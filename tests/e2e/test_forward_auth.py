"""End-to-end forward authentication: the proxy asks a real (hypercorn-served) auth service
about each request and passes the identity it answers on as ``X-Authenticated-User``.

The auth service (:class:`AuthService`) decides from the credentials it is given:

* ``Cookie: session=good`` or ``Authorization: Bearer good`` -> 200 with
  ``X-User-Email: alice@example.com``;
* ``session=banned`` -> 403; ``session=boom`` -> 500; ``session=slow`` -> sleeps 10 s first;
* anything else -> 401.

It records the headers of every call. Tests where time matters use the real clock with
short timeouts (never ``autojump_clock``: it jumps while real socket I/O is in flight)
and assert elapsed times only from below.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Sequence
from typing import Any, Final

import trio

from proxycore import Config, Route, ServerSettings, serve
from proxycore.config import Inbound
from proxycore.tools.sim import Receive, Scope, Send
from tests.apps import echo_app
from tests.helpers import http_request, start_app, start_raw_server

Headers = list[tuple[bytes, bytes]]
HeaderList = list[tuple[str, str]]

ALICE: Final = "alice@example.com"
IDENTITY: Final = "x-authenticated-user"
GOOD_COOKIE: Final = ("Cookie", "theme=dark; session=good")


class AuthService:
    """The ASGI auth service; ``calls`` holds each call's path and headers (lower-case)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, list[str]]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(bytes(name).decode().lower(), []).append(bytes(value).decode())
        self.calls.append((scope["path"], headers))
        cookies = {c.strip() for v in headers.get("cookie", []) for c in v.split(";")}
        authorization = headers.get("authorization", [""])[0]
        if "session=slow" in cookies:
            await trio.sleep(10)
        extra: Headers = []
        if "session=boom" in cookies:
            status = 500
        elif "session=banned" in cookies:
            status = 403
        elif "session=good" in cookies or authorization == "Bearer good":
            status = 200
            extra.append((b"x-user-email", ALICE.encode()))
        else:
            status = 401
        body = b'{"decided": true}'
        head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": head + extra})
        await send({"type": "http.response.body", "body": body})


class CountingEcho:
    """``echo_app`` that counts the HTTP requests it serves."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests += 1
        await echo_app(scope, receive, send)


async def start_stack(
    nursery: trio.Nursery,
    *,
    auth_url: str | None = None,
    cache_seconds: float = 0.0,
    login_url: str | None = "/login",
    auth_timeout: float | None = None,
) -> tuple[str, int, AuthService, CountingEcho]:
    """echo upstream + auth service + proxy in forward_auth mode; ``(host, port, auth, app)``."""
    app = CountingEcho()
    up_host, up_port = await start_app(nursery, app)
    auth = AuthService()
    if auth_url is None:
        auth_host, auth_port = await start_app(nursery, auth)
        auth_url = f"http://{auth_host}:{auth_port}/verify"
    inbound = Inbound(
        mode="forward_auth",
        url=auth_url,
        identity_headers=(("X-User-Email", "X-Authenticated-User"),),
        login_url=login_url,
        cache_seconds=cache_seconds,
    )
    if auth_timeout is not None:
        inbound = dataclasses.replace(inbound, timeout=auth_timeout)
    config = Config(
        routes=(Route("/", f"http://{up_host}:{up_port}/"),),
        server=ServerSettings(listen=("127.0.0.1:0",)),
        inbound=inbound,
    )
    addresses: list[tuple[str, int]] = await nursery.start(serve, config)
    host, port = addresses[0]
    return host, port, auth, app


def header(headers: Headers, name: bytes) -> bytes | None:
    values = [v for n, v in headers if n.lower() == name]
    return values[0] if values else None


def error_type(response: tuple[int, Headers, bytes], expected: int) -> str:
    """The ``type`` of a proxy-made JSON error with status ``expected``."""
    status, headers, body = response
    assert status == expected, (status, body)
    assert header(headers, b"content-type") == b"application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"type", "message", "request_id"}
    kind = error["type"]
    assert isinstance(kind, str)
    return kind


def echoed(response: tuple[int, Headers, bytes]) -> dict[str, Any]:
    status, _, body = response
    assert status == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


def values(echo: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in echo["headers"] if n == name]


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def get(
    host: str, port: int, target: str, headers: Sequence[tuple[str, str]] = ()
) -> tuple[int, Headers, bytes]:
    return await http_request(host, port, "GET", target, headers)


# =========================================================================== admitted


async def test_valid_session_passes_identity_and_forwarded_headers() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, auth, _ = await start_stack(nursery)
            sent = [("Host", "app.example:8443"), GOOD_COOKIE]
            by_cookie = echoed(await get(host, port, "/docs/page?q=1&r=2", sent))
            by_bearer = echoed(
                await http_request(
                    host, port, "POST", "/api/items", [("Authorization", "Bearer good")], b"{}"
                )
            )
            nursery.cancel_scope.cancel()
    assert values(by_cookie, IDENTITY) == [ALICE]
    assert values(by_bearer, IDENTITY) == [ALICE]
    assert by_cookie["path"] == "/docs/page"
    assert by_bearer["method"] == "POST" and by_bearer["body_len"] == 2
    assert len(auth.calls) == 2
    (path, first), (_, second) = auth.calls
    assert path == "/verify"
    assert first["x-forwarded-method"] == ["GET"]
    assert first["x-forwarded-uri"] == ["/docs/page?q=1&r=2"]
    assert first["x-forwarded-host"] == ["app.example:8443"]
    assert first["x-forwarded-proto"] == ["http"]
    assert first["x-forwarded-for"] == ["127.0.0.1"]
    assert first["cookie"] == ["theme=dark; session=good"]
    assert "authorization" not in first
    assert second["x-forwarded-method"] == ["POST"]
    assert second["x-forwarded-uri"] == ["/api/items"]
    assert second["authorization"] == ["Bearer good"]
    assert "cookie" not in second


# =========================================================================== refused


async def test_invalid_credentials_are_401_and_banned_is_403() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, auth, app = await start_stack(nursery)
            anonymous = await get(host, port, "/x")
            bad_cookie = await get(host, port, "/x", [("Cookie", "session=bad")])
            bad_bearer = await get(host, port, "/x", [("Authorization", "Bearer bad")])
            banned = await get(host, port, "/x", [("Cookie", "session=banned")])
            nursery.cancel_scope.cancel()
    for response in (anonymous, bad_cookie, bad_bearer):
        assert error_type(response, 401) == "unauthorized"
    assert error_type(banned, 403) == "forbidden"
    assert len(auth.calls) == 4
    assert app.requests == 0


async def test_browser_get_is_redirected_to_login_but_post_is_401() -> None:
    html = ("Accept", "text/html,application/xhtml+xml;q=0.9")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _, app = await start_stack(nursery, login_url="/login")
            browser = await get(host, port, "/x", [html])
            api = await get(host, port, "/x", [("Accept", "application/json")])
            post = await http_request(host, port, "POST", "/x", [html], b"form=1")
            nursery.cancel_scope.cancel()
    status, headers, _ = browser
    assert status == 302
    assert header(headers, b"location") == b"/login"
    assert error_type(api, 401) == "unauthorized"
    assert error_type(post, 401) == "unauthorized"
    assert app.requests == 0


# =========================================================================== fail closed


async def test_auth_service_down_is_503() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = f"http://127.0.0.1:{free_port()}/verify"
            host, port, _, app = await start_stack(nursery, auth_url=url)
            response = await get(host, port, "/x", [GOOD_COOKIE])
            nursery.cancel_scope.cancel()
    assert error_type(response, 503) == "auth_unavailable"
    assert app.requests == 0


async def test_auth_service_slower_than_timeout_is_503() -> None:
    """``Inbound.timeout`` bounds the call: 503 at the timeout, well before the service's
    10 s answer (the 8 s cap would fail a proxy that waited for it)."""
    assert Inbound().timeout == 5.0
    timeout = 0.3
    with trio.fail_after(8):
        async with trio.open_nursery() as nursery:
            host, port, auth, app = await start_stack(nursery, auth_timeout=timeout)
            start = trio.current_time()
            response = await get(host, port, "/x", [("Cookie", "session=slow; session=good")])
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
    assert error_type(response, 503) == "auth_unavailable"
    assert elapsed >= timeout
    assert len(auth.calls) == 1
    assert app.requests == 0


async def test_auth_service_error_is_503() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, auth, app = await start_stack(nursery)
            response = await get(host, port, "/x", [("Cookie", "session=boom; session=good")])
            nursery.cancel_scope.cancel()
    assert error_type(response, 503) == "auth_unavailable"
    assert len(auth.calls) == 1
    assert app.requests == 0


# =========================================================================== cache


async def test_decisions_are_cached_per_credentials() -> None:
    """Within ``cache_seconds`` the same credentials are not asked again, other ones are;
    after it they are asked again."""
    cache = 1.0
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, auth, _ = await start_stack(nursery, cache_seconds=cache)
            first = echoed(await get(host, port, "/a", [GOOD_COOKIE]))
            calls_after_first = len(auth.calls)
            cached = echoed(await get(host, port, "/a", [GOOD_COOKIE]))
            calls_after_cached = len(auth.calls)
            other = echoed(await get(host, port, "/a", [("Authorization", "Bearer good")]))
            calls_before_expiry = len(auth.calls)
            await trio.sleep(cache + 0.1)
            expired = echoed(await get(host, port, "/a", [GOOD_COOKIE]))
            calls_after_expiry = len(auth.calls)
            nursery.cancel_scope.cancel()
    for echo in (first, cached, other, expired):
        assert values(echo, IDENTITY) == [ALICE]
    assert calls_after_first == 1
    assert calls_after_cached == 1  # served from the cache
    assert calls_before_expiry == 2  # other credentials: asked
    assert calls_after_expiry == 3


# =========================================================================== identity


async def test_client_identity_header_is_replaced_by_the_services() -> None:
    spoofed = [
        GOOD_COOKIE,
        ("X-Authenticated-User", "mallory@example.com"),
        ("x_authenticated_user", "mallory@example.com"),
        ("X-User-Email", "mallory@example.com"),
    ]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _, _ = await start_stack(nursery)
            echo = echoed(await get(host, port, "/x", spoofed))
            nursery.cancel_scope.cancel()
    assert values(echo, IDENTITY) == [ALICE]
    names = [n.replace("_", "-") for n, _ in echo["headers"]]
    assert names.count(IDENTITY) == 1
    assert "mallory" not in json.dumps([v for n, v in echo["headers"] if n != "x-user-email"])


# =========================================================================== robustness


async def test_stale_pooled_auth_connection_is_retried_not_503() -> None:
    """The auth service closes a pooled keep-alive connection just as the proxy reuses it
    (the request was sent, no response byte came back). That is a keep-alive race, not an
    answer: like an upstream request (``net.pool.with_stale_retry``), the idempotent
    auth GET is retried once on a fresh connection instead of failing the client with 503."""
    requests_per_connection: list[int] = []

    async def auth(stream: trio.SocketStream) -> None:
        index = len(requests_per_connection)
        requests_per_connection.append(0)
        buf = b""
        while data := await stream.receive_some(65536):
            buf += data
            while b"\r\n\r\n" in buf:
                _, buf = buf.split(b"\r\n\r\n", 1)
                requests_per_connection[index] += 1
                if requests_per_connection[index] == 2:
                    return  # the service's idle close races with the reuse
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nX-User-Email: alice@example.com\r\n"
                    b"Content-Length: 0\r\n\r\n"
                )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            auth_port = await start_raw_server(nursery, auth)
            url = f"http://127.0.0.1:{auth_port}/verify"
            host, port, _, app = await start_stack(nursery, auth_url=url)
            first = await get(host, port, "/x", [GOOD_COOKIE])
            second = await get(host, port, "/x", [GOOD_COOKIE])
            nursery.cancel_scope.cancel()
    assert values(echoed(first), IDENTITY) == [ALICE]
    assert second[0] == 200, second[2]
    assert values(echoed(second), IDENTITY) == [ALICE]
    assert requests_per_connection == [2, 1]
    assert app.requests == 2
