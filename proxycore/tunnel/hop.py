"""Where a relayed tunnel request goes (:mod:`proxycore.tunnel.relay`): a sibling worker's
unix socket, or another replica's internal relay listener."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import trio

__all__ = ["CONNECT_TIMEOUT_S", "Hop"]

CONNECT_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Hop:
    """Where a relayed request goes: a sibling worker's unix socket (``path``), or another
    replica's internal relay listener (``host``/``port``, authenticated with ``secret``)."""

    path: str = ""
    host: str = ""
    port: int = 0
    secret: bytes = b""

    def __repr__(self) -> str:  # the secret never shows
        return f"Hop(path={self.path!r}, host={self.host!r}, port={self.port})"

    async def open(self) -> trio.SocketStream:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            if self.path:
                return await trio.open_unix_socket(self.path)
            return await trio.open_tcp_stream(self.host, self.port)
