"""A worker's relay socket: the tunnel API only, for its sibling workers
(:mod:`proxycore.tunnel.relay`). Each connection carries one request (``Connection:
close``) whose caller is :data:`~proxycore.tunnel.relay.CALLER_HEADER`; it is answered
from this worker's own sessions, never forwarded again."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Final

import trio

from ..net.stream import CHUNK, RawStream, StreamBroken
from ..tunnel import http_api
from ..tunnel.relay import CALLER_HEADER, Peers
from ..tunnel.sessions import Caller, Registry

__all__ = ["serve_relay"]

log: Final = logging.getLogger("proxycore.tunnel")
MAX_HEAD: Final = 64 * 1024
READ_TIMEOUT_S: Final = 10.0


async def serve_relay(
    peers: Peers,
    registry: Callable[[], Registry | None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on this worker's socket until cancelled."""
    path = peers.path(peers.index)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a previous run of this worker
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(path)
        listener.listen(128)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                raw = socket.socket(fileno=conn.detach())
                nursery.start_soon(_serve_one, RawStream(raw), registry)


async def _serve_one(stream: RawStream, registry: Callable[[], Registry | None]) -> None:
    try:
        with trio.move_on_after(READ_TIMEOUT_S) as scope:
            data = bytearray()
            buf = bytearray(CHUNK)
            while b"\r\n\r\n" not in data and len(data) < MAX_HEAD:
                n = await stream.recv_into(buf, CHUNK)
                if not n:
                    return
                data += buf[:n]
            head, _, body = bytes(data).partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, target, _version = lines[0].split(b" ", 2)
            headers = [
                (name.strip(), value.strip())
                for name, _, value in (line.partition(b":") for line in lines[1:])
            ]
            fields = {name.lower(): value for name, value in headers}
            length = int(fields.get(b"content-length", b"0"))
            while len(body) < length:
                n = await stream.recv_into(buf, CHUNK)
                if not n:
                    return
                body += buf[:n]
            who = json.loads(fields[CALLER_HEADER])
            caller = Caller(str(who["identity"]), bool(who["admin"]))
        if scope.cancelled_caught:
            return
        reg = registry()
        if reg is None:
            return
        path, _, query = target.partition(b"?")
        request = http_api.ApiRequest(
            method=method,
            path=path.decode("utf-8", "replace"),
            query=query,
            headers=[(n, v) for n, v in headers if n.lower() != CALLER_HEADER],
            body=body[:length],
            caller=caller,
            request_id=fields.get(b"x-request-id") or secrets.token_hex(8).encode(),
            stream=stream,
            registry=reg,
            settings=reg.settings,
            peers=None,
        )
        await http_api.handle(request)
    except (StreamBroken, ValueError, KeyError, TypeError) as exc:
        log.debug("relay request dropped: %s", exc)
    finally:
        stream.close()
