"""Strict, incremental validator for HTTP/1.1 chunked message bodies (RFC 9112 section 7.1).

The proxy forwards chunked bodies raw. :class:`ChunkedScanner` only checks the framing, reports
which byte runs of each read are chunk payload, and says where the body ends, so the bytes after
it (the next pipelined message) stay unconsumed. It is at least as strict as h11 0.16. It also
says where the trailer section starts (``trailer_start``), so request trailers can be dropped.

The scanner is a state machine with one state per position in the grammar, so a body may be split
anywhere between calls; nothing is buffered except at most 18 bytes of a trailer field name::

    SIZE      1-16 hex digits          ";" -> EXT      CR -> SIZE_LF
    EXT       extension bytes          CR -> SIZE_LF   (no CTL except HTAB)
    SIZE_LF   LF                       -> DATA if size > 0, else TRAILER
    DATA      `size` payload bytes     skipped in one step per call -> DATA_CR
    DATA_CR   CR -> DATA_LF,  DATA_LF  LF -> SIZE
    TRAILER   start of a field line    CR -> END_LF    token byte -> NAME (SP/HTAB: obs-fold)
    NAME      token bytes              ":" -> VALUE
    VALUE     field-value bytes        CR -> VALUE_LF  (no CTL except HTAB)
    VALUE_LF  LF -> TRAILER,  END_LF   LF -> DONE

Byte runs inside a state are matched with precompiled regexes (``match(data, pos, endpos)``),
which work on bytes, bytearray and memoryview without copying. Pure module: no trio, no I/O.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["LAST_CHUNK", "ChunkedError", "ChunkedScanner", "encode_chunk_header"]

#: The last-chunk with an empty trailer section: ends every chunked body we generate.
LAST_CHUNK: Final[bytes] = b"0\r\n\r\n"

_MAX_SIZE_DIGITS: Final = 16
_CR: Final = 0x0D
_LF: Final = 0x0A
_SP: Final = 0x20
_HTAB: Final = 0x09
_SEMI: Final = 0x3B
_COLON: Final = 0x3A
# Bytes allowed in chunk extensions and trailer field values: HTAB, SP, VCHAR, obs-text.
_TEXT: Final = rb"[\t\x20-\x7e\x80-\xff]"
_HEX_RUN: Final = re.compile(rb"[0-9A-Fa-f]*")
_TEXT_RUN: Final = re.compile(_TEXT + rb"*")
_TOKEN_RUN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]*")
# Fast path: a whole size line inside the window.
_SIZE_LINE: Final = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;" + _TEXT + rb"*)?\r\n")
# RFC 9110 section 6.5.1: framing fields must not be sent as trailers (h11 rejects most of them).
_FRAMING_FIELDS: Final = (b"content-length", b"transfer-encoding")
_NAME_KEEP: Final = 18  # longer than any name in _FRAMING_FIELDS

(_SIZE, _EXT, _SIZE_LF, _DATA, _DATA_CR, _DATA_LF) = range(6)
(_TRAILER, _NAME, _VALUE, _VALUE_LF, _END_LF, _DONE, _FAILED) = range(6, 13)


class ChunkedError(ValueError):
    """Malformed chunked framing. The message says what is wrong but NEVER quotes the
    body bytes (they may contain secrets); it may name positions/lengths."""


def encode_chunk_header(size: int) -> bytes:
    """Return the chunk-size line ``b"%x\\r\\n" % size`` (``size`` 0 starts the last chunk)."""
    if not 0 <= size < 1 << (4 * _MAX_SIZE_DIGITS):
        raise ValueError("chunk size out of range")
    return b"%x\r\n" % size


def _run(pattern: re.Pattern[bytes], data: bytes | bytearray | memoryview, i: int, end: int) -> int:
    """End of the run of bytes matching ``pattern`` (a ``[...]*`` class) starting at ``i``."""
    m = pattern.match(data, i, end)
    assert m is not None  # a starred pattern always matches
    return m.end()


class ChunkedScanner:
    """Validate one chunked body fed in arbitrary pieces; see the module docstring.

    A memoryview passed to :meth:`feed` must be a flat byte view (format ``"B"``)."""

    def __init__(self, *, max_line_bytes: int = 4096, max_trailer_bytes: int = 16384) -> None:
        if max_line_bytes < 3 or max_trailer_bytes < 2:
            raise ValueError("limits too small for the shortest line")
        self._max_line = max_line_bytes  # one size line, including its CRLF
        self._max_trailer = max_trailer_bytes  # trailer section, including the final CRLF
        self.done: bool = False
        self.payload_bytes: int = 0
        #: After each :meth:`feed`: the absolute offset into its data where this window's
        #: trailer-section bytes begin (just past the last-chunk line), or the returned end
        #: if the window holds none. ``data[start:trailer_start]`` is the body without its
        #: trailers; a caller that drops trailers writes that, then ``b"\r\n"`` once done.
        self.trailer_start: int = 0
        self._state = _SIZE
        self._offset = 0  # body bytes consumed by earlier calls (for error messages)
        self._digits = 0  # hex digits seen in the current size line
        self._size = 0  # value of those digits
        self._line = 0  # bytes of the current size line seen (CRLF excluded)
        self._remaining = 0  # payload bytes still expected in the current chunk
        self._trailer = 0  # trailer section bytes seen
        self._name = bytearray()  # first _NAME_KEEP bytes of the current trailer field name

    @property
    def declared_bytes(self) -> int:
        """Payload bytes seen plus those the current chunk's size line still promises: a
        lower bound of the body's size, known before the data arrives (for size limits)."""
        return self.payload_bytes + self._remaining

    def feed(
        self,
        data: bytes | bytearray | memoryview,
        start: int = 0,
        end: int | None = None,
        spans: list[tuple[int, int]] | None = None,
    ) -> int:
        """Scan data[start:end]. Return the index (an absolute offset into data, between start
        and end) just past the last byte that belongs to this body: == end unless the body
        finished inside the window, in which case it is the offset right after the final CRLF
        and the bytes after it are not consumed (they belong to the next message). If `spans`
        is given, append (s, e) absolute offsets into data of every run of chunk payload bytes
        in the window (so a caller can read the decoded data without copying). Raises
        ChunkedError on malformed framing. Once done, feed returns start and appends nothing."""
        if end is None:
            end = len(data)
        if not 0 <= start <= end <= len(data):
            raise ValueError("feed window out of range")
        if self._state == _FAILED:
            raise ChunkedError("chunked body already rejected")
        if self.done:
            self.trailer_start = start
            return start
        i = start
        if self._state == _SIZE and not self._line:
            # Fast path: whole chunks (size line, data, CRLF) at the window's start, one
            # step each: exactly what _scan's states accept and how they end (SIZE, no
            # partial line); anything else (a chunk cut by the window's end, the last
            # chunk, any error) is left to them from the same position.
            max_line = self._max_line
            while i < end:
                m = _SIZE_LINE.match(data, i, end)
                if m is None:
                    break
                j = m.end()
                size = int(m.group(1), 16)
                k = j + size
                if (
                    not size
                    or j - i > max_line
                    or k + 2 > end
                    or data[k] != _CR
                    or data[k + 1] != _LF
                ):
                    break
                if spans is not None:
                    spans.append((j, k))
                self.payload_bytes += size
                i = k + 2
            self._offset += i - start
            if i == end:
                self.trailer_start = i
                return i
        j = self._scan(data, i, end, spans)
        self._offset += j - i
        return j

    def _fail(self, what: str, pos: int) -> ChunkedError:
        self._state = _FAILED
        return ChunkedError(f"malformed chunked body: {what} (at body offset {pos})")

    def _scan(
        self,
        data: bytes | bytearray | memoryview,
        i: int,
        end: int,
        spans: list[tuple[int, int]] | None,
    ) -> int:
        base = self._offset - i  # body offset of data[k] is base + k
        state = self._state
        trailer_start = i if state >= _TRAILER else -1
        while i < end:
            if state == _DATA:
                n = min(self._remaining, end - i)
                if spans is not None:
                    spans.append((i, i + n))
                i += n
                self.payload_bytes += n
                self._remaining -= n
                if not self._remaining:
                    state = _DATA_CR
            elif state in (_DATA_CR, _DATA_LF):
                if data[i] != (_CR if state == _DATA_CR else _LF):
                    raise self._fail("chunk data not followed by CRLF", base + i)
                i += 1
                state = _DATA_LF if state == _DATA_CR else _SIZE
            elif state == _SIZE:
                if self._line == 0:
                    m = _SIZE_LINE.match(data, i, end)
                    if m is not None and m.end() - i <= self._max_line:
                        self._size = int(m.group(1), 16)
                        i = m.end()
                        state = self._end_size_line()
                        if state == _TRAILER:
                            trailer_start = i
                        continue
                k = _run(_HEX_RUN, data, i, end)
                if k > i:
                    self._digits += k - i
                    if self._digits > _MAX_SIZE_DIGITS:
                        raise self._fail("chunk size has more than 16 hex digits", base + i)
                    self._size = (self._size << (4 * (k - i))) | int(bytes(data[i:k]), 16)
                if k < end:
                    b = data[k]
                    if self._digits == 0:
                        raise self._fail("chunk size does not start with a hex digit", base + k)
                    if b not in (_SEMI, _CR):
                        raise self._fail("invalid byte after chunk size", base + k)
                    state = _EXT if b == _SEMI else _SIZE_LF
                    k += 1
                i = self._size_line_bytes(k, i, base)
            elif state == _EXT:
                k = _run(_TEXT_RUN, data, i, end)
                if k < end:
                    if data[k] != _CR:
                        raise self._fail("control byte or bare LF in chunk extension", base + k)
                    state = _SIZE_LF
                    k += 1
                i = self._size_line_bytes(k, i, base)
            elif state == _SIZE_LF:
                if data[i] != _LF:
                    raise self._fail("bare CR in chunk size line", base + i)
                i += 1
                state = self._end_size_line()
                if state == _TRAILER:
                    trailer_start = i
            else:
                i, state = self._scan_trailer(data, i, end, base, state)
                if state == _DONE:
                    self.done = True
                    break
        self._state = state
        self.trailer_start = i if trailer_start < 0 else trailer_start
        return i

    def _size_line_bytes(self, k: int, i: int, base: int) -> int:
        self._line += k - i
        if self._line + 1 > self._max_line:  # + 1: the LF still to come
            raise self._fail(f"chunk size line longer than {self._max_line} bytes", base + k)
        return k

    def _end_size_line(self) -> int:
        size = self._size
        self._size = self._digits = self._line = 0
        self._remaining = size
        return _DATA if size else _TRAILER

    def _scan_trailer(
        self, data: bytes | bytearray | memoryview, i: int, end: int, base: int, state: int
    ) -> tuple[int, int]:
        """One step in the trailer section; returns the new (position, state)."""
        k = i
        if state == _TRAILER:
            b = data[i]
            if b in (_SP, _HTAB):
                raise self._fail("obsolete line folding in trailer section", base + i)
            if b == _CR:
                state = _END_LF
                k += 1
            else:
                self._name.clear()
                state = _NAME
        elif state == _NAME:
            k = _run(_TOKEN_RUN, data, i, end)
            keep = min(k, i + _NAME_KEEP - len(self._name))
            if keep > i:
                self._name += data[i:keep]
            if k < end:
                if data[k] != _COLON or not self._name:
                    raise self._fail("invalid trailer field name", base + k)
                if bytes(self._name).lower() in _FRAMING_FIELDS:
                    raise self._fail("framing field in trailer section", base + k)
                state = _VALUE
                k += 1
        elif state == _VALUE:
            k = _run(_TEXT_RUN, data, i, end)
            if k < end:
                if data[k] != _CR:
                    raise self._fail("control byte or bare LF in trailer field", base + k)
                state = _VALUE_LF
                k += 1
        else:  # _VALUE_LF or _END_LF
            if data[i] != _LF:
                raise self._fail("bare CR in trailer section", base + i)
            state = _TRAILER if state == _VALUE_LF else _DONE
            k += 1
        self._trailer += k - i
        if self._trailer > self._max_trailer:
            raise self._fail(f"trailer section longer than {self._max_trailer} bytes", base + k)
        return k, state
