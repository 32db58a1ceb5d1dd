"""The one view of a request target that every decision uses. Pure module.

:func:`parse_target` turns the request target as received into a
:class:`TargetView`. Routing, ``methods``, ``deny_paths``, git-push detection,
forward auth (``X-Forwarded-Uri``), hooks (``request.path``), the access log
and the bytes forwarded upstream all use that view; nothing decides on the raw
string. The rules (README, Security):

- origin form only (``/...``); no fragment;
- percent-encoded unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded
  (RFC 3986 section 6.2.2.2); the hex digits of every other escape are
  upper-cased; raw bytes that a URI may not carry (space, ``"``, ``<``,
  bytes above 0x7F...) are percent-encoded;
- ``%2F`` and ``%5C`` (an encoded ``/`` or ``\\``) stay encoded and are
  flagged: a route refuses them (400) unless it sets
  ``allow_encoded_slashes = true``;
- a raw ``\\``, a raw or encoded control character (``%00`` included), a
  malformed escape and escapes that are not valid UTF-8 (overlong forms such as
  ``%C0%AE`` included) are refused (400);
- ``.`` and ``..`` segments are refused (400), also encoded and also with
  parameters (``..;x``);
- a segment's ``;params`` are ignored for decisions and kept in the forwarded
  target;
- decisions see empty segments merged (``//a///b`` is ``/a/b``), as nginx;
  the forwarded target merges them too unless the route sets
  ``merge_slashes = false``.

The decision path (:attr:`TargetView.path`) is fully percent-decoded text
(what a decoding upstream such as an ASGI server, Go or nginx acts on), except
that an encoded slash stays ``%2F`` / ``%5C``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ..errors import BadRequest

__all__ = ["TargetView", "parse_target"]

_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
#: Bytes a path segment may carry raw (RFC 3986 pchar without '%'); others are encoded.
_PCHAR: Final = _UNRESERVED | frozenset(b"!$&'()*+,;=:@")
#: Paths made only of these bytes need no work beyond the dot-segment and ``//`` checks.
_PLAIN: Final = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_DOTS: Final = frozenset({".", ".."})
_SLASHES: Final = frozenset({0x2F, 0x5C})


@dataclass(frozen=True, slots=True)
class TargetView:
    """A request target after :func:`parse_target`."""

    #: The decision path: decoded text, ``;params`` removed, empty segments merged.
    path: str
    #: The normalized path segments as forwarded (without the leading ``/``), params kept.
    segments: tuple[bytes, ...]
    #: Each segment's decoded name (params removed): ``names[i]`` belongs to ``segments[i]``.
    names: tuple[str, ...]
    #: The query, byte for byte, with its leading ``?`` (or ``b""``).
    query: bytes
    #: True when the path holds ``%2F`` or ``%5C``.
    encoded_slash: bool = False

    def wire_path(self, merge_slashes: bool = True, skip: int = 0, params: bool = True) -> bytes:
        """The normalized path as forwarded, without the first ``skip`` named segments
        (then ``b""`` when nothing is left, so that a route's base path is not given a slash)."""
        segments, names = self.segments, self.names
        stripping = skip > 0
        parts: list[bytes] = []
        last = len(segments) - 1
        for i, (segment, name) in enumerate(zip(segments, names, strict=True)):
            if skip and name:
                skip -= 1
                continue
            if skip:
                continue
            if not params:
                segment = segment.partition(b";")[0]
            if merge_slashes and not segment and i != last:
                continue
            parts.append(segment)
        if stripping and not parts:
            return b""
        return b"/" + b"/".join(parts)

    @property
    def target(self) -> bytes:
        """The normalized origin-form target (merged slashes) with the query."""
        return self.wire_path() + self.query

    @property
    def auth_target(self) -> bytes:
        """What an auth service is asked about: the normalized target without ``;params``
        (the decision path, still percent-encoded) and the query."""
        return self.wire_path(params=False) + self.query


def parse_target(target: bytes) -> TargetView:
    """Normalize ``target`` (origin form) or raise :class:`BadRequest`."""
    if not target.startswith(b"/"):
        raise BadRequest("request target must be in origin form (start with '/')")
    q = target.find(b"?")
    path, query = (target, b"") if q < 0 else (target[:q], target[q:])
    if b"#" in target:
        raise BadRequest("request target must not contain a fragment")
    if _has_control(query):
        raise BadRequest("request target must not contain control characters")
    raw_segments = path[1:].split(b"/")
    if _PLAIN.fullmatch(path):
        names = tuple(s.decode("ascii") for s in raw_segments)
        segments = tuple(raw_segments)
        if "." in path.decode("ascii"):
            for name in names:
                if name in _DOTS:
                    raise BadRequest("request path must not contain dot segments ('.' or '..')")
        if b"//" not in path:
            return TargetView(path.decode("ascii"), segments, names, query)
        return TargetView(_decision_path(names), segments, names, query)
    seg_out: list[bytes] = []
    name_out: list[str] = []
    encoded_slash = False
    for raw in raw_segments:
        name_raw, sep, params_raw = raw.partition(b";")
        wire_name, text, slash = _normalize(name_raw)
        encoded_slash = encoded_slash or slash
        if text in _DOTS:
            raise BadRequest("request path must not contain dot segments ('.' or '..')")
        wire = wire_name
        if sep:
            wire_params, _, slash = _normalize(params_raw)
            encoded_slash = encoded_slash or slash
            wire += b";" + wire_params
        seg_out.append(wire)
        name_out.append(text)
    names = tuple(name_out)
    return TargetView(_decision_path(names), tuple(seg_out), names, query, encoded_slash)


def _decision_path(names: tuple[str, ...]) -> str:
    kept = [n for n in names if n]
    path = "/" + "/".join(kept)
    if kept and not names[-1]:
        path += "/"
    return path


def _has_control(data: bytes) -> bool:
    return any(b < 0x20 or b == 0x7F for b in data)


def _normalize(raw: bytes) -> tuple[bytes, str, bool]:
    """One segment part -> (normalized wire bytes, decoded text, has an encoded slash)."""
    wire = bytearray()
    decoded = bytearray()
    slash = False
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25:  # '%'
            if i + 2 >= n:
                raise BadRequest("malformed percent-encoding in the request path")
            h1, h2 = raw[i + 1], raw[i + 2]
            if h1 not in _HEX or h2 not in _HEX:
                raise BadRequest("malformed percent-encoding in the request path")
            value = int(raw[i + 1 : i + 3], 16)
            i += 3
            if value < 0x20 or value == 0x7F:
                raise BadRequest("request path must not contain control characters")
            if value in _UNRESERVED:
                wire.append(value)
                decoded.append(value)
            elif value in _SLASHES:
                slash = True
                wire += b"%%%02X" % value
                decoded += b"%%%02X" % value
            else:
                wire += b"%%%02X" % value
                decoded.append(value)
            continue
        if b < 0x20 or b == 0x7F:
            raise BadRequest("request path must not contain control characters")
        if b == 0x5C:
            raise BadRequest("request path must not contain '\\'")
        if b not in _PCHAR:
            wire += b"%%%02X" % b
        else:
            wire.append(b)
        decoded.append(b)
        i += 1
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request path is not valid UTF-8 once percent-decoded") from None
    return bytes(wire), text, slash
