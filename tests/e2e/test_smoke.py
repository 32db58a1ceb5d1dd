"""The shortest end-to-end path: client -> proxycore -> hypercorn upstream."""

from __future__ import annotations

import json

import trio

from tests.apps import echo_app
from tests.helpers import http_request, start_app, start_proxy


async def test_get_is_proxied_with_forwarding_headers() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            host, port = await start_proxy(nursery, f"http://{up_host}:{up_port}/")
            status, headers, body = await http_request(host, port, "GET", "/a/b?x=1&y=%20")
            nursery.cancel_scope.cancel()
    assert status == 200
    echoed = json.loads(body)
    assert echoed["path"] == "/a/b"
    assert echoed["query"] == "x=1&y=%20"
    sent = dict(echoed["headers"])
    assert sent["host"] == f"{up_host}:{up_port}"
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"
    assert dict(headers)[b"x-request-id"].decode() == sent["x-request-id"]
