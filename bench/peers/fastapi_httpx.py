"""The common Python reverse-proxy pattern: FastAPI + one shared ``httpx.AsyncClient``.

Every request is forwarded to ``$BENCH_UPSTREAM`` with ``client.send(..., stream=True)``
(what ``client.stream(...)`` does inside) and answered with a ``StreamingResponse`` of
``aiter_raw()``, closing the upstream response when the body is done. Run with::

    BENCH_UPSTREAM=http://127.0.0.1:8000 \\
        uvicorn bench.peers.fastapi_httpx:app --workers 1 --no-access-log

The client's pool is unbounded (httpx's default of 100 connections would queue the
1,000-stream workload behind a 5 s pool timeout) and keeps 64 idle connections, like the
nginx config; read timeouts are off (SSE streams may be silent for a long time).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

__all__ = ["app"]

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8000")
#: The bench sends ``/small`` to a second, faster upstream when this is set.
FAST_UPSTREAM = os.environ.get("BENCH_FAST_UPSTREAM", UPSTREAM)
FAST_PATH = "/small"

#: Hop-by-hop headers (RFC 9110 7.6.1) plus the ones httpx/uvicorn set themselves.
_HOP_BY_HOP = frozenset(
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
#: Response headers uvicorn writes itself (forwarding them would duplicate them).
_SERVER_SET = frozenset({"date", "server"})

_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)
_TIMEOUT = httpx.Timeout(None, connect=10.0)
_client = httpx.AsyncClient(base_url=UPSTREAM, limits=_LIMITS, timeout=_TIMEOUT)
_fast_client = httpx.AsyncClient(base_url=FAST_UPSTREAM, limits=_LIMITS, timeout=_TIMEOUT)


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
    await _client.aclose()
    await _fast_client.aclose()


app = FastAPI(lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)


@app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
async def proxy(request: Request, path: str) -> StreamingResponse:
    headers = [
        (name, value)
        for name, value in request.headers.raw
        if name.decode("latin-1").lower() not in _HOP_BY_HOP
    ]
    has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
    client = _fast_client if request.url.path == FAST_PATH else _client
    upstream_request = client.build_request(
        request.method,
        httpx.URL(path=request.url.path, query=request.url.query.encode("latin-1")),
        headers=headers,
        content=request.stream() if has_body else None,
    )
    upstream = await client.send(upstream_request, stream=True)
    response_headers = {
        name: value
        for name, value in upstream.headers.multi_items()
        if name.lower() not in _HOP_BY_HOP and name.lower() not in _SERVER_SET
    }
    return StreamingResponse(
        upstream.aiter_raw(),
        status_code=upstream.status_code,
        headers=response_headers,
        background=BackgroundTask(upstream.aclose),
    )
