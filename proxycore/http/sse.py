"""Server-Sent Events: an incremental parser (the WHATWG event-stream rules) and
the pieces the SSE features use. Pure module: no trio.

The parser sees the decoded body as it passes (any split: 4 KiB reads, chunk
boundaries, one byte at a time) and never changes a byte. It keeps at most
``max_bytes`` for a transcript (every byte it keeps counts: data, event type,
id and retry; then it records ``truncated`` and only counts), and it knows
whether the stream is at an event boundary (:attr:`SSEParser.at_boundary`) and
how many of the bytes fed since the last boundary belong to an unfinished event
(:attr:`SSEParser.tail`): the relay holds those back, so a heartbeat or an
error event only ever follows complete events.

Rules (https://html.spec.whatwg.org/multipage/server-sent-events.html):
lines end in CRLF, LF or CR; a leading UTF-8 BOM is skipped; ``:`` starts a
comment; ``data`` appends to the data buffer (joined with LF), ``event`` sets
the type, ``id`` the last event id (ignored if it contains NUL), ``retry``
ASCII digits only (a value over :data:`RETRY_MAX_DIGITS` significant digits is
ignored as absurd, never an error); a blank line dispatches the event if the
data buffer is not empty; a stream that ends mid-event does not dispatch it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "BOM",
    "HEARTBEAT",
    "RETRY_MAX_DIGITS",
    "SSEEvent",
    "SSEParser",
    "error_event",
    "is_event_stream",
]

BOM: Final = b"\xef\xbb\xbf"
HEARTBEAT: Final = b": keep-alive\n\n"
#: A ``retry`` value with more digits (over ~115 days in ms) is ignored as absurd.
RETRY_MAX_DIGITS: Final = 10


@dataclass(slots=True)
class SSEEvent:
    type: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"type": self.type, "data": self.data}
        if self.id is not None:
            out["id"] = self.id
        if self.retry is not None:
            out["retry"] = self.retry
        return out


@dataclass(slots=True)
class SSEParser:
    max_bytes: int = 8 * 1024 * 1024
    #: Events parsed and kept (within ``max_bytes``).
    events: list[SSEEvent] = field(default_factory=list)
    #: Events dispatched in all (kept or not).
    count: int = 0
    truncated: bool = False
    last_id: str | None = None
    _kept_bytes: int = 0
    _tail: int = 0
    _id_size: int = 0
    _line: bytearray = field(default_factory=bytearray)
    _data: list[bytes] = field(default_factory=list)
    _data_len: int = 0
    _type: bytes = b""
    _id: bytes | None = None
    _retry: int | None = None
    _pending: bool = False
    _data_seen: bool = False
    _after_cr: bool = False
    _started: bool = False
    _overflow: bool = False

    @property
    def at_boundary(self) -> bool:
        """True between events: nothing of an event has been seen since the last one."""
        return not self._line and not self._pending

    @property
    def tail(self) -> int:
        """How many of the last bytes fed belong to an event not finished yet (0 at a
        boundary): the bytes fed since the parser was last between events, counted as
        fed (a skipped BOM included). Comment lines between events are not a tail."""
        return self._tail

    def feed(self, data: bytes | bytearray | memoryview) -> list[SSEEvent]:
        """Parse more body bytes; return the events they completed (in order)."""
        chunk = bytes(data)
        if not self._started:
            if len(self._line) + len(chunk) < len(BOM) and BOM.startswith(
                bytes(self._line) + chunk
            ):
                self._line += chunk  # maybe the start of a BOM: wait for more
                self._tail += len(chunk)
                return []
            chunk = bytes(self._line) + chunk
            self._line.clear()
            self._started = True
            if chunk.startswith(BOM):
                chunk = chunk[len(BOM) :]
        done: list[SSEEvent] = []
        pos, end = 0, len(chunk)
        if self._after_cr and pos < end and chunk[0] == 0x0A:
            pos = 1  # the LF of a CRLF split across reads
        self._after_cr = False
        # The last position in ``chunk`` where the parser was between events (-1: none).
        mark = pos if self.at_boundary else -1
        while pos < end:
            cr = chunk.find(b"\r", pos)
            lf = chunk.find(b"\n", pos)
            if cr < 0 and lf < 0:
                self._append(chunk, pos, end)
                break
            stop = lf if cr < 0 or (0 <= lf < cr) else cr
            self._append(chunk, pos, stop)
            pos = stop + 1
            if chunk[stop] == 0x0D:
                if pos < end:
                    if chunk[pos] == 0x0A:
                        pos += 1
                else:
                    self._after_cr = True
            event = self._line_done()
            if event is not None:
                done.append(event)
            if not self._pending:
                mark = pos
        # Bytes after the mark all came in this call (a carried BOM prefix is before it).
        self._tail = end - mark if mark >= 0 else self._tail + len(data)
        return done

    def _append(self, chunk: bytes, start: int, stop: int) -> None:
        if stop <= start:
            return
        room = self.max_bytes - len(self._line)
        if room <= 0:
            self._overflow = True
            return
        if stop - start > room:
            self._overflow = True
            stop = start + room
        self._line += chunk[start:stop]

    def _line_done(self) -> SSEEvent | None:
        line = bytes(self._line)
        self._line.clear()
        overflow, self._overflow = self._overflow, False
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        self._pending = True
        if name == b"data":
            self._data_seen = True
            room = self.max_bytes - self._data_len
            if overflow or len(value) + 1 > room:
                self.truncated = True  # one event larger than the bound: keep its start only
                if room <= 1:
                    return None
                value = value[: room - 1]
            self._data.append(value)
            self._data_len += len(value) + 1
        elif name == b"event":
            self._type = value
        elif name == b"id":
            if b"\0" not in value:
                self._id = value
        elif name == b"retry" and value.isdigit():  # bytes.isdigit: ASCII digits only
            digits = value.lstrip(b"0")
            if len(digits) <= RETRY_MAX_DIGITS:  # int() of 4,300+ digits would raise
                self._retry = int(digits or b"0")
        return None

    def _dispatch(self) -> SSEEvent | None:
        pending, self._pending = self._pending, False
        seen, self._data_seen = self._data_seen, False
        data, self._data, self._data_len = self._data, [], 0
        etype, self._type = self._type, b""
        retry, self._retry = self._retry, None
        if self._id is not None:
            self.last_id = self._id.decode("utf-8", "replace")
            self._id_size = len(self._id)
            self._id = None
        if not pending or not seen:
            return None
        event = SSEEvent(
            type=etype.decode("utf-8", "replace") or "message",
            data=b"\n".join(data).decode("utf-8", "replace"),
            id=self.last_id,
            retry=retry,
        )
        self.count += 1
        # Every byte a kept event holds counts (as received): data, type, id (each event
        # carries the last id), retry.
        size = len(data) + sum(map(len, data)) + len(etype or b"message") + self._id_size
        if retry is not None:
            size += RETRY_MAX_DIGITS
        if not self.truncated and self._kept_bytes + size <= self.max_bytes:
            self._kept_bytes += size
            self.events.append(event)
        else:
            self.truncated = True  # kept events stay a prefix: no holes
        return event


def is_event_stream(content_type: bytes | None) -> bool:
    """Is this Content-Type ``text/event-stream`` (parameters and case ignored)?"""
    if not content_type:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream"


def error_event(status: int, message: str, request_id: str) -> bytes:
    """A well-formed SSE ``error`` event for the browser."""
    payload = json.dumps(
        {"type": "error", "status": status, "message": message, "request_id": request_id},
        separators=(", ", ": "),
    )
    return b"event: error\ndata: " + payload.encode() + b"\n\n"
