"""A worker's relay socket: the tunnel API only, for its sibling workers
(:mod:`proxycore.tunnel.relay`). Each connection carries one request (``Connection:
close``) whose caller is :data:`~proxycore.tunnel.relay.CALLER_HEADER`; it is answered
from this worker's own sessions, never forwarded again.

:func:`serve_replica_relay` is the same over TCP for the other replicas (``[state]
relay_listen``): a request must carry the shared secret in
:data:`~proxycore.tunnel.relay.AUTH_HEADER` (compared in constant time), else the connection
is closed unanswered."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Final

import trio

from ..config.checks import parse_listen
from ..config.state import StateSettings
from ..net.stream import CHUNK, RawStream, StreamBroken
from ..security.secrets import SecretError
from ..store.runtime import SharedState
from ..tunnel import http_api
from ..tunnel.relay import AUTH_HEADER, CALLER_HEADER, PEERS, Peers
from ..tunnel.replicas import Replicas, records_of
from ..tunnel.sessions import Caller, Registry

__all__ = ["serve_relay", "serve_replica_relay"]

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


async def serve_replica_relay(
    shared: SharedState,
    registry: Registry,
    settings: StateSettings,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``[state] relay_listen`` (under ``--workers N``: its port + the worker's
    index) for the other replicas until cancelled; publish this process's sessions in the
    shared directory with the address they dial. ``task_status.started(address)``. Raises
    ``SecretError`` when ``relay_secret_file`` is unreadable or empty."""
    secret = _read_secret(settings.relay_secret_file)
    host, port = parse_listen(settings.relay_listen)
    if port and PEERS is not None:
        port += PEERS.index
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((host, port))
        listener.listen(128)
        bound = int(listener.getsockname()[1])
        address = settings.relay_address or _advertised(host, bound)
        directory = shared.publish_sessions(address, lambda: records_of(registry, directory))
        registry.shared = Replicas(directory, secret)
        log.info("tunnel relay for other replicas on %s:%d", host, bound)
        task_status.started(address)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    raw = socket.socket(fileno=conn.detach())
                    nursery.start_soon(_serve_one, RawStream(raw), lambda: registry, secret)
        finally:
            registry.shared = None


def _read_secret(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            secret = file.readline().strip()
    except OSError as exc:
        raise SecretError(f"state.relay_secret_file: cannot read it: {exc.strerror}") from None
    if len(secret) < 16:
        raise SecretError("state.relay_secret_file: needs a secret of at least 16 characters")
    return secret


def _advertised(host: str, port: int) -> str:
    """``relay_address`` unset: the listen address, or this host's own address when it
    listens on every interface."""
    if host in ("0.0.0.0", "::"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _serve_one(
    stream: RawStream, registry: Callable[[], Registry | None], secret: bytes = b""
) -> None:
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
            # The secret before anything else is read: an unauthenticated caller gets
            # nothing held for it.
            if secret and not hmac.compare_digest(fields.get(AUTH_HEADER, b""), secret):
                log.warning("replica relay: a request without the shared secret was refused")
                return
            length = int(fields.get(b"content-length", b"0"))
            reg = registry()
            if reg is None or not 0 <= length <= http_api.body_limit(reg.settings):
                return
            whole = bytearray(body)
            while len(whole) < length:
                n = await stream.recv_into(buf, CHUNK)
                if not n:
                    return
                whole += buf[:n]
            body = bytes(whole)
            who = json.loads(fields[CALLER_HEADER])
            caller = Caller(str(who["identity"]), bool(who["admin"]))
        if scope.cancelled_caught:
            return
        assert reg is not None  # checked while reading
        path, _, query = target.partition(b"?")
        request = http_api.ApiRequest(
            method=method,
            path=path.decode("utf-8", "replace"),
            query=query,
            headers=[(n, v) for n, v in headers if n.lower() not in (CALLER_HEADER, AUTH_HEADER)],
            body=body[:length],
            caller=caller,
            request_id=fields.get(b"x-request-id") or secrets.token_hex(8).encode(),
            stream=stream,
            registry=reg,
            settings=reg.settings,
            peers=None,
            relayed=True,
        )
        await http_api.handle(request)
    except (StreamBroken, ValueError, KeyError, TypeError) as exc:
        log.debug("relay request dropped: %s", exc)
    finally:
        stream.close()
