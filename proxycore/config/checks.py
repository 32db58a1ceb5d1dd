"""Validation helpers shared by the config dataclasses and loaders (pure, stdlib only).

``Problems`` collects ``"key.path: message"`` strings so that a loader can
report every problem of a file at once; the ``typed``/``number``/``integer``
readers check one attribute each and record what is wrong. The ``parse_*`` and
``validate_*`` functions check one value each (the security policy compiles
``methods``/``deny_paths`` with the same validators).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar, cast
from urllib.parse import unquote, urlsplit

__all__ = [
    "ENCODINGS",
    "ENV_NAME_RE",
    "TOKEN_RE",
    "ConfigError",
    "Problems",
    "Upstream",
    "describe",
    "duplicates",
    "instance",
    "integer",
    "join",
    "number",
    "parse_listen",
    "parse_upstream",
    "prefix_problem",
    "typed",
    "validate_methods",
    "validate_pattern",
]

_T = TypeVar("_T")

TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_WS_SCHEMES = {"ws": "http", "wss": "https"}  # WebSocket routes: the same connection semantics
_KIND_NAMES: dict[type, str] = {bool: "a boolean", int: "an integer", float: "a number"}
#: Values of a route's ``accept_encoding``.
ENCODINGS: Final = ("passthrough", "identity")
_PERCENT_STR = re.compile(r"%[0-9A-Fa-f]{2}")


class ConfigError(Exception):
    """Invalid configuration; ``problems`` holds every problem found (``str()`` joins them)."""

    problems: tuple[str, ...]

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[tuple[str, ...]]]:
        return (ConfigError, (self.problems,))


# --------------------------------------------------------------------------- validation helpers


def join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


class Problems:
    """Collects ``"key.path: message"`` strings and raises them together."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def absorb(
        self,
        exc: ConfigError,
        prefix: str,
        rename: Mapping[str, str] | None = None,
        skip: Iterable[str] = (),
    ) -> None:
        """Record a nested object's problems under ``prefix``, renaming or skipping keys."""
        for problem in exc.problems:
            path, _, message = problem.partition(": ")
            path = (rename or {}).get(path, path)
            if path not in skip:
                self.add(join(prefix, path), message)

    def check(self, source: str | None = None) -> None:
        if self.items:
            raise ConfigError(f"{source}: {item}" if source else item for item in self.items)


def describe(value: object, *, show: bool = True) -> str:
    """Name the type of ``value`` (with the value itself for scalars unless ``show=False``)."""
    if isinstance(value, bool):
        kind, text = "boolean", str(value).lower()
    elif isinstance(value, int):
        kind, text = "integer", str(value)
    elif isinstance(value, float):
        kind, text = "float", repr(value)
    elif isinstance(value, str):
        kind, text = "string", repr(value if len(value) <= 40 else value[:40] + "...")
    elif isinstance(value, Mapping):
        return "a table"
    elif isinstance(value, list | tuple):
        return "an array"
    else:
        return type(value).__name__
    return f"{kind} {text}" if show else kind


