"""``ScriptedStream``: a :class:`proxycore.net.stream.Stream` that replays a script.

Modelled on httpcore's ``AsyncMockStream``. A test scripts what the peer
sends and inspects what the code under test wrote; no socket is involved, so
``autojump_clock`` is safe with it.

Reads replay the script, one item per read:

- ``bytes``: returned (at most ``nbytes`` per read; the rest stays at the head,
  so one scripted chunk larger than the read size takes several reads);
  an empty ``b""`` is skipped;
- :data:`EOF`: the read returns 0 (the peer closed); later items still follow;
- ``Pause(seconds)``: sleeps ``seconds`` (on the trio clock), then goes on with
  the next item: a silent peer for a while;
- an exception instance (usually ``StreamBroken("reset")``): raised by the read.

When the script is exhausted, a read waits (a live peer with nothing to say)
until :meth:`ScriptedStream.feed` adds items or the read is cancelled. So a
script that should end the body with the peer closing must end with ``EOF``.

Writes are recorded in :attr:`ScriptedStream.writes` (one ``bytes`` per
``send_all``, with its trio time in :attr:`ScriptedStream.write_times`);
:attr:`ScriptedStream.written` joins them. ``break_after=n``
makes writes fail with ``StreamBroken`` once ``n`` bytes were accepted (the
failing write records its first bytes up to ``n``). ``block_writes()`` makes
every ``send_all`` wait (a sink that does not drain) until
``unblock_writes()``, at most ``send_timeout`` (then ``SendTimeout``, as on the real
streams); ``partial_on_block=n`` makes a blocked ``send_all`` first
accept ``n`` bytes of its payload (a kernel buffer that took part of the write).

Like the real streams, a ``send_all`` that fails or is cancelled after some of
its bytes were accepted sets :attr:`ScriptedStream.write_cut`, and every later
``send_all`` raises ``StreamBroken`` at once.

Both directions checkpoint like the real streams do, and raise
``StreamBroken`` after :meth:`ScriptedStream.close`.

Example::

    src = ScriptedStream([b"HTTP/1.1 200 OK\\r\\n", b"Content-Length: 2\\r\\n\\r\\nhi", EOF])
    dst = ScriptedStream()
    ...
    assert dst.written == b"hi"
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

import trio

from proxycore.net.stream import NO_SEND_TIMEOUT, Buffer, SendTimeout, StreamBroken

__all__ = ["EOF", "Pause", "ScriptItem", "ScriptedStream", "trickle"]


class _Marker(enum.Enum):
    EOF = "EOF"


#: Script item: the peer closes (one read returns 0).
EOF: Final = _Marker.EOF


@dataclass(frozen=True, slots=True)
class Pause:
    """Script item: the peer is silent for ``seconds`` (trio clock), then goes on."""

    seconds: float


ScriptItem: TypeAlias = bytes | Literal[_Marker.EOF] | Pause | BaseException


def trickle(data: bytes, size: int = 1) -> list[ScriptItem]:
    """``data`` as script items of ``size`` bytes each (one read per item)."""
    return [data[i : i + size] for i in range(0, len(data), size)]


class ScriptedStream:
    """A scripted peer behind the ``Stream`` interface (see the module docstring).

    Attributes:
        writes: every ``send_all`` payload, in order (bytes accepted only).
        write_times: ``trio.current_time()`` of each entry of ``writes``.
        reads: how many ``recv_into`` calls started (for backpressure asserts).
        closed: ``close()`` was called.
    """

    def __init__(
        self, script: Iterable[ScriptItem] = (), *, break_after: int | None = None
    ) -> None:
        self._script: deque[ScriptItem] = deque(script)
        self._fed = trio.Event()
        self._write_gate: trio.Event | None = None
        self._break_after = break_after
        self._nwritten = 0
        self._partial = 0
        self._cut = False
        #: As on the real streams: a blocked write waits at most this long (trio clock),
        #: then raises ``SendTimeout`` and cuts the stream.
        self.send_timeout: float = NO_SEND_TIMEOUT
        self.writes: list[bytes] = []
        self.write_times: list[float] = []
        self.reads = 0
        self.closed = False

    # -- test side ---------------------------------------------------------

    def feed(self, *items: ScriptItem) -> None:
        """Append items to the script (wakes a read waiting at its end)."""
        self._script.extend(items)
        self._fed.set()

    @property
    def written(self) -> bytes:
        """All bytes written so far."""
        return b"".join(self.writes)

    @property
    def script_left(self) -> list[ScriptItem]:
        """The items not read yet (a partly read chunk shows its rest)."""
        return list(self._script)

    def block_writes(self, partial_on_block: int = 0) -> None:
        """From now on ``send_all`` waits until :meth:`unblock_writes`; it first accepts
        (records) ``partial_on_block`` bytes of its payload, the rest once unblocked."""
        self._partial = partial_on_block
        if self._write_gate is None:
            self._write_gate = trio.Event()

    @property
    def bytes_sent(self) -> int:
        """Bytes accepted so far (as on the real streams, a cut write's part included)."""
        return self._nwritten

    @property
    def write_cut(self) -> bool:
        """A write failed or was cancelled after some of its bytes were accepted."""
        return self._cut

    def unblock_writes(self) -> None:
        if self._write_gate is not None:
            self._write_gate.set()
            self._write_gate = None

    # -- the Stream interface ----------------------------------------------

    async def recv_into(self, buf: bytearray, nbytes: int) -> int:
        self.reads += 1
        await trio.lowlevel.checkpoint()
        while True:
            if self.closed:
                raise StreamBroken("EBADF")
            if not self._script:
                self._fed = trio.Event()
                await self._fed.wait()
                continue
            item = self._script.popleft()
            if item is EOF:
                return 0
            if isinstance(item, Pause):
                end = trio.current_time() + item.seconds
                try:
                    await trio.sleep(item.seconds)
                except trio.Cancelled:  # a silent peer stays silent for the rest of it
                    self._script.appendleft(Pause(max(0.0, end - trio.current_time())))
                    raise
                continue
            if isinstance(item, BaseException):
                raise item
            if not item:
                continue
            n = min(nbytes, len(item))
            buf[:n] = item[:n]
            if n < len(item):
                self._script.appendleft(item[n:])
            return n

    async def send_all(self, data: Buffer) -> None:
        if self._cut:
            raise StreamBroken("write cut")
        await trio.lowlevel.checkpoint()
        chunk = bytes(data)
        if self._write_gate is not None:
            partial = 0 < self._partial < len(chunk)
            if partial:
                self._record(chunk[: self._partial])
                chunk = chunk[self._partial :]
            try:
                with trio.move_on_after(self.send_timeout) as scope:
                    while self._write_gate is not None:
                        await self._write_gate.wait()
            except BaseException:
                self._cut = self._cut or partial
                raise
            if scope.cancelled_caught:
                self._cut = True
                raise SendTimeout(f"peer accepted no bytes for {self.send_timeout:g} s")
        if self.closed:
            raise StreamBroken("EBADF")
        if self._break_after is not None:
            room = self._break_after - self._nwritten
            if len(chunk) > room:
                if room > 0:
                    self._record(chunk[:room])
                self._cut = True
                raise StreamBroken("EPIPE")
        self._record(chunk)

    def _record(self, chunk: bytes) -> None:
        self.writes.append(chunk)
        self.write_times.append(trio.current_time())
        self._nwritten += len(chunk)

    def has_pending_input(self) -> bool:
        """True if closed, or if the next item is data, EOF or an error (not a Pause)."""
        if self.closed:
            return True
        for item in self._script:
            if item != b"":
                return not isinstance(item, Pause)
        return False

    def close(self) -> None:
        """Close; a read waiting at the script's end wakes and raises ``StreamBroken``."""
        self.closed = True
        self._fed.set()
