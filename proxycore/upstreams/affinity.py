"""MCP session affinity without shared state: the upstream is named inside the session id
the client sees, authenticated. Pure (stdlib ``hmac``).

An MCP Streamable HTTP server mints ``Mcp-Session-Id`` on its ``initialize``
response; every later request of that session must reach the same server. On the
way out, the proxy replaces the upstream's id ``X`` minted by member ``M`` with::

    pc1.<base64url(tag(M) + X)>.<base64url(mac)>

``tag(M)`` is 8 bytes of HMAC(key, member name): opaque, so the id never shows an
internal address, and stable across workers, replicas and restarts that share the
key (``[server] session_key_file``). ``mac`` is 16 bytes of HMAC-SHA256 over tag and
``X``: a client can neither steer itself to another upstream nor forge an id. On the
way in, :meth:`SessionIds.unwrap` gives back ``(tag, X)`` (or None: a forged or
foreign id, which the proxy answers 404 so the client re-initializes, as the MCP
specification says for an unknown session).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Final

__all__ = ["MIN_KEY_BYTES", "PREFIX", "SessionIds", "load_key"]

PREFIX: Final = "pc1."
#: A session key shorter than this is refused (it is a MAC key).
MIN_KEY_BYTES: Final = 16
_TAG: Final = 8
_MAC: Final = 16
#: Longest upstream session id carried (the MCP spec: visible ASCII; ids are short).
MAX_ID_BYTES: Final = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionIds:
    """Wraps and unwraps session ids with one key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the session key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "SessionIds(key=***)"

    def tag(self, member: str) -> bytes:
        """The opaque, stable tag of the member named ``member``."""
        return hmac.new(self._key, b"member\0" + member.encode(), hashlib.sha256).digest()[:_TAG]

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, b"session\0" + payload, hashlib.sha256).digest()[:_MAC]

    def wrap(self, tag: bytes, upstream_id: bytes) -> bytes:
        """The id the client sees for ``upstream_id`` minted by the member tagged ``tag``."""
        payload = tag + upstream_id
        return f"{PREFIX}{_b64(payload)}.{_b64(self._mac(payload))}".encode("ascii")

    def unwrap(self, value: bytes) -> tuple[bytes, bytes] | None:
        """``(tag, upstream id)`` of a wrapped id; None unless it is ours and intact."""
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not text.startswith(PREFIX) or len(text) > 4 * MAX_ID_BYTES:
            return None
        body, _, mac_text = text[len(PREFIX) :].partition(".")
        try:
            payload, mac = _unb64(body), _unb64(mac_text)
        except (binascii.Error, ValueError):
            return None
        if len(payload) <= _TAG or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        return payload[:_TAG], payload[_TAG:]


def load_key(path: str) -> bytes:
    """The key in ``path`` (surrounding whitespace stripped). Raises ``OSError`` or
    ``ValueError`` (too short); the messages never hold the key."""
    with open(path, "rb") as f:
        key = f.read().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key
