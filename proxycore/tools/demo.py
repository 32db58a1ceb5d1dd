"""``proxycore demo``: an LLM-like SSE upstream, the proxy in front, a few streams through."""

from __future__ import annotations

import json
import sys

import trio

from ..config import Config, Route, ServerSettings
from ..net.client import fetch
from ..ops.server import serve
from ..tools.sim import make_app, parse_event_data, serve_app

__all__ = ["run_demo"]


def _events(body: bytes) -> list[dict[str, object]]:
    events = []
    for line in body.splitlines():
        parsed = parse_event_data(line)
        if parsed is not None:
            events.append(parsed)
    return events


async def _demo(requests: int, events: int, keep: bool, port: int) -> int:
    async with trio.open_nursery() as nursery:
        up_host, up_port = await nursery.start(
            serve_app, make_app(ttft=0.05, interval=0.02, events=events)
        )
        config = Config(
            routes=(Route(prefix="/", upstream=f"http://{up_host}:{up_port}/", name="llm"),),
            server=ServerSettings(listen=(f"127.0.0.1:{port if keep else 0}",)),
        )
        (host, proxy_port), *_ = await nursery.start(serve, config)
        print(f"upstream (SSE simulator) on http://{up_host}:{up_port}")
        print(f"proxycore on http://{host}:{proxy_port}\n")
        failures = 0
        for i in range(1, requests + 1):
            target = f"/v1/stream?events={events}"
            res = await fetch(host, proxy_port, target, headers=[("Accept", "text/event-stream")])
            got = _events(res.body)
            texts = [str(e.get("type")) for e in got]
            first_event = res.chunks[0][0] * 1000 if res.chunks else float("nan")
            print(
                f"stream {i}: status {res.status}, time to first byte {res.ttfb * 1000:.1f} ms, "
                f"first event {first_event:.1f} ms, {len(got)} events in "
                f"{len(res.chunks)} reads, total {res.total * 1000:.1f} ms"
            )
            print(f"  events: {', '.join(texts)}")
            if got:
                print(f"  last:   {json.dumps(got[-1])}")
            if res.status != 200 or not got or got[-1].get("type") != "done":
                failures += 1
        if keep:
            print(
                f"\nboth are running; try:\n  curl -N 'http://{host}:{proxy_port}/v1/stream"
                f"?events=20&interval_ms=200'\n(Ctrl-C to stop)"
            )
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    return 1 if failures else 0


def run_demo(requests: int = 3, events: int = 8, *, keep: bool = False, port: int = 0) -> int:
    try:
        return trio.run(_demo, requests, events, keep, port)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0
