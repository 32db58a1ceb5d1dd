"""The admin listener and ``/metrics`` after real traffic through a running ``Server``.

Every number asserted is one the test caused: a known mix of requests goes through
the proxy, then ``/metrics`` (fetched over HTTP from the admin listener, parsed with
prometheus-client's own parser) must account for exactly that traffic. Gauges that
describe the present (connections, exchanges in flight, pool) are read while a stream
is held open by a raw upstream the test controls, then again after it ended.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Final

import trio
from prometheus_client.parser import text_string_to_metric_families

from proxycore import Config, Route, ServerSettings
from proxycore.config import AdminSettings
from proxycore.ops.server import Server
from tests.apps import echo_app, sse_event
from tests.e2e.test_lifecycle import RawUpstream, reserved_port, start_server
from tests.e2e.test_streaming import header, open_client
from tests.helpers import http_request, start_app

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]

UPLOAD: Final = bytes(range(256)) * 200  # 51200 bytes


async def scrape(host: str, port: int) -> Samples:
    """GET /metrics and parse it: ``{(sample name, labels): value}``."""
    status, headers, body = await http_request(host, port, "GET", "/metrics")
    assert status == 200
    assert header_value(headers, b"content-type").startswith(b"text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = float(sample.value)
    return samples


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    return next(v for n, v in headers if n.lower() == name)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def by_labels(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """Every non-zero sample ``name``, keyed by the values of ``keys``."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for (sample, labels), v in samples.items():
        if sample == name and v:
            lookup = dict(labels)
            out[tuple(lookup[k] for k in keys)] += v
    return dict(out)


async def wait_for(host: str, port: int, name: str, expected: float) -> Samples:
    """Scrape until gauge ``name`` (no labels) equals ``expected`` (bounded by the caller).

    The proxy accounts for an exchange or a connection just after the client has seen
    the last byte of it, so a gauge may lag a scrape sent at once by a scheduling tick.
    """
    while True:
        samples = await scrape(host, port)
        if value(samples, name) == expected:
            return samples
        await trio.sleep(0.01)


async def test_admin_endpoints() -> None:
    with reserved_port() as refused, trio.fail_after(10):
        config = Config(
            routes=(Route(prefix="/", upstream=f"http://127.0.0.1:{refused.getsockname()[1]}/"),),
            server=ServerSettings(listen=("127.0.0.1:0",)),
            admin=AdminSettings(listen="127.0.0.1:0"),
        )
        async with trio.open_nursery() as nursery:
            proxy = await start_server(nursery, Server(config))
            host, port = proxy.admin
            assert port != proxy.port
            assert (await http_request(host, port, "GET", "/healthz"))[::2] == (200, b"ok\n")
            assert (await http_request(host, port, "GET", "/readyz"))[::2] == (200, b"ready\n")
            assert (await http_request(host, port, "GET", "/nope"))[0] == 404
            assert (await http_request(host, port, "POST", "/metrics"))[0] == 405
            assert (await http_request(host, port, "DELETE", "/healthz"))[0] == 405
            # The admin paths are not served on the proxy listener (they'd be proxied).
            status, _, body = await http_request(proxy.host, proxy.port, "GET", "/metrics")
            assert status == 502 and b"proxycore_" not in body
            nursery.cancel_scope.cancel()


