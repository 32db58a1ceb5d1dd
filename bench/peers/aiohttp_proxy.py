"""A plain aiohttp reverse proxy, written the way one would deploy it: the bench's peer.

Every request is forwarded to ``$BENCH_UPSTREAM`` (``/small`` to ``$BENCH_FAST_UPSTREAM``,
the bench's canned-response upstream, when set) through one ``ClientSession`` with
a keep-alive ``TCPConnector`` (unbounded, like the other peers' pools), streamed both
ways: the request body with ``iter_any()`` into the upstream request, the response
body with ``iter_any()`` into a ``StreamResponse``. No access log, no cookie jar, no
decompression (bytes pass as they came). A client that goes away cancels its handler
(``handler_cancellation``), which closes the upstream response. Run with::

    BENCH_UPSTREAM=http://127.0.0.1:8000 python -m bench.peers.aiohttp_proxy --port 8081

The event loop is uvloop when it is installed (``--loop asyncio`` for the plain loop);
the bench states which one ran.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Final

import aiohttp
from aiohttp import web

__all__ = ["main", "make_app"]

#: Hop-by-hop headers (RFC 9110 7.6.1), plus ``Host`` (the session sets the upstream's).
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
#: Response headers aiohttp's server writes itself (forwarding them would duplicate them).
_SERVER_SET: Final = frozenset({"date", "server"})
SESSION: Final = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: Final = web.AppKey("upstream", str)
FAST: Final = web.AppKey("fast", str)
#: The bench sends this path to a second, faster upstream (``$BENCH_FAST_UPSTREAM``).
FAST_PATH: Final = "/small"


async def _request_body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_any():
        yield chunk


async def _forward(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
    data = _request_body(request) if request.body_exists else None
    base = request.app[FAST] if request.path == FAST_PATH else request.app[UPSTREAM]
    async with session.request(
        request.method,
        base + request.raw_path,
        headers=headers,
        data=data,
        allow_redirects=False,
        auto_decompress=False,
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
        for name, value in upstream.headers.items():
            lower = name.lower()
            if lower not in _HOP_BY_HOP and lower not in _SERVER_SET:
                response.headers.add(name, value)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def make_app(upstream: str, fast: str | None = None) -> web.Application:
    """The proxy app; its session opens on start-up and closes on clean-up."""
    app = web.Application(client_max_size=0)
    app[UPSTREAM] = upstream.rstrip("/")
    app[FAST] = (fast or upstream).rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=75.0, ttl_dns_cache=None
        )
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        ) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


def _loop(name: str) -> asyncio.AbstractEventLoop | None:
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise
        return None
    return uvloop.new_event_loop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.aiohttp_proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    args = parser.parse_args(argv)
    upstream = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8000")
    fast = os.environ.get("BENCH_FAST_UPSTREAM")
    loop = _loop(args.loop)
    print(f"aiohttp {aiohttp.__version__}, {'uvloop' if loop else 'asyncio'} loop", flush=True)
    web.run_app(
        make_app(upstream, fast),
        host=args.host,
        port=args.port,
        access_log=None,
        backlog=4096,
        handler_cancellation=True,
        print=None,
        loop=loop,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
