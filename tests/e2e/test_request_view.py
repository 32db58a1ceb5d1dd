"""End to end: every decision is made on the request the upstream will act on.

Routing, policy, auth, hooks, the access log and the forwarded target all use the one
normalized view (proxycore.http.target.parse_target); repeated singleton fields, a bad Host,
TRACE/CONNECT and client-supplied forwarding headers are refused or dropped; only a
trusted proxy may say who the client is.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import pytest
import trio

from proxycore import Config, Inject, Route, ServerSettings, serve
from proxycore.config import Inbound, RateLimit
from proxycore.proxy.hooks import Hooks, Request, Response
from proxycore.security.secrets import generate_secret
from tests.e2e.test_forward_auth import AuthService
from tests.e2e.test_smuggling import RecordingUpstream, read_to_eof
from tests.helpers import start_app, start_raw_server

LOCAL = ServerSettings(listen=("127.0.0.1:0",))


async def start(nursery: trio.Nursery, config: Config, hooks: Hooks | None = None) -> int:
    addresses: list[tuple[str, int]] = await nursery.start(partial(serve, config, hooks=hooks))
    return addresses[0][1]


async def raw(port: int, data: bytes) -> bytes:
    """``data`` on a fresh connection; everything the proxy sends until it closes."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(data)
        return await read_to_eof(stream)


def get(target: bytes, *lines: bytes, method: bytes = b"GET") -> bytes:
    extra = b"".join(line + b"\r\n" for line in lines)
    return (
        method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"Connection: close\r\n\r\n"
    )


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def error_type(reply: bytes) -> str:
    body = reply.partition(b"\r\n\r\n")[2]
    error: dict[str, str] = json.loads(body)["error"]
    assert error["request_id"]
    return error["type"]


def last_head(up: RecordingUpstream) -> bytes:
    """The head of the last request the upstream got (connections are reused)."""
    heads = bytes(up.conns[-1].received).split(b"\r\n\r\n")[:-1]
    return heads[-1]


def forwarded_target(up: RecordingUpstream) -> bytes:
    return last_head(up).split(b" ", 2)[1]


def forwarded_headers(up: RecordingUpstream) -> list[tuple[bytes, bytes]]:
    head = last_head(up)
    fields = [line.partition(b":") for line in head.split(b"\r\n")[1:]]
    return [(n.strip().lower(), v.strip()) for n, _, v in fields]


# =========================================================================== one view


async def test_percent_encoded_path_cannot_reach_a_protected_route_unauthenticated(
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / "inbound.secret"
    generate_secret(str(secret_file))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            routes = (Route("/admin/", up.url), Route("/", up.url, inbound="none"))
            inbound = Inbound(mode="bearer", secret_file=str(secret_file))
            port = await start(nursery, Config(routes=routes, server=LOCAL, inbound=inbound))
            for target in (
                b"/%61dmin/x",
                b"/%41dmin/x".replace(b"%41", b"%61"),
                b"//admin/x",
                b"/admin;v=1/x",
                b"/%61dmin%2fx",
            ):
                reply = await raw(port, get(target))
                assert status_of(reply) in (400, 401), (target, reply)
            assert up.conns == []
            reply = await raw(port, get(b"/%70ublic/x"))
            assert status_of(reply) == 200
            assert forwarded_target(up) == b"/public/x"
            nursery.cancel_scope.cancel()


async def test_deny_paths_see_params_and_encodings() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            route = Route("/", up.url, deny_paths=("/internal/*",))
            port = await start(nursery, Config(routes=(route,), server=LOCAL))
            for target in (
                b"/internal;v=1/x",
                b"/%69nternal/x",
                b"//internal//x",
                b"/internal;/x;y",
            ):
                reply = await raw(port, get(target))
                assert status_of(reply) == 403, (target, reply)
                assert error_type(reply) == "forbidden"
            assert up.conns == []
            nursery.cancel_scope.cancel()


async def test_forwarded_target_is_the_normalized_view() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            routes = (
                Route("/v1/", up.url + "api/"),
                Route("/keep/", up.url, strip_prefix=False, merge_slashes=False),
            )
            port = await start(nursery, Config(routes=routes, server=LOCAL))
            cases = [
                (b"//v1///%63hat;p=%2e?q=%41", b"/api/chat;p=.?q=%41"),
                (b"/v1/a%3fb/caf%c3%a9", b"/api/a%3Fb/caf%C3%A9"),
                (b"/keep//a///b/", b"/keep//a///b/"),
            ]
            for target, expected in cases:
                assert status_of(await raw(port, get(target))) == 200
                assert forwarded_target(up) == expected
            nursery.cancel_scope.cancel()


async def test_encoded_slash_is_400_unless_the_route_allows_it() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            routes = (
                Route("/files/", up.url, allow_encoded_slashes=True, strip_prefix=False),
                Route("/", up.url),
            )
            port = await start(nursery, Config(routes=routes, server=LOCAL))
            for target in (b"/a%2Fb", b"/a%2fb", b"/a%5Cb", b"/a;x=%2F"):
                reply = await raw(port, get(target))
                assert status_of(reply) == 400 and error_type(reply) == "bad_request"
            assert up.conns == []
            assert status_of(await raw(port, get(b"/files/a%2fb"))) == 200
            assert forwarded_target(up) == b"/files/a%2Fb"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "target",
    [b"/%00", b"/a%0d%0aX:%20y", b"/%c0%ae%c0%ae/x", b"/..;/x", b"/a/.;x/b", b"/%ff", b"/a\\b"],
)
async def test_unsafe_targets_are_400_and_never_forwarded(target: bytes) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            port = await start(nursery, Config(routes=(Route("/", up.url),), server=LOCAL))
            reply = await raw(port, get(target))
            assert status_of(reply) == 400, reply
            assert up.conns == []
            nursery.cancel_scope.cancel()


