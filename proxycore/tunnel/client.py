"""``proxycore tunnel``: connect a local stdio MCP server out to a tunnel gateway.

The client runs the local server as a child process (stdin/stdout pipes, stderr inherited),
opens a WebSocket to the gateway, registers, and relays newline-delimited JSON-RPC both ways.
It keeps ONE child across reconnects (a dropped socket never restarts it) and restarts the
child only when it died, with backoff. SIGTERM/SIGINT: unregister, close the socket, terminate
the child, wait, kill it after ``kill_timeout``; exit 0.

The pure core (URL normalization, line classification, backoff, message builders) is in
:mod:`proxycore.tunnel.client_wire`, testable without sockets or processes.

Classification of the child's stdout lines (the existing client labelled any line holding an
``"id"`` a response, so a server-to-client request was delivered as an answer):

- ``method`` and ``id``: a request from the server. The wire has no type for it, so it goes up
  as a ``notification`` message; the gateway looks at the payload and routes it to the
  server-to-client (GET) stream or to the only pending caller.
- ``id`` and ``result``/``error``, no ``method``: a ``response``.
- ``method``, no ``id``: a ``notification``.
- anything else (not JSON, not an object, neither of the above): logged and skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import secrets
import signal
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from .client_wire import (
    Outbound,
    backoff_delay,
    classify_line,
    heartbeat_message,
    not_running_error,
    register_message,
    unregister_message,
    uplink_message,
)

__all__ = ["ClientOptions", "TunnelClient"]

log = logging.getLogger("proxycore.tunnel.client")

MAX_LINE: Final = 4 << 20  # a longer stdout line is dropped
MAX_FRAME: Final = 4 << 20
STABLE_CHILD: Final = 10.0  # a child that ran this long resets the restart backoff
CHILD_WAIT: Final = 1.0  # a message for a child being (re)started waits this long for it


# -- I/O ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientOptions:
    gateway: str  # normalized ws(s) URL
    command: tuple[str, ...]
    name: str
    description: str = ""
    token: str | None = None
    reconnect_delay: float = 1.0
    max_delay: float = 60.0
    max_retries: int = 0  # 0: forever
    keepalive: float = 30.0
    kill_timeout: float = 5.0
    ack_timeout: float = 30.0


class _Fatal(Exception):
    """The gateway refused us for good (401/403, close 1008): no retry."""


class TunnelClient:
    """Runs one tunnel until stopped (signal or :meth:`stop`) or out of retries."""

    def __init__(self, options: ClientOptions, *, rand: Callable[[], float] = random.random):
        self.options = options
        self.rand = rand
        self.client_id = secrets.token_hex(16)
        self.session_id: str | None = None  # the gateway's, after register_ack
        self.exit_code = 0
        self.child: trio.Process | None = None
        self.child_starts = 0
        self._child_exited = trio.Event()
        self._child_ready = trio.Event()
        self._stop = trio.Event()
        self._stopping = trio.Event()  # set once shutting down
        self._ws: WebSocketConnection | None = None
        self._out_send, self._out_recv = trio.open_memory_channel[Outbound](64)
        self._unsent: Outbound | None = None
        self._stdin_lock = trio.Lock()

    def _delay(self, failures: int) -> float:
        o = self.options
        return backoff_delay(max(failures - 1, 0), o.reconnect_delay, o.max_delay, self.rand)

    def stop(self, code: int = 0) -> None:
        """Ask :meth:`run` to shut down gracefully."""
        if not self._stop.is_set():
            self.exit_code = code
            self._stop.set()

    async def run(self, *, signals: bool = True) -> int:
        async with trio.open_nursery() as nursery:
            if signals:
                await nursery.start(self._watch_signals)
            nursery.start_soon(self._supervise_child)
            nursery.start_soon(self._connection_loop)
            await self._stop.wait()
            self._stopping.set()
            with trio.CancelScope(shield=True):
                await self._shutdown()
            nursery.cancel_scope.cancel()
        return self.exit_code

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("signal %d: shutting down", signum)
                self.stop(0)

    async def _shutdown(self) -> None:
        ws, session_id = self._ws, self.session_id
        if ws is not None:
            with trio.move_on_after(2):
                if session_id is not None:
                    await ws.send_message(json.dumps(unregister_message(session_id)))
                    log.info("unregistered session %s", session_id)
                await ws.aclose()
        child = self.child
        if child is not None and child.returncode is None:
            child.terminate()
            with trio.move_on_after(self.options.kill_timeout):
                await self._child_exited.wait()
            if child.returncode is None:
                log.warning("local server did not exit after SIGTERM: killing it")
                child.kill()
                with trio.move_on_after(5):
                    await self._child_exited.wait()

    # -- the child --------------------------------------------------------------------------

    async def _supervise_child(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                await self._run_child()
            except OSError as exc:
                log.error("cannot start the local server %s: %s", self.options.command, exc)
            if self._stopping.is_set():
                return
            failures = 0 if time.monotonic() - started >= STABLE_CHILD else failures + 1
            delay = self._delay(failures)
            log.warning("local server exited; restarting in %.2f s", delay)
            await trio.sleep(delay)

    async def _run_child(self) -> None:
        child = await trio.lowlevel.open_process(
            list(self.options.command), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.child = child
        self.child_starts += 1
        self._child_exited = trio.Event()
        self._child_ready.set()
        log.info("local server started (pid %d)", child.pid)
        read_all = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stdout, child, read_all)
                try:
                    await child.wait()
                finally:
                    self._child_exited.set()
                    self._child_ready = trio.Event()
                # Its last lines still go up, but a reader stuck on a full queue while the
                # gateway is away must not hold back the restart.
                with trio.move_on_after(CHILD_WAIT):
                    await read_all.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if child.stdin is not None:
                    await child.stdin.aclose()
                if child.stdout is not None:
                    await child.stdout.aclose()
        log.warning("local server (pid %d) exited with %s", child.pid, child.returncode)

    async def _read_stdout(self, child: trio.Process, done: trio.Event) -> None:
        assert child.stdout is not None
        buffer = bytearray()
        dropping = False
        try:
            async for chunk in child.stdout:
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    if dropping:
                        dropping = False
                        continue
                    await self._classify_and_queue(line)
                if len(buffer) > MAX_LINE:
                    log.warning("dropping a stdout line over %d bytes", MAX_LINE)
                    buffer.clear()
                    dropping = True
            if buffer and not dropping:  # a last line without its newline
                await self._classify_and_queue(bytes(buffer))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        done.set()

    async def _classify_and_queue(self, line: bytes) -> None:
        if not line.strip():
            return
        out = classify_line(line)
        if out is None:
            log.warning("skipping a stdout line that is not JSON-RPC: %.200r", line)
            return
        await self._out_send.send(out)

    async def _write_child(self, payload: dict[str, Any]) -> None:
        child = self.child
        if child is None or child.returncode is not None:  # starting or restarting: wait a bit
            with trio.move_on_after(CHILD_WAIT):
                await self._child_ready.wait()
            child = self.child
        if child is None or child.returncode is not None or child.stdin is None:
            log.warning("local server not running: dropping a message from the gateway")
            if "method" in payload and payload.get("id") is not None:
                await self._out_send.send(Outbound("response", not_running_error(payload)))
            return
        data = json.dumps(payload, separators=(",", ":")).encode() + b"\n"
        try:
            async with self._stdin_lock:
                await child.stdin.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.warning("local server's stdin is closed: dropping a message")

    # -- the socket -------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        await self._child_ready.wait()  # register once the local server runs
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._connect_once()
                if self._stopping.is_set():
                    return
                failures = 0 if self.session_id is not None else failures + 1
                log.warning("gateway connection closed")
            except _Fatal as exc:
                log.error("gateway refused the tunnel: %s", exc)
                self.stop(1)
                return
            except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError) as exc:
                if self._stopping.is_set():
                    return
                failures += 1
                log.warning("gateway connection failed: %s", exc or type(exc).__name__)
            except Exception:  # unexpected (a bug, a group): keep the tunnel trying
                if self._stopping.is_set():
                    return
                failures += 1
                log.exception("gateway connection failed")
            finally:
                self._ws = None
                self.session_id = None
            if self.options.max_retries and failures > self.options.max_retries:
                log.error("giving up after %d retries", self.options.max_retries)
                self.stop(1)
                return
            delay = self._delay(failures)
            log.info("reconnecting in %.2f s", delay)
            await trio.sleep(delay)

    async def _connect_once(self) -> None:
        """One connection: handshake, register, relay until it closes. Raises on failure.

        The TCP (or TLS) stream is ours, closed here whatever happens: trio-websocket's client
        leaves it open when the gateway closes first.
        """
        url = urlsplit(self.options.gateway)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "wss" else 80)
        resource = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = [(b"X-Session-ID", self.client_id.encode())]
        if self.options.token:
            headers.append((b"Authorization", f"Bearer {self.options.token}".encode()))
        with trio.fail_after(self.options.ack_timeout):
            tcp = await trio.open_tcp_stream(host, port)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
        error: Exception | None = None
        try:
            if url.scheme == "wss":
                stream = trio.SSLStream(tcp, ssl.create_default_context(), server_hostname=host)
                with trio.fail_after(self.options.ack_timeout):
                    await stream.do_handshake()
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        await self._session(nursery, stream, url.netloc, resource, headers)
                    except Exception as exc:  # re-raised below, not wrapped in a group
                        error = exc
                    nursery.cancel_scope.cancel()
            except* ConnectionRejected as group:  # raised by trio-websocket's reader task
                rejected = _first(group)
                if rejected.status_code in (401, 403):
                    error = _Fatal(f"HTTP {rejected.status_code}")
                else:
                    error = rejected
        finally:
            await trio.aclose_forcefully(stream)
        if error is not None:
            raise error

    async def _session(
        self,
        nursery: trio.Nursery,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        host: str,
        resource: str,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        with trio.fail_after(self.options.ack_timeout):
            ws = await wrap_client_stream(
                nursery, stream, host, resource, extra_headers=headers, max_message_size=MAX_FRAME
            )
        self._ws = ws
        try:
            try:
                await self._register(ws)
            except ConnectionClosed:
                pass
            else:
                async with trio.open_nursery() as relay:
                    relay.start_soon(_until_closed, relay, self._heartbeats, ws)
                    relay.start_soon(_until_closed, relay, self._uplink, ws)
                    await _until_closed(relay, self._downlink, ws)
        finally:
            with trio.move_on_after(2) as cleanup:
                cleanup.shield = True
                await ws.aclose()
        reason = ws.closed
        if reason is not None and reason.code == 1008:
            raise _Fatal(f"closed 1008 {reason.reason or ''}".strip())
        if self.session_id is None:
            raise ConnectionClosed(reason)

    async def _register(self, ws: WebSocketConnection) -> None:
        message = register_message(self.client_id, self.options.name, self.options.description)
        await ws.send_message(json.dumps(message))
        with trio.fail_after(self.options.ack_timeout):
            while True:
                data = _parse(await ws.get_message())
                if data is None:
                    continue
                if data.get("type") == "register_ack":
                    session_id = data.get("sessionId")
                    self.session_id = session_id if isinstance(session_id, str) else self.client_id
                    log.info("registered %r as session %s", self.options.name, self.session_id)
                    return
                if data.get("type") == "error":
                    log.error("gateway error: %s", data.get("message"))

    async def _heartbeats(self, ws: WebSocketConnection) -> None:
        while True:
            await trio.sleep(self.options.keepalive)
            await ws.send_message(json.dumps(heartbeat_message(self.session_id or "")))

    async def _uplink(self, ws: WebSocketConnection) -> None:
        while True:
            if self._unsent is None:
                self._unsent = await self._out_recv.receive()
            message = uplink_message(self._unsent, self.session_id or "")
            await ws.send_message(json.dumps(message))
            self._unsent = None

    async def _downlink(self, ws: WebSocketConnection) -> None:
        """Gateway -> client until the socket closes (returns) or stays silent too long."""
        silence = max(self.options.keepalive * 3, 1.0)
        while True:
            with trio.move_on_after(silence) as quiet:
                raw = await ws.get_message()
            if quiet.cancelled_caught:
                log.warning("no word from the gateway for %.0f s: reconnecting", silence)
                return
            data = _parse(raw)
            kind = None if data is None else data.get("type")
            if data is None:
                continue
            if kind == "request":
                payload = data.get("payload")
                if isinstance(payload, dict):
                    await self._write_child(payload)
                else:
                    log.warning("request without an object payload: skipped")
            elif kind == "error":
                log.error("gateway error: %s", data.get("message"))
            elif kind == "register_ack" and isinstance(data.get("sessionId"), str):
                self.session_id = data["sessionId"]
            elif kind != "heartbeat":
                log.warning("unknown message type from the gateway: %r", kind)


def _first(group: BaseExceptionGroup[ConnectionRejected]) -> ConnectionRejected:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, ConnectionRejected)
    return leaf


async def _until_closed(
    nursery: trio.Nursery,
    task: Callable[[WebSocketConnection], Awaitable[None]],
    ws: WebSocketConnection,
) -> None:
    """Run ``task``; when it ends (socket closed or gave up), end its siblings too."""
    with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
        await task(ws)
    nursery.cancel_scope.cancel()


def _parse(raw: str | bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        log.warning("gateway sent a frame that is not JSON")
        return None
    if not isinstance(data, dict):
        log.warning("gateway sent a frame that is not a JSON object")
        return None
    return data
