"""https upstreams: certificate and hostname verification, SNI, and TLS failures as 502.

The upstreams are served on 127.0.0.1 with certificates from throwaway trustme CAs;
routes name them as ``https://localhost:<port>/`` so the hostname is checked.
"""

from __future__ import annotations

import json
import logging
import ssl
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trustme
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hyper_serve

from proxycore import Route, Timeouts
from proxycore.tools.sim import ASGIApp
from tests.apps import echo_app
from tests.helpers import http_request, start_proxy

Headers = list[tuple[bytes, bytes]]

_quiet = logging.getLogger("tests.tls.hypercorn")
_quiet.setLevel(logging.CRITICAL)


async def serve_tls_app(
    app: ASGIApp,
    pem_file: Path,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn over TLS on 127.0.0.1 (free port) until cancelled.

    ``pem_file`` holds the private key and the certificate chain. Reports the port.
    """
    config = HyperConfig()
    config.bind = ["127.0.0.1:0"]
    config.certfile = str(pem_file)
    config.keyfile = str(pem_file)
    config.accesslog = None
    config.errorlog = _quiet
    async with trio.open_nursery() as nursery:
        hyper_app: Any = app
        urls: list[str] = await nursery.start(partial(hyper_serve, hyper_app, config, mode="asgi"))
        task_status.started(int(urls[0].rsplit(":", 1)[1]))


def write_cert(tmp_path: Path, ca: trustme.CA, *names: str) -> Path:
    """Issue a certificate for ``names`` and write key + chain to one PEM file."""
    pem = tmp_path / f"{'-'.join(names)}-{id(ca)}.pem"
    ca.issue_cert(*names).private_key_and_cert_chain_pem.write_to_path(str(pem))
    return pem


def write_ca(tmp_path: Path, ca: trustme.CA, name: str = "ca.pem") -> Path:
    path = tmp_path / name
    ca.cert_pem.write_to_path(str(path))
    return path


def header(headers: Headers, name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def assert_tls_502(status: int, headers: Headers, body: bytes) -> str:
    """A proxy-made 502 whose JSON error mentions TLS; returns the message."""
    assert status == 502, body
    error = json.loads(body)["error"]
    assert set(error) == {"type", "message", "request_id"}
    assert error["request_id"].encode() == header(headers, b"x-request-id")
    assert "TLS" in error["message"], error
    message: str = error["message"]
    return message


async def test_https_upstream_with_verified_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = write_cert(tmp_path, ca, "localhost", "127.0.0.1")
    ca_file = write_ca(tmp_path, ca)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port: int = await nursery.start(serve_tls_app, echo_app, pem)
            route = Route("/", f"https://localhost:{up_port}/base/", ca_file=str(ca_file))
            host, port = await start_proxy(nursery, [route])
            first = await http_request(host, port, "GET", "/x?q=1")
            # A second request goes over the pooled TLS connection (or a new one): same answer.
            second = await http_request(host, port, "POST", "/y", body=b"over tls")
            nursery.cancel_scope.cancel()
    assert first[0] == 200
    echo = json.loads(first[2])
    assert (echo["path"], echo["query"]) == ("/base/x", "q=1")
    assert [v for n, v in echo["headers"] if n == "host"] == [f"localhost:{up_port}"]
    assert second[0] == 200
    assert json.loads(second[2])["body_len"] == len(b"over tls")


async def test_sni_carries_the_upstream_hostname(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = write_ca(tmp_path, ca)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    server_names: list[str | None] = []

    def on_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        server_names.append(name)

    server_ctx.sni_callback = on_sni
    heads: list[bytes] = []

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            heads.append(buf)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nsni")
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners: list[trio.SSLListener[trio.SocketStream]] = await nursery.start(
                partial(trio.serve_ssl_over_tcp, handler, 0, server_ctx, host="127.0.0.1")
            )
            transport = listeners[0].transport_listener
            assert isinstance(transport, trio.SocketListener)
            up_port = transport.socket.getsockname()[1]
            route = Route("/", f"https://localhost:{up_port}/", ca_file=str(ca_file))
            host, port = await start_proxy(nursery, [route])
            status, _, body = await http_request(host, port, "GET", "/")
            nursery.cancel_scope.cancel()
    assert (status, body) == (200, b"sni")
    assert server_names == ["localhost"]
    assert heads[0].startswith(b"GET / HTTP/1.1\r\n")


async def test_untrusted_certificate_without_ca_file_is_502(tmp_path: Path) -> None:
    pem = write_cert(tmp_path, trustme.CA(), "localhost", "127.0.0.1")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port: int = await nursery.start(serve_tls_app, echo_app, pem)
            host, port = await start_proxy(
                nursery, f"https://localhost:{up_port}/", timeouts=Timeouts(connect=5.0)
            )
            status, headers, body = await http_request(host, port, "GET", "/")
            nursery.cancel_scope.cancel()
    message = assert_tls_502(status, headers, body)
    assert "certificate" in message.lower()


async def test_certificate_from_another_ca_is_502(tmp_path: Path) -> None:
    pem = write_cert(tmp_path, trustme.CA(), "localhost", "127.0.0.1")
    other_ca_file = write_ca(tmp_path, trustme.CA(), "other-ca.pem")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port: int = await nursery.start(serve_tls_app, echo_app, pem)
            route = Route("/", f"https://localhost:{up_port}/", ca_file=str(other_ca_file))
            host, port = await start_proxy(nursery, [route], timeouts=Timeouts(connect=5.0))
            status, headers, body = await http_request(host, port, "GET", "/")
            nursery.cancel_scope.cancel()
    message = assert_tls_502(status, headers, body)
    assert "certificate" in message.lower()


async def test_hostname_mismatch_is_502(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = write_cert(tmp_path, ca, "other.example")
    ca_file = write_ca(tmp_path, ca)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port: int = await nursery.start(serve_tls_app, echo_app, pem)
            route = Route("/", f"https://localhost:{up_port}/", ca_file=str(ca_file))
            host, port = await start_proxy(nursery, [route], timeouts=Timeouts(connect=5.0))
            status, headers, body = await http_request(host, port, "GET", "/")
            nursery.cancel_scope.cancel()
    message = assert_tls_502(status, headers, body)
    assert "hostname" in message.lower() or "localhost" in message