async def test_metrics_account_for_real_traffic() -> None:
    sse = RawUpstream(b"S")
    with reserved_port() as refused, trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            echo_host, echo_port = await start_app(nursery, echo_app)
            sse_url = await sse.start(nursery)
            echo_origin = f"http://{echo_host}:{echo_port}"
            sse_origin = sse_url.rstrip("/")
            config = Config(
                routes=(
                    Route(prefix="/echo/", upstream=f"{echo_origin}/"),
                    Route(prefix="/sse/", upstream=sse_url),
                    Route(
                        prefix="/down/", upstream=f"http://127.0.0.1:{refused.getsockname()[1]}/"
                    ),
                ),
                server=ServerSettings(listen=("127.0.0.1:0",)),
                admin=AdminSettings(listen="127.0.0.1:0"),
            )
            server = Server(config)
            proxy = await start_server(nursery, server)
            ahost, aport = proxy.admin
            received = {"/echo/": 0, "/sse/": 0}

            async def send(method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
                status, _, data = await http_request(
                    proxy.host, proxy.port, method, target, body=body
                )
                for prefix in received:
                    if target.startswith(prefix):
                        received[prefix] += len(data)
                return status, data

            # -- traffic: 3 GETs and an upload through echo, a 404, a 502.
            for i in range(3):
                assert (await send("GET", f"/echo/get{i}"))[0] == 200
            status, data = await send("POST", "/echo/upload", UPLOAD)
            assert status == 200 and json.loads(data)["body_len"] == len(UPLOAD)
            assert (await send("GET", "/nowhere"))[0] == 404
            assert (await send("GET", "/down/x"))[0] == 502

            # -- a stream held open, plus an idle kept-alive connection.
            async with open_client(proxy.host, proxy.port) as stream:
                await stream.request(b"GET", b"/sse/stream")
                assert (await stream.head()).status_code == 200
                await stream.body_at_least(len(sse_event(0)))
                async with open_client(proxy.host, proxy.port) as idle:
                    await idle.request(b"GET", b"/echo/keepalive")
                    response = await idle.head()
                    assert response.status_code == 200
                    assert header(response, b"connection") is None  # kept alive
                    assert await idle.read_to_end()
                    received["/echo/"] += len(idle.body)

                    await wait_for(ahost, aport, "proxycore_exchanges_in_flight", 1)
                    during = await wait_for(ahost, aport, "proxycore_client_connections", 2)
                    assert value(during, "proxycore_exchanges_in_flight") == 1
                    pool = "proxycore_pool_connections"
                    assert value(during, pool, upstream=sse_origin, state="busy") == 1
                    assert value(during, pool, upstream=sse_origin, state="idle") == 0
                    assert value(during, pool, upstream=echo_origin, state="busy") == 0
                    assert (value(during, pool, upstream=echo_origin, state="idle") or 0) >= 1
                await wait_for(ahost, aport, "proxycore_client_connections", 1)

                sse.release.set()
                assert await stream.read_to_end()
                received["/sse/"] += len(stream.body)
            await wait_for(ahost, aport, "proxycore_client_connections", 0)
            after = await wait_for(ahost, aport, "proxycore_exchanges_in_flight", 0)

            # -- requests by route and status class: exactly what was sent.
            assert by_labels(after, "proxycore_requests_total", "route", "status_class") == {
                ("/echo/", "2xx"): 5,
                ("/sse/", "2xx"): 1,
                ("-", "4xx"): 1,
                ("/down/", "5xx"): 1,
            }
            # -- histograms: one observation per exchange (ttfb only when the upstream
            # answered: the refused one never did).
            ttfb = "proxycore_upstream_ttfb_seconds_count"
            duration = "proxycore_exchange_duration_seconds_count"
            assert by_labels(after, ttfb, "route") == {("/echo/",): 5, ("/sse/",): 1}
            assert by_labels(after, duration, "route") == {
                ("/echo/",): 5,
                ("/sse/",): 1,
                ("-",): 1,
                ("/down/",): 1,
            }
            assert (
                value(after, "proxycore_upstream_ttfb_seconds_bucket", route="/echo/", le="+Inf")
                == 5
            )
            assert by_labels(after, "proxycore_upstream_errors_total", "route", "kind") == {
                ("/down/", "connect"): 1
            }
            # -- body bytes: at least what went through.
            body_bytes = by_labels(after, "proxycore_body_bytes_total", "route", "direction")
            assert body_bytes.get(("/echo/", "in"), 0) >= len(UPLOAD)
            assert body_bytes.get(("/echo/", "out"), 0) >= received["/echo/"] > 0
            assert body_bytes.get(("/sse/", "out"), 0) >= len(sse_event(0) + sse_event(1))
            assert received["/sse/"] == len(sse_event(0) + sse_event(1))
            # -- the pool after the stream: its connection is idle, none busy.
            pool = "proxycore_pool_connections"
            assert value(after, pool, upstream=sse_origin, state="busy") == 0
            assert (value(after, pool, upstream=sse_origin, state="idle") or 0) >= 1
            assert (value(after, pool, upstream=echo_origin, state="idle") or 0) >= 1

            # -- reloads and the config generation.
            assert value(after, "proxycore_config_generation") == 1
            assert not value(after, "proxycore_reloads_total", outcome="ok")
            assert server.reload(config)
            assert not server.reload_from("/nonexistent/proxycore.toml")
            reloaded = await scrape(ahost, aport)
            assert value(reloaded, "proxycore_config_generation") == 2
            assert value(reloaded, "proxycore_reloads_total", outcome="ok") == 1
            assert value(reloaded, "proxycore_reloads_total", outcome="error") == 1
            # Scrapes are not proxy traffic: nothing moved.
            assert by_labels(reloaded, "proxycore_requests_total", "route", "status_class") == (
                by_labels(after, "proxycore_requests_total", "route", "status_class")
            )
            nursery.cancel_scope.cancel()