async def test_hook_and_access_log_see_the_view(caplog: pytest.LogCaptureFixture) -> None:
    """The README's hook example refuses /v1/admin: /v1/%61dmin/x must not pass it."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    seen: list[str] = []

    async def on_request(request: Request) -> Response | None:
        seen.append(request.path)
        if request.path.startswith("/v1/admin"):
            return Response(403, [(b"Content-Type", b"text/plain")], b"no")
        return None

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            config = Config(routes=(Route("/v1/", up.url),), server=LOCAL)
            port = await start(nursery, config, Hooks(on_request=on_request))
            for target in (b"/v1/%61dmin/x", b"/v1//admin/x", b"/v1/admin;x/y"):
                assert status_of(await raw(port, get(target))) == 403
            assert up.conns == []
            nursery.cancel_scope.cancel()
    assert seen == ["/v1/admin/x", "/v1/admin/x", "/v1/admin/y"]
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]
    assert [line["path"] for line in logged] == seen


async def test_forward_auth_is_asked_about_the_normalized_uri() -> None:
    auth = AuthService()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            auth_host, auth_port = await start_app(nursery, auth)
            inbound = Inbound(mode="forward_auth", url=f"http://{auth_host}:{auth_port}/verify")
            config = Config(routes=(Route("/", up.url),), server=LOCAL, inbound=inbound)
            port = await start(nursery, config)
            request = get(b"//%61pi;v=1/x?q=1", b"Authorization: Bearer good")
            reply = await raw(port, request.replace(b"Host: x", b"Host: status.example.com"))
            assert status_of(reply) == 200
            nursery.cancel_scope.cancel()
    (_, headers), *_ = auth.calls
    # The auth service decides on the view (params dropped, as Tomcat/Spring serve it).
    assert headers["x-forwarded-uri"] == ["/api/x?q=1"]
    assert headers["x-forwarded-host"] == ["status.example.com"]  # validated, as sent
    assert forwarded_target(up) == b"/api;v=1/x?q=1"


# =========================================================================== the head


@pytest.mark.parametrize(
    "lines",
    [
        (b"Authorization: Bearer a", b"Authorization: Bearer b"),
        (b"Authorization: Bearer a", b"authorization: Bearer a"),
        (b"Proxy-Authorization: Basic a", b"Proxy-Authorization: Basic b"),
        (b"X-Api-Key: a", b"x-api-key: b"),
        (b"X-Api-Key: a", b"X_Api_Key: b"),
    ],
)
async def test_singleton_fields_sent_twice_are_400(
    lines: tuple[bytes, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PC_VIEW_KEY", "sk-test")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            inject = Inject(header="x-api-key", token_env="PC_VIEW_KEY")
            port = await start(
                nursery, Config(routes=(Route("/", up.url, inject=inject),), server=LOCAL)
            )
            reply = await raw(port, get(b"/x", *lines))
            assert status_of(reply) == 400 and error_type(reply) == "bad_request"
            assert b"sk-test" not in reply
            assert up.conns == []
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "host", [b"a/b", b"user@evil.example", b"a b", b"evil:", b"[::1", b"a:99999999"]
)
async def test_invalid_host_is_400_and_close(host: bytes) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            port = await start(nursery, Config(routes=(Route("/", up.url),), server=LOCAL))
            request = b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
            reply = await raw(port, request)  # no Connection: close: the proxy closes
            head = reply.partition(b"\r\n\r\n")[0]
            assert status_of(reply) == 400
            assert b"\r\nConnection: close" in head
            assert up.conns == []
            nursery.cancel_scope.cancel()


async def test_trace_never_reaches_the_upstream_unless_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PC_VIEW_KEY", "sk-test")
    inject = Inject(header="Authorization", scheme="Bearer", token_env="PC_VIEW_KEY")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            routes = (
                Route("/open/", up.url, methods=("GET", "TRACE")),
                Route("/", up.url, inject=inject),
            )
            port = await start(nursery, Config(routes=routes, server=LOCAL))
            for method, target in ((b"TRACE", b"/x"), (b"CONNECT", b"/x")):
                reply = await raw(port, get(target, method=method))
                assert status_of(reply) == 405, reply
                assert b"\r\nAllow: " in reply.partition(b"\r\n\r\n")[0]
                assert b"sk-test" not in reply
            assert up.conns == []
            assert status_of(await raw(port, get(b"/open/x", method=b"TRACE"))) == 200
            nursery.cancel_scope.cancel()


async def test_client_forwarding_headers_are_dropped() -> None:
    sent = [
        b"Forwarded: for=6.6.6.6;host=evil",
        b"X-Real-IP: 6.6.6.6",
        b"X-Forwarded-For: 6.6.6.6",
        b"X-Forwarded-Port: 1",
        b"X-Forwarded-Prefix: /admin",
        b"X-Original-URL: /admin",
        b"X-Rewrite-URL: /admin",
        b"X-HTTP-Method-Override: DELETE",
    ]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            port = await start(nursery, Config(routes=(Route("/", up.url),), server=LOCAL))
            assert status_of(await raw(port, get(b"/x", *sent))) == 200
            nursery.cancel_scope.cancel()
    headers = forwarded_headers(up)
    assert b"6.6.6.6" not in b"".join(v for _, v in headers)
    assert b"/admin" not in b"".join(v for _, v in headers)
    assert (b"x-forwarded-for", b"127.0.0.1") in headers
    names = {n for n, _ in headers}
    assert not names & {b"forwarded", b"x-real-ip", b"x-http-method-override", b"x-original-url"}


async def test_trusted_proxy_supplies_the_client_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Peer 127.0.0.1 is trusted: the client is the last untrusted hop, for the access
    log, the upstream chain and the per-client rate limit."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    server = ServerSettings(listen=("127.0.0.1:0",), trusted_proxies=("127.0.0.0/8", "10.0.0.0/8"))
    limit = RateLimit(requests_per_second=0.001, burst=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            route = Route("/", up.url, rate_limit=limit)
            port = await start(nursery, Config(routes=(route,), server=server))
            xff = b"X-Forwarded-For: 6.6.6.6, 198.51.100.1, 10.0.0.9"
            assert status_of(await raw(port, get(b"/a", xff))) == 200
            chain = dict(forwarded_headers(up))[b"x-forwarded-for"]
            assert chain == b"198.51.100.1, 10.0.0.9, 127.0.0.1"  # the client's claims cut
            # The same client again is limited; another client behind the same proxy is not.
            assert status_of(await raw(port, get(b"/b", xff))) == 429
            other = b"X-Forwarded-For: 198.51.100.2"
            assert status_of(await raw(port, get(b"/c", other))) == 200
            nursery.cancel_scope.cancel()
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]
    assert [line["client"] for line in logged] == ["198.51.100.1", "198.51.100.1", "198.51.100.2"]


async def test_method_override_and_client_ip_headers_never_pass() -> None:
    sent = [
        b"X-HTTP-Method: DELETE",
        b"X-Method-Override: DELETE",
        b"X-Client-IP: 6.6.6.6",
        b"True-Client-IP: 6.6.6.6",
        b"CF-Connecting-IP: 6.6.6.6",
        b"X-Forwarded-Ssl: on",
        b"X-Forwarded-Scheme: https",
        b"X-Original-URI: /admin",
        b"X-Forwarded-Uri: /admin",
        b"X-Forwarded-Method: DELETE",
    ]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            route = Route("/", up.url, methods=("GET",))
            port = await start(nursery, Config(routes=(route,), server=LOCAL))
            assert status_of(await raw(port, get(b"/items/1", *sent))) == 200
            nursery.cancel_scope.cancel()
    headers = forwarded_headers(up)
    names = {n for n, _ in headers}
    assert not names & {line.partition(b":")[0].lower() for line in sent}
    values = b"".join(v for _, v in headers)
    for needle in (b"DELETE", b"6.6.6.6", b"/admin", b"https"):
        assert needle not in values, needle


# =========================================================================== hooks and framing


async def test_on_response_head_cannot_change_framing() -> None:
    """A hook editing Content-Length must not leave a half-read upstream connection in the
    pool: the next client would get the rest of this client's response."""

    async def on_response_head(
        info: object, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        headers[:] = [(n, v) for n, v in headers if n.lower() != b"content-length"]
        headers.append((b"Content-Length", b"2"))
        headers.append((b"Transfer-Encoding", b"chunked"))

    async def upstream(stream: trio.SocketStream) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            body = b"private data of " + head.split(b" ", 2)[1]
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port = await start_raw_server(nursery, upstream)
            config = Config(routes=(Route("/", f"http://127.0.0.1:{up_port}/"),), server=LOCAL)
            port = await start(nursery, config, Hooks(on_response_head=on_response_head))
            first = await raw(port, get(b"/alice"))
            second = await raw(port, get(b"/bob"))
            nursery.cancel_scope.cancel()
    assert first.endswith(b"\r\n\r\nprivate data of /alice"), first
    assert b"\r\nContent-Length: 22\r\n" in first
    assert second.endswith(b"\r\n\r\nprivate data of /bob"), second


@pytest.mark.parametrize("status", [204, 304])
async def test_hook_answer_with_a_body_on_204_or_304_is_a_500(status: int) -> None:
    async def on_request(request: Request) -> Response | None:
        return Response(status, [], b"forged")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            config = Config(routes=(Route("/", up.url),), server=LOCAL)
            port = await start(nursery, config, Hooks(on_request=on_request))
            reply = await raw(port, get(b"/x"))
            nursery.cancel_scope.cancel()
    assert status_of(reply) == 500 and b"forged" not in reply


async def test_hook_answer_204_has_no_content_length() -> None:
    async def on_request(request: Request) -> Response | None:
        return Response(204, [], b"")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            config = Config(routes=(Route("/", up.url),), server=LOCAL)
            port = await start(nursery, config, Hooks(on_request=on_request))
            reply = await raw(port, get(b"/x"))
            nursery.cancel_scope.cancel()
    assert status_of(reply) == 204 and b"content-length" not in reply.lower()


async def test_refusals_are_logged_against_the_real_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.access")
    server = ServerSettings(listen=("127.0.0.1:0",), trusted_proxies=("127.0.0.0/8",))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up = await RecordingUpstream().start(nursery)
            port = await start(nursery, Config(routes=(Route("/", up.url),), server=server))
            xff = b"X-Forwarded-For: 198.51.100.9"
            assert status_of(await raw(port, get(b"/%00", xff))) == 400
            nursery.cancel_scope.cancel()
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]
    assert [line["client"] for line in logged] == ["198.51.100.9"]
