"""Longest-prefix routing on the normalized target view. Pure module.

A prefix matches the decision path (:attr:`TargetView.path`) only at a
path-segment boundary: ``/api/`` and ``/api`` both match ``/api``, ``/api/``
and ``/api/x``; neither matches ``/apix``. The path sent upstream is built from
the view's normalized segments, so the upstream gets the spelling the decision
was made on. The query string is never parsed, only carried over byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Route, UpstreamSpec
from ..errors import BadRequest
from ..http.target import TargetView

__all__ = ["Match", "Router"]


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    #: The normalized path after the stripped prefix (what an upstream's base path gets).
    rest: bytes
    #: The route's position in the table it came from (its upstream group's index).
    index: int = 0

    def path_for(self, spec: UpstreamSpec) -> bytes:
        """The path to send to ``spec``: its base path joined with :attr:`rest`."""
        return (spec.target.base_path.rstrip("/").encode() + self.rest) or b"/"

    @property
    def upstream_path(self) -> bytes:
        """The path for the route's first upstream."""
        return self.path_for(self.route.group[0])


class Router:
    """Longest-prefix matcher over a fixed route table, on the decision path of a
    :class:`~proxycore.target.TargetView`."""

    __slots__ = ("_table",)

    def __init__(self, routes: Sequence[Route]) -> None:
        table = []
        for index, route in enumerate(routes):
            stem = route.prefix.rstrip("/")
            depth = sum(1 for part in stem.split("/") if part)
            table.append((stem, index, depth, route))
        table.sort(key=lambda t: len(t[0]), reverse=True)
        self._table: tuple[tuple[str, int, int, Route], ...] = tuple(table)

    def match(self, view: TargetView) -> Match | None:
        """The route for ``view`` (or ``None``). Raises :class:`BadRequest` when the view
        holds an encoded slash and the route does not allow them."""
        path = view.path
        for stem, index, depth, route in self._table:
            n = len(stem)
            if path.startswith(stem) and (len(path) == n or path[n] == "/"):
                if view.encoded_slash and not route.allow_encoded_slashes:
                    raise BadRequest("encoded '/' or '\\' (%2F, %5C) is not allowed on this route")
                rest = view.wire_path(route.merge_slashes, depth if route.strip_prefix else 0)
                return Match(route, rest, index)
        return None
