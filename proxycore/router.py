"""Request target checks and longest-prefix routing. Pure module.

A prefix matches only at a path-segment boundary: ``/api/`` and ``/api`` both
match ``/api``, ``/api/`` and ``/api/x``; neither matches ``/apix``. The query
string is never parsed, only carried over byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .config import Route
from .errors import BadRequest

__all__ = ["Match", "Router", "check_target", "split_target"]

_PERCENT: Final = re.compile(rb"%([0-9A-Fa-f]{2})")
_SEGMENT_SPLIT: Final = re.compile(rb"[/\\]")
_DOT_SEGMENTS: Final = frozenset({b".", b".."})


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """``b"/a/b?x=1"`` -> ``(b"/a/b", b"?x=1")``; the query keeps its ``?``."""
    q = target.find(b"?")
    if q < 0:
        return target, b""
    return target[:q], target[q:]


def _unquote(path: bytes) -> bytes:
    return _PERCENT.sub(lambda m: bytes((int(m.group(1), 16),)), path)


def check_target(target: bytes) -> tuple[bytes, bytes]:
    """Refuse targets that are not in origin form or that carry dot segments.

    Returns ``(path, query)``. Raises :class:`BadRequest`. Dot segments are
    looked for after percent-decoding and with ``\\`` as a separator too, so
    ``%2e%2E``, ``.%2e`` and ``..\\`` are caught whatever the upstream does
    with them.
    """
    if not target.startswith(b"/") or target.startswith(b"//"):
        raise BadRequest("request target must be in origin form (start with a single '/')")
    path, query = split_target(target)
    if b"#" in target:
        raise BadRequest("request target must not contain a fragment")
    if b"." in path or b"%" in path or b"\\" in path:
        decoded = _unquote(path) if b"%" in path else path
        if any(seg in _DOT_SEGMENTS for seg in _SEGMENT_SPLIT.split(decoded)):
            raise BadRequest("request path must not contain dot segments ('.' or '..')")
    return path, query


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    #: The path to send upstream (the route's base path joined with the rest).
    upstream_path: bytes


class Router:
    """Longest-prefix matcher over a fixed route table."""

    __slots__ = ("_table",)

    def __init__(self, routes: Sequence[Route]) -> None:
        table = []
        for route in routes:
            stem = route.prefix.rstrip("/").encode()
            base = route.target.base_path.rstrip("/").encode()
            table.append((stem, base, route))
        table.sort(key=lambda t: len(t[0]), reverse=True)
        self._table: tuple[tuple[bytes, bytes, Route], ...] = tuple(table)

    def match(self, path: bytes) -> Match | None:
        for stem, base, route in self._table:
            n = len(stem)
            if path.startswith(stem) and (len(path) == n or path[n] == 0x2F):
                rest = path[n:] if route.strip_prefix else path
                return Match(route, (base + rest) or b"/")
        return None
