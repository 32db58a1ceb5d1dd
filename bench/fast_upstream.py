"""``python -m bench.fast_upstream --port N``: a canned-response upstream for ``GET /small``.

The hypercorn sim answers ``/small`` at only a few thousand requests/s on its core, so
every small-request row measured the sim, not the proxies. This server answers every
request head with the same 100-byte response (keep-alive, pipelining kept in order) at
tens of thousands of requests/s: the small and TTFB workloads go here (each scenario
routes ``/small`` to it), everything else to the sim. Request bodies are not supported
(only ``GET /small`` and the readiness checks come here). uvloop when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Final, cast

__all__ = ["RESPONSE", "main"]

BODY: Final = b"x" * 100
RESPONSE: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 100\r\n"
    b"\r\n" + BODY
)
_END: Final = b"\r\n\r\n"
#: A client that sends more than this without a complete head is cut.
_MAX_HEAD: Final = 64 * 1024


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.pending + data if self.pending else data
        heads = buf.count(_END)
        if heads:
            close = b"\r\nconnection: close\r\n" in buf.lower()
            self.transport.write(RESPONSE * heads)
            buf = buf[buf.rfind(_END) + 4 :]
            if close:
                self.transport.close()
        elif len(buf) > _MAX_HEAD:
            self.transport.close()
        self.pending = buf


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Conn, host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fast_upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.host, args.port))
    else:
        uvloop.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
