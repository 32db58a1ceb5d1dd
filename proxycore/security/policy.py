"""Per-route request policy, evaluated on the request head. Pure: no trio, no sockets.

A :class:`Policy` is compiled once from a route's settings and answers, per request, either
``None`` (allowed) or a :class:`Refusal` that the caller turns into an error response. Rules are
checked in this order: git push, the methods allow-list (``TRACE`` and ``CONNECT`` are refused
unless listed), then ``deny_paths``.

Every rule sees the decision path of the normalized target view (:mod:`proxycore.target`):
percent-decoded, ``;params`` removed, empty segments merged. ``deny_paths`` are glob patterns in
:func:`fnmatch.fnmatchcase` syntax (``*``, ``?``, ``[...]``) matched case-sensitively against the
whole of that path. Note that ``*`` matches any characters INCLUDING ``/`` (and ``?`` any one
character, ``/`` too): ``/admin/*`` denies ``/admin/x``, ``/admin/x/y``, ``/adm%69n/x``,
``//admin/x`` and ``/admin;v=1/x`` but neither ``/admin`` nor ``/administrator``; list ``/admin``
as well to deny it. A pattern also denies its path with one trailing ``/`` (``/admin`` denies
``/admin/``, which Spring MVC serves as ``/admin``). The query is never matched.

The setting validators (:func:`validate_methods`, :func:`validate_pattern`) live in
:mod:`proxycore.config.checks`, which reports them at load time; they are re-exported here.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ..config.checks import validate_methods as validate_methods
from ..config.checks import validate_pattern as validate_pattern

__all__ = ["Policy", "Refusal", "is_git_push", "validate_methods", "validate_pattern"]

_PERCENT: Final = re.compile(rb"%([0-9A-Fa-f]{2})")
_QUERY_SPLIT: Final = re.compile(rb"[&;]")

_RECEIVE_PACK: Final = "/git-receive-pack"
_INFO_REFS: Final = "/info/refs"
#: Refused unless a route's ``methods`` lists them (TRACE would echo injected credentials).
_DANGEROUS_METHODS: Final = frozenset({b"TRACE", b"CONNECT"})
_DEFAULT_ALLOW: Final = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_SERVICE: Final = b"service"
_RECEIVE_PACK_SERVICE: Final = b"git-receive-pack"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: maps onto a ProxyError's status, type, message and headers."""

    status: int
    type: str
    #: Safe to show the client (never quotes request bytes): says why and what to do instead.
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


_GIT_PUSH_DENIED: Final = Refusal(
    403,
    "git_push_denied",
    "pushing to git repositories through this proxy is refused; "
    "push from a trusted machine with your own credentials instead",
)
_FORBIDDEN: Final = Refusal(403, "forbidden", "this path is not available through the proxy")
_DANGEROUS_REFUSAL: Final = Refusal(
    405,
    "method_not_allowed",
    "TRACE and CONNECT are not allowed unless the route lists them in 'methods'",
    ((b"Allow", _DEFAULT_ALLOW.encode("ascii")),),
)


def _unquote(data: bytes) -> bytes:
    return _PERCENT.sub(lambda m: bytes((int(m.group(1), 16),)), data) if b"%" in data else data


def is_git_push(method: bytes, path: str, query: bytes) -> bool:
    """Is this a git smart-HTTP push (``git-receive-pack``)?

    True for ``POST .../git-receive-pack`` and for ``GET .../info/refs`` with a query parameter
    ``service=git-receive-pack``. ``path`` is the decision path of the target view (decoded);
    ``query`` keeps its leading ``?`` or is ``b""``. The path suffix is compared
    case-sensitively (like git), ignoring trailing slashes. The query is split on ``&`` and
    ``;``, each parameter on its first ``=``, and name and value are percent-decoded, in any
    order and position; a fetch (``service=git-upload-pack``) is not a push. The method is
    compared exactly.
    """
    if method == b"POST":
        return path.rstrip("/").endswith(_RECEIVE_PACK)
    if method != b"GET" or not query or not path.rstrip("/").endswith(_INFO_REFS):
        return False
    for param in _QUERY_SPLIT.split(query.removeprefix(b"?")):
        name, sep, value = param.partition(b"=")
        if sep and _unquote(name) == _SERVICE and _unquote(value) == _RECEIVE_PACK_SERVICE:
            return True
    return False


class Policy:
    """Compiled from a route's settings once (at config load), evaluated per request.

    ``methods=None`` allows every method; otherwise only the listed ones, plus ``HEAD`` when
    ``GET`` is listed. Invalid settings raise :class:`ValueError` (the config loader is expected
    to have reported them with :func:`validate_methods` / :func:`validate_pattern` already).
    """

    __slots__ = ("_deny", "_deny_git_push", "_method_refusal", "_methods")

    def __init__(
        self,
        *,
        methods: Sequence[str] | None = None,
        deny_paths: Sequence[str] = (),
        deny_git_push: bool = False,
    ) -> None:
        self._deny_git_push = bool(deny_git_push)
        self._methods: frozenset[bytes] = frozenset()
        self._method_refusal: Refusal | None = None
        if methods is not None:
            problem = validate_methods(methods)
            if problem:
                raise ValueError(f"methods: {problem}")
            allowed: list[str] = []
            for method in methods:
                allowed.append(method)
                if method == "GET" and "HEAD" not in methods:
                    allowed.append("HEAD")
            self._methods = frozenset(m.encode("ascii") for m in allowed)
            self._method_refusal = Refusal(
                405,
                "method_not_allowed",
                f"this method is not allowed on this route; use one of: {', '.join(allowed)}",
                ((b"Allow", ", ".join(allowed).encode("ascii")),),
            )
        if isinstance(deny_paths, str):
            raise ValueError("deny_paths: must be a list of patterns, not a string")
        for pattern in deny_paths:
            problem = validate_pattern(pattern)
            if problem:
                raise ValueError(f"deny_paths: {problem}")
        self._deny: re.Pattern[str] | None = None
        if deny_paths:
            alternatives = "|".join(fnmatch.translate(p) for p in dict.fromkeys(deny_paths))
            self._deny = re.compile(f"(?:{alternatives})")

    @property
    def is_empty(self) -> bool:
        """True when no configured rule is set (TRACE and CONNECT are still refused)."""
        return not self._deny_git_push and self._method_refusal is None and self._deny is None

    def check(self, method: bytes, path: str, query: bytes) -> Refusal | None:
        """``None`` if the request may go on, else why it is refused (see the module docstring).
        ``path`` is the decision path of the normalized target view."""
        if self._deny_git_push and is_git_push(method, path, query):
            return _GIT_PUSH_DENIED
        if self._method_refusal is not None:
            if method not in self._methods:
                return self._method_refusal
        elif method in _DANGEROUS_METHODS:
            return _DANGEROUS_REFUSAL
        if self._deny is not None and (
            self._deny.match(path) or (path.endswith("/") and self._deny.match(path[:-1]))
        ):
            return _FORBIDDEN  # '/admin' also denies '/admin/' (Spring's trailing-slash match)
        return None
