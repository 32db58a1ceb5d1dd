"""A small streaming HTTP/1.1 client (trio + h11) that times what it receives.

Used by ``proxycore demo`` and the load tools: it records the time to the
first response byte and the arrival time of every body chunk, so a caller can
see that stream events arrive one by one rather than batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import trio

__all__ = ["TimedResponse", "fetch"]


@dataclass(slots=True)
class TimedResponse:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: (seconds since the request was sent, data) for every body chunk.
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    ttfb: float = 0.0
    total: float = 0.0

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


async def fetch(
    host: str,
    port: int,
    target: str,
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    stream: trio.abc.Stream | None = None,
) -> TimedResponse:
    """Send one request and read the whole response, timing each chunk.

    Opens a fresh connection unless ``stream`` is given (then it is left open).
    """
    own = stream is None
    conn_stream = stream if stream is not None else await trio.open_tcp_stream(host, port)
    h = h11.Connection(h11.CLIENT)
    hdrs = [("Host", f"{host}:{port}"), *(headers or [])]
    if body:
        hdrs.append(("Content-Length", str(len(body))))
    result = TimedResponse()
    try:
        t0 = trio.current_time()
        data = h.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            data += h.send(h11.Data(data=body))
        data += h.send(h11.EndOfMessage())
        await conn_stream.send_all(data)
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                chunk = await conn_stream.receive_some(65536)
                if not result.ttfb:
                    result.ttfb = trio.current_time() - t0
                h.receive_data(bytes(chunk))
                continue
            if isinstance(event, h11.Response):
                result.status = event.status_code
                result.headers = list(event.headers.raw_items())
            elif isinstance(event, h11.Data):
                result.chunks.append((trio.current_time() - t0, bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        result.total = trio.current_time() - t0
    finally:
        if own:
            await conn_stream.aclose()
    return result
