"""``[state]``: the shared-state backend (Redis or Valkey) replicas use for rate limits,
concurrent-stream leases and tunnel sessions (docs/deploy.md, "Scaling out").

Unset ``redis`` keeps everything per process, as before. Pure (stdlib only). The Redis URL may
hold a password: it is never shown (``repr`` and every problem message say ``***``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from ..config.checks import Problems, number, parse_listen, typed

__all__ = ["StateSettings", "redact"]

_SCHEMES: Final = ("redis", "rediss", "sentinel")
_KEY_PREFIX: Final = re.compile(r"[A-Za-z0-9_.:{}-]{0,64}")
_USERINFO: Final = re.compile(r"//[^/@]*@")


_QUERY_SECRET: Final = re.compile(r"(?i)([?&](?:password|username|user)=)[^&#]*")


def redact(url: str) -> str:
    """``url`` with its user info and any ``password``/``username`` query parameter (the
    client reads both) replaced by ``***``."""
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub("//***@", url))


@dataclass(frozen=True, slots=True)
class StateSettings:
    """The ``[state]`` table. Seconds for every duration.

    ``redis``: one ``redis://``/``rediss://`` URL, or a list of ``sentinel://host:port`` URLs
    (then ``sentinel_service`` names the primary). ``on_unavailable``: ``"local"`` falls back to
    per-process state while the backend is away, ``"closed"`` refuses (503). ``timeout``: the
    longest a request waits on the backend. ``lease``: a concurrent-stream slot held by a
    replica that stops renewing it is freed after this long. ``session_ttl``: the same for a
    tunnel session's record. ``relay_listen`` / ``relay_address`` / ``relay_secret_file``: the
    internal listener other replicas reach this replica's tunnel sessions on, the address they
    dial, and the shared secret that authenticates them.
    """

    redis: tuple[str, ...] = ()
    sentinel_service: str = ""
    key_prefix: str = "proxycore:"
    on_unavailable: str = "local"
    timeout: float = 0.05
    lease: float = 30.0
    session_ttl: float = 30.0
    reconnect_max: float = 5.0
    relay_listen: str = ""
    relay_address: str = ""
    relay_secret_file: str = ""

    def __post_init__(self) -> None:
        p = Problems()
        value: object = self.redis
        if isinstance(value, str):
            object.__setattr__(self, "redis", (value,) if value else ())
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            object.__setattr__(self, "redis", tuple(value))
        else:
            p.add("redis", "expected a URL string or an array of sentinel URLs")
            object.__setattr__(self, "redis", ())
        self._check_urls(p)
        typed(p, self, "sentinel_service", str)
        prefix = typed(p, self, "key_prefix", str)
        if prefix is not None and not _KEY_PREFIX.fullmatch(prefix):
            p.add("key_prefix", "must be at most 64 of A-Z a-z 0-9 _ . : { } -")
        mode = typed(p, self, "on_unavailable", str)
        if mode is not None and mode not in ("local", "closed"):
            p.add("on_unavailable", f"must be 'local' or 'closed', got {mode!r}")
        number(p, self, "timeout", zero_ok=False)
        if isinstance(self.timeout, float) and self.timeout > 5:
            p.add("timeout", f"must be at most 5 s (requests wait this long), got {self.timeout:g}")
        for name in ("lease", "session_ttl"):
            number(p, self, name, zero_ok=False)
            seconds = getattr(self, name)
            if isinstance(seconds, float) and 0 < seconds < 0.3:
                p.add(name, f"must be at least 0.3 s (renewed every third of it), got {seconds:g}")
        number(p, self, "reconnect_max", zero_ok=False)
        for name in ("relay_listen", "relay_address"):
            addr = typed(p, self, name, str)
            if addr:
                try:
                    parse_listen(addr)
                except ValueError as exc:
                    p.add(name, str(exc))
        typed(p, self, "relay_secret_file", str)
        if self.relay_listen and not self.relay_secret_file:
            p.add("relay_secret_file", "required with relay_listen (replicas authenticate)")
        if self.relay_listen and not self.redis:
            p.add("relay_listen", "needs redis (the session registry)")
        p.check()

    def _check_urls(self, p: Problems) -> None:
        schemes = set()
        for index, url in enumerate(self.redis):
            where = "redis" if len(self.redis) == 1 else f"redis[{index}]"
            try:
                parts = urlsplit(url)
                port = parts.port
            except ValueError:
                p.add(where, f"not a valid URL: {redact(url)!r}")
                continue
            if parts.scheme not in _SCHEMES:
                p.add(where, f"scheme must be redis, rediss or sentinel, got {parts.scheme!r}")
            elif not parts.hostname:
                p.add(where, f"needs a host: {redact(url)!r}")
            elif port == 0:
                p.add(where, "port must be between 1 and 65535")
            schemes.add(parts.scheme)
        if "sentinel" in schemes and schemes != {"sentinel"}:
            p.add("redis", "sentinel URLs cannot be mixed with redis:// URLs")
        elif "sentinel" not in schemes and len(self.redis) > 1:
            p.add("redis", "a list is for sentinel://host:port URLs; give one redis:// URL")
        elif "sentinel" in schemes and not self.sentinel_service:
            p.add("sentinel_service", "required with sentinel URLs (the primary's name)")

    @property
    def enabled(self) -> bool:
        return bool(self.redis)

    @property
    def sentinel(self) -> bool:
        return bool(self.redis) and self.redis[0].startswith("sentinel:")

    def __repr__(self) -> str:
        urls = ", ".join(repr(redact(u)) for u in self.redis)
        return (
            f"StateSettings(redis=({urls}), key_prefix={self.key_prefix!r}, "
            f"on_unavailable={self.on_unavailable!r}, timeout={self.timeout!r}, "
            f"lease={self.lease!r}, session_ttl={self.session_ttl!r})"
        )
