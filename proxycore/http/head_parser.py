"""A strict, pure parser for the common shape of an HTTP/1.x response head. Pure module.

It is the fast path of :class:`~proxycore.http.response_head.ResponseHeadReader` and
answers only what it is sure h11 (0.16) answers the same way. It never refuses: a head
it does not recognise as plainly valid is *unsure* and goes to h11, which then accepts
or refuses it exactly as before. So it may only ever accept a subset of what h11
accepts, with h11's result (``tests/unit/test_response_head_fuzz.py`` checks both
against h11, differentially). What it recognises:

- the head ends at the first CRLF CRLF and h11 would end it there too: no bare LF
  (h11 also ends a head at ``LF LF`` or ``LF CR LF``) and no lone CR anywhere, and
  it starts with a byte above SP (h11 refuses anything else, empty line first or not);
- the status line is ``HTTP/d.d SP 3DIGIT [SP reason]`` with a status of 100 or more
  and not 101 (h11 refuses those: below 100 is no response, and a 101 answers no
  request the proxy sent), the reason free of NUL, LF, CR, VT and FF (h11's
  ``[^\\x00\\s]`` plus SP/HTAB);
- each field line is ``token ":" OWS value OWS``: no obs-fold (a line starting with
  SP/HTAB is a continuation h11 joins), no whitespace before the colon, the value free
  of NUL, CR, LF, VT and FF and stripped of SP/HTAB only, as h11 does;
- at most one ``Content-Length`` (1-20 ASCII digits) and at most one
  ``Transfer-Encoding`` (``chunked`` in any case, kept lower-cased as h11 keeps it);
  anything else about them (lists, repeats, other codings) is h11's to judge.

The result keeps h11's normalization: each field as ``(raw name, lower-cased name,
value)``, the reason and version as written (no reason: ``b""``).
"""

from __future__ import annotations

from typing import Final

__all__ = ["NEED_MORE", "UNSURE", "ParsedHead", "head_end", "parse_head"]

#: :func:`head_end`: no complete head yet (and nothing h11 would refuse early).
NEED_MORE: Final = -1
#: :func:`head_end`: a shape only h11 should judge.
UNSURE: Final = -2

#: RFC 9110 tchar, h11's ``token``.
_TCHAR: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CL_MAX_DIGITS: Final = 20  # h11's CONTENT_LENGTH_MAX_DIGITS
#: Memo of status lines (line -> status, reason, version) and field names (name ->
#: lower-cased) this parser accepted: the same few recur on every response. Bounded
#: in entries and key length (an upstream can't grow them), never evicted.
_STATUS_LINES: dict[bytes, tuple[int, bytes, bytes]] = {}
_NAMES: dict[bytes, bytes] = {}
_MEMO_ENTRIES: Final = 256
_MEMO_KEY_BYTES: Final = 64


#: One response head as h11 would report it: (status, reason, HTTP version, fields),
#: each field as (raw name, lower-cased name, value), in order.
ParsedHead = tuple[int, bytes, bytes, list[tuple[bytes, bytes, bytes]]]


def head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Where the head at the front of ``buf`` ends: the index past its first CRLF CRLF.

    :data:`NEED_MORE` when no head is complete (the search may resume at
    ``max(0, len(buf) - 3)`` next time: pass it as ``start``). :data:`UNSURE` for what
    h11 refuses on sight (a first byte below ``!``: an empty line, a space, a control)
    or may end elsewhere (a blank line with a bare LF, which h11 also takes). Whether
    the head has a bare LF before its CRLF CRLF is :func:`parse_head`'s to see. The
    caller still owes h11's size check on incomplete data."""
    if not buf:
        return NEED_MORE
    if buf[0] < 0x21:
        return UNSURE  # h11: "illegal request line" / "no response line received"
    end = buf.find(b"\r\n\r\n", start)
    if end >= 0:
        return end + 4
    if buf.find(b"\n\n", start) >= 0 or buf.find(b"\n\r\n", start) >= 0:
        return UNSURE
    return NEED_MORE


def parse_head(head: bytes) -> ParsedHead | None:
    """``head`` (as :func:`head_end` cut it, with its CRLF CRLF) as h11 reads it, or None
    when only h11 should judge it (it may refuse it, or accept it in a way this parser
    does not reproduce)."""
    # h11 refuses NUL and ``\s`` but SP/HTAB in a head line (CR and LF: below)
    if b"\x00" in head or b"\x0b" in head or b"\x0c" in head:
        return None
    lines = head[:-4].split(b"\r\n")
    breaks = len(lines) + 1  # one CRLF per line and the blank line's
    if head.count(b"\r") != breaks or head.count(b"\n") != breaks:
        return None  # a lone CR or LF inside a line (and so no bare LF ends it earlier)
    status_line = _STATUS_LINES.get(lines[0]) or _status_line(lines[0])
    if status_line is None:
        return None
    fields: list[tuple[bytes, bytes, bytes]] = []
    length = coding = False
    for field in lines[1:]:
        name, colon, value = field.partition(b":")
        lower = _NAMES.get(name) or _field_name(name)
        if lower is None or not colon:
            return None  # no colon, empty name, obs-fold, space before the colon, ...
        value = value.strip(b" \t")
        if lower == b"content-length":
            if length or not value.isdigit() or len(value) > _CL_MAX_DIGITS:
                return None  # bytes.isdigit: ASCII digits only
            length = True
        elif lower == b"transfer-encoding":
            value = value.lower()
            if coding or value != b"chunked":
                return None
            coding = True
        fields.append((name, lower, value))
    status, reason, version = status_line
    return status, reason, version, fields


def _status_line(line: bytes) -> tuple[int, bytes, bytes] | None:
    """``HTTP/d.d SP 3DIGIT [SP reason]`` (the reason's bytes were checked with the
    head's), status 100 or more but not 101, as (status, reason, version)."""
    if (
        len(line) < 12
        or line[:5] != b"HTTP/"
        or line[6] != 0x2E  # "."
        or line[8] != 0x20
        or not 0x30 <= line[5] <= 0x39
        or not 0x30 <= line[7] <= 0x39
        or not line[9:12].isdigit()
    ):
        return None
    if len(line) == 12:
        reason = b""
    elif line[12] == 0x20:
        reason = line[13:]
    else:
        return None
    status = int(line[9:12])
    if status < 100 or status == 101:
        return None
    parsed = (status, reason, line[5:8])
    if len(_STATUS_LINES) < _MEMO_ENTRIES and len(line) <= _MEMO_KEY_BYTES:
        _STATUS_LINES[line] = parsed
    return parsed


def _field_name(name: bytes) -> bytes | None:
    """A token's lower-cased form (None if ``name`` is not one)."""
    if not name or name.translate(None, _TCHAR):
        return None
    lower = name.lower()
    if len(_NAMES) < _MEMO_ENTRIES and len(name) <= _MEMO_KEY_BYTES:
        _NAMES[name] = lower
    return lower
