"""The trio streams of a WebSocket upgrade: trio-websocket reads and writes through them.

- :class:`RawTrioStream`: a connection's :class:`~proxycore.net.stream.RawStream` as a trio
  stream (the same socket; writes keep the stream's send timeout and cut marking).
- :class:`ClientStream`: the client connection, replaying the bytes already read.
- :class:`RefusalCap`: the upstream connection during its handshake. trio-websocket keeps
  a refused handshake's body whole, grown by concatenation (quadratic), with no limit;
  this caps it at :data:`MAX_REFUSAL_BODY`.
"""

from __future__ import annotations

from typing import Final

import trio

from ..net.stream import RawStream, StreamBroken

__all__ = ["MAX_REFUSAL_BODY", "RECV_BYTES", "ClientStream", "RawTrioStream", "RefusalCap"]

#: Socket read size, both sides (4 KiB halves throughput: wsproto's cost is per read).
RECV_BYTES: Final = 65536
#: The most body bytes (as on the wire) of an upstream's refusal that are kept and relayed.
MAX_REFUSAL_BODY: Final = 64 * 1024
#: A response head longer than this is not one (wsproto's h11 stops at 16 KiB itself).
_MAX_HEAD: Final = 64 * 1024


def _closed_or_broken(sock_fileno: int) -> trio.ClosedResourceError | trio.BrokenResourceError:
    return trio.ClosedResourceError() if sock_fileno == -1 else trio.BrokenResourceError()


class RawTrioStream(trio.abc.Stream):
    """A connection's :class:`RawStream` as a trio stream, for trio-websocket.

    The same socket object (one owner of the descriptor: closed by ``RawStream.close``).
    Reads take up to ``RECV_BYTES`` with ``recv`` (no 4 KiB buffer), writes go through
    ``RawStream.send_all``; both are checkpoints as trio's ``SocketStream`` calls are.
    """

    def __init__(self, raw: RawStream) -> None:
        self._raw = raw

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock, size = self._raw.sock, max_bytes or RECV_BYTES
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                data = sock.recv(size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            except OSError as exc:
                raise _closed_or_broken(sock.fileno()) from exc
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            await self._raw.send_all(data)
        except StreamBroken as exc:
            raise _closed_or_broken(self._raw.sock.fileno()) from exc
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._raw.sock)

    async def aclose(self) -> None:
        self._raw.close()
        await trio.lowlevel.checkpoint()


class ClientStream(trio.abc.Stream):
    """The client connection as trio-websocket reads it: first the bytes the proxy already
    read (in one piece: wsproto's h11 refuses a partial head over 16 KiB), then the
    connection. ``closed``: trio-websocket closed it."""

    def __init__(self, client: RawStream | trio.abc.Stream, replay: bytes) -> None:
        self._stream = RawTrioStream(client) if isinstance(client, RawStream) else client
        self._replay = replay
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._replay:
            await trio.lowlevel.checkpoint()
            data, self._replay = self._replay, b""
            return data
        return await self._stream.receive_some(max_bytes or RECV_BYTES)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self.closed = True
        await self._stream.aclose()


class RefusalCap(trio.abc.Stream):
    """The upstream of an upgrade as trio-websocket reads it: a refusal's body is capped.

    Until the handshake's final response head has passed, the bytes read are scanned: a
    ``101`` head turns the scan off (frames follow, not counted); after any other final
    head, more than :data:`MAX_REFUSAL_BODY` body bytes make the read raise
    ``BrokenResourceError`` with :attr:`too_large` set (the caller answers 502 instead of
    the refusal). 1xx heads other than 101 are skipped. Writes pass through.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._head = b""  # the head read so far (until its end is found)
        self._body = -1  # body bytes seen after a final non-101 head; -1: in a head
        self._open = False  # a 101 went by: nothing more to watch
        #: The refusal's body went past :data:`MAX_REFUSAL_BODY` (the read failed).
        self.too_large = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        if data and not self._open:
            self._scan(bytes(data))
            if self.too_large:
                raise trio.BrokenResourceError("WebSocket refusal body too large")
        return data

    def _scan(self, data: bytes) -> None:
        while data and not self._open:
            if self._body >= 0:
                self._body += len(data)
                self.too_large = self._body > MAX_REFUSAL_BODY
                return
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self._head = head
                self.too_large = len(head) > _MAX_HEAD
                return
            status = head[9:12]
            data, self._head = head[end + 4 :], b""
            if status == b"101":
                self._open = True
            elif not status.startswith(b"1"):
                self._body = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
