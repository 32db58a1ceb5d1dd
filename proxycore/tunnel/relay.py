"""The in-machine relay between ``serve --workers N`` workers (docs/tunnel.md).

The supervisor gives each worker its index, the worker count and a private directory
(mode 0700) in the environment. A worker's session ids start with ``w<index>-``; each
worker also serves the tunnel API (only) on ``<dir>/w<index>.sock``
(:mod:`proxycore.tunnel.relay_server`). A call for another worker's session is forwarded
there with the admitted caller in :data:`CALLER_HEADER` (honoured on that socket only),
and the answer is copied back byte for byte (event streams included).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Final

import trio

from ..http.headers import Headers, serialize_head
from ..net.stream import CHUNK, Stream
from ..tunnel.hop import CONNECT_TIMEOUT_S, Hop
from ..tunnel.sessions import Caller

__all__ = [
    "AUTH_HEADER",
    "CALLER_HEADER",
    "PEERS",
    "Hop",
    "Peers",
    "fetch",
    "forward",
    "listed_elsewhere",
    "named_elsewhere",
]

INDEX_ENV: Final = "PROXYCORE_WORKER_INDEX"
COUNT_ENV: Final = "PROXYCORE_WORKERS"
DIR_ENV: Final = "PROXYCORE_WORKER_DIR"
#: The forwarded caller: read by the relay socket's server only, never by a listener.
CALLER_HEADER: Final = b"x-proxycore-relay-caller"
#: The shared secret of ``[state] relay_secret_file`` on a replica-to-replica relay request.
AUTH_HEADER: Final = b"x-proxycore-relay-auth"
_OWNER: Final = re.compile(r"w(\d{1,4})-")
_DROP: Final = {
    b"connection",
    b"content-length",
    b"transfer-encoding",
    b"keep-alive",
    b"x-request-id",
    CALLER_HEADER,
    AUTH_HEADER,
}


@dataclass(frozen=True, slots=True)
class Peers:
    """This worker's place among its siblings."""

    index: int
    count: int
    directory: str

    @classmethod
    def from_env(cls) -> Peers | None:
        try:
            index, count = int(os.environ[INDEX_ENV]), int(os.environ[COUNT_ENV])
            directory = os.environ[DIR_ENV]
        except (KeyError, ValueError):
            return None
        if count < 2 or not 0 <= index < count or not directory:
            return None
        return cls(index, count, directory)

    @property
    def prefix(self) -> str:
        """Prefix of this worker's session ids."""
        return f"w{self.index}-"

    def path(self, index: int) -> str:
        return os.path.join(self.directory, f"w{index}.sock")

    def hop(self, index: int) -> Hop:
        return Hop(path=self.path(index))

    def owner_of(self, key: str) -> int | None:
        """The worker a session id names (None: not an id of this form, e.g. a name)."""
        match = _OWNER.match(key)
        return int(match.group(1)) if match else None

    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]


#: This process's place (None: a single process, nothing to relay).
PEERS: Final = Peers.from_env()


def _request(
    method: bytes,
    target: bytes,
    headers: Headers,
    body: bytes,
    caller: Caller,
    rid: bytes,
    secret: bytes = b"",
) -> bytes:
    fields: Headers = [(n, v) for n, v in headers if n.lower() not in _DROP]
    who = json.dumps({"identity": caller.identity, "admin": caller.admin}).encode()
    fields += [
        (b"Content-Length", b"%d" % len(body)),
        (b"Connection", b"close"),
        (CALLER_HEADER, who),
    ]
    if rid:
        fields.append((b"X-Request-ID", rid))
    if secret:
        fields.append((AUTH_HEADER, secret))
    return serialize_head(b"%s %s HTTP/1.1\r\n" % (method, target), fields) + body


async def forward(
    hop: Hop,
    method: bytes,
    target: bytes,
    headers: Headers,
    body: bytes,
    caller: Caller,
    rid: bytes,
    out: Stream,
) -> tuple[int, int]:
    """Send the request through ``hop`` (a worker, or a replica) and copy its answer to
    ``out`` until the relay closes; ``(status, bytes copied)``: status 0 when nothing came
    back (the holder died: nothing was written to ``out`` either). Raises
    ``OSError``/``trio.TooSlowError`` when it can't be reached (nothing written then)."""
    conn = await hop.open()
    status = 0
    copied = 0
    async with conn:
        await conn.send_all(_request(method, target, headers, body, caller, rid, hop.secret))
        while True:
            try:
                data = await conn.receive_some(CHUNK)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            if not status:
                try:
                    status = int(data.split(b" ", 2)[1])
                except (IndexError, ValueError):
                    status = 502
            await out.send_all(data)
            copied += len(data)
    return status, copied


async def fetch(hop: Hop, target: bytes, caller: Caller) -> tuple[int, bytes]:
    """``GET target`` through ``hop``: ``(status, body)``; ``(0, b"")`` if it can't be
    reached or doesn't answer in time."""
    data = bytearray()
    with trio.move_on_after(CONNECT_TIMEOUT_S):
        try:
            conn = await hop.open()
            async with conn:
                await conn.send_all(_request(b"GET", target, [], b"", caller, b"", hop.secret))
                while chunk := await conn.receive_some(CHUNK):
                    data += chunk
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            return 0, b""
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        try:
            return int(head.split(b" ", 2)[1]), body
        except (IndexError, ValueError):
            return 0, b""
    return 0, b""


async def listed_elsewhere(peers: Peers, prefix: str, caller: Caller) -> list[object]:
    """``caller``'s sessions on the other workers (one that doesn't answer: left out)."""
    found: list[object] = []
    for index in peers.others():
        status, body = await fetch(peers.hop(index), prefix.encode(), caller)
        if status == 200:
            try:
                listed = json.loads(body)
            except ValueError:
                continue
            if isinstance(listed, list):
                found += listed
    return found


async def named_elsewhere(peers: Peers, prefix: str, key: str, caller: Caller) -> int | None:
    """The other worker holding a session ``caller`` may see under the name ``key``."""
    if peers.owner_of(key) is not None:
        return None
    target = prefix.encode() + b"/" + key.encode()
    for index in peers.others():
        status, _ = await fetch(peers.hop(index), target, caller)
        if status == 200:
            return index
    return None