def typed(
    p: Problems,
    obj: object,
    name: str,
    kind: type[_T],
    *,
    optional: bool = False,
    show: bool = True,
) -> _T | None:
    """Return attribute ``name`` if it is a ``kind``, else record a problem and return None.

    Ints are accepted (and stored) as floats; booleans are never accepted as numbers.
    """
    value = getattr(obj, name)
    if value is None and optional:
        return None
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is float and is_number:
        if isinstance(value, int):
            value = float(value) if abs(value) < 2**1000 else math.inf
        object.__setattr__(obj, name, value)
        return cast(_T, value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    expected = _KIND_NAMES.get(kind, "a string")
    p.add(name, f"expected {expected}, got {describe(value, show=show)}")
    return None


def number(p: Problems, obj: object, name: str, *, zero_ok: bool) -> None:
    """Validate a finite number of seconds, ``> 0`` (or ``>= 0`` when ``zero_ok``)."""
    value = typed(p, obj, name, float)
    if value is None:
        return
    if not math.isfinite(value):
        p.add(name, f"must be a finite number, got {value}")
    elif value < 0 or (value == 0 and not zero_ok):
        p.add(name, f"must be {'>= 0' if zero_ok else '> 0'}, got {value:g}")


def integer(p: Problems, obj: object, name: str, low: int, high: int | None = None) -> None:
    value = typed(p, obj, name, int)
    if value is not None and (value < low or (high is not None and value > high)):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        p.add(name, f"must be {bound}, got {value}")


def instance(p: Problems, obj: object, name: str, cls: type, *, optional: bool = False) -> None:
    value = getattr(obj, name)
    if not isinstance(value, cls) and not (optional and value is None):
        p.add(name, f"expected {cls.__name__}, got {describe(value, show=False)}")


def _bad_chars(text: str) -> bool:
    """True if ``text`` contains whitespace or control characters."""
    return any(c.isspace() or not c.isprintable() for c in text)


def _has_dot_segment(path: str) -> bool:
    return any(unquote(segment) in (".", "..") for segment in path.split("/"))


def _check_host(host: str) -> None:
    """Raise ValueError unless ``host`` is an IPv6 literal (no brackets) or a hostname/IPv4."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r}") from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"invalid host {host!r}")


def parse_upstream(url: str, *, websocket: bool = False) -> Upstream:
    """Parse an upstream URL; raises ValueError whose message never echoes the URL.

    With ``websocket`` (a WebSocket route) ``ws://`` and ``wss://`` are accepted too and
    mean ``http://`` and ``https://`` (the scheme of the returned :class:`Upstream`).
    """
    schemes = "http://, https://, ws:// or wss://" if websocket else "http:// or https://"
    if _bad_chars(url) or not url.isascii():
        raise ValueError("must be ASCII without whitespace or control characters")
    if "://" not in url:
        raise ValueError(f"must be an absolute URL starting with {schemes}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        bad_port = "port" in str(exc).lower()
        raise ValueError(
            "port must be between 1 and 65535" if bad_port else "invalid URL"
        ) from None
    scheme = parts.scheme
    if websocket and scheme in _WS_SCHEMES:
        scheme = _WS_SCHEMES[scheme]
    elif scheme not in _DEFAULT_PORTS:
        allowed = "http, https, ws or wss" if websocket else "http or https"
        hint = " (ws and wss only on websocket routes)" if scheme in _WS_SCHEMES else ""
        raise ValueError(f"scheme must be {allowed}, got {scheme!r}{hint}")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials (user:password@); use inject instead")
    if "?" in url or "#" in url:
        raise ValueError("must not contain a query string or fragment")
    if not parts.hostname:
        raise ValueError("host is required")
    _check_host(parts.hostname)
    if port == 0:
        raise ValueError("port must be between 1 and 65535")
    path = parts.path or "/"
    if _has_dot_segment(path):
        raise ValueError("path must not contain '.' or '..' segments")
    return Upstream(scheme, parts.hostname, port or _DEFAULT_PORTS[scheme], path)


def prefix_problem(prefix: str) -> str | None:
    if not prefix.startswith("/"):
        return f"must start with '/', got {prefix!r}"
    if _bad_chars(prefix) or not prefix.isascii() or "?" in prefix or "#" in prefix:
        return f"must be ASCII without whitespace, control characters, '?' or '#', got {prefix!r}"
    if _has_dot_segment(prefix):
        return f"must not contain '.' or '..' segments (also percent-encoded), got {prefix!r}"
    if any(c in prefix for c in "%;\\") or "//" in prefix:
        return (
            "is matched against the normalized, percent-decoded path: write it decoded, "
            f"without '%', ';', '\\' or '//', got {prefix!r}"
        )
    return None


def parse_listen(addr: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[ipv6]:port``; raises ValueError with a readable message."""
    hint = f"expected 'host:port' or '[ipv6]:port', got {addr!r}"
    if addr.startswith("["):
        host, sep, port_text = addr[1:].partition("]:")
        if sep and ":" not in host:
            raise ValueError(f"invalid IPv6 address {host!r}")
    else:
        host, sep, port_text = addr.rpartition(":")
        if ":" in host:
            raise ValueError(f"IPv6 addresses must be in brackets like '[::1]:8080', got {addr!r}")
    if not sep or not host:
        raise ValueError(hint)
    _check_host(host)
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port_text!r}")
    return host, int(port_text)


def duplicates(p: Problems, prefixes: Iterable[tuple[int, str]], key: str = "prefix") -> None:
    """Record duplicate route prefixes; '/api' and '/api/' count as the same prefix."""
    seen: dict[str, int] = {}
    for index, prefix in prefixes:
        norm = prefix.rstrip("/")
        if norm in seen:
            p.add(f"routes[{index}].{key}", f"duplicate of routes[{seen[norm]}] ({prefix!r})")
        else:
            seen[norm] = index


def validate_methods(methods: Sequence[str]) -> str | None:
    """A problem with a ``methods`` allow-list, or ``None``. Methods are case-sensitive
    RFC 9110 tokens; upper case is required so that ``get`` is not silently never matched."""
    if isinstance(methods, str) or not methods:
        return "must be a non-empty list of HTTP methods"
    seen: set[str] = set()
    for method in methods:
        if not isinstance(method, str) or not TOKEN_RE.fullmatch(method):
            return f"each method must be an HTTP token (e.g. GET), got {method!r}"
        if method != method.upper():
            return f"methods are case-sensitive and must be upper-case, got {method!r}"
        if method in seen:
            return f"duplicate method {method!r}"
        seen.add(method)
    return None


def validate_pattern(p: str) -> str | None:
    """A problem with a ``deny_paths`` glob pattern, or ``None``."""
    if not isinstance(p, str) or not p.startswith("/"):
        return f"must be a path pattern starting with '/', got {p!r}"
    if _PERCENT_STR.search(p):
        return f"is matched against the percent-decoded path: write characters decoded, got {p!r}"
    return None


@dataclass(frozen=True, slots=True)
class Upstream:
    """Parsed form of a route's upstream URL (built by :class:`Route`)."""

    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def host_header(self) -> str:
        """Value for the Host header: port only when not the scheme default; IPv6 bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS.get(self.scheme) else f"{host}:{self.port}"

    @property
    def origin(self) -> tuple[str, str, int]:
        """``(scheme, host, port)``, the connection-pool key."""
        return (self.scheme, self.host, self.port)
