"""Tunnel sessions across replicas (``[state]`` with ``relay_listen``; docs/tunnel.md).

Every replica publishes its sessions in the shared directory
(:mod:`proxycore.store.sessions`) and serves the tunnel API to the other replicas on an
internal listener (:func:`proxycore.tunnel.relay_server.serve_replica_relay`), authenticated
with the shared secret of ``[state] relay_secret_file``. A call for a session held elsewhere
is forwarded there (:func:`proxycore.tunnel.relay.forward`, the same relay as between
workers, over TCP) with the admitted caller; ownership is checked on the holder, and here
first from the record (an identity that may not see a session gets the same 404 anywhere).
When the shared state is away, each replica answers from its own sessions (and its sibling
workers'), as without ``[state]``.
"""

from __future__ import annotations

import trio

from ..store.backend import Unavailable
from ..store.sessions import Directory, Record
from ..tunnel.hop import Hop
from ..tunnel.sessions import Caller, Registry

__all__ = ["Replicas", "hop_to", "records_of"]


def _visible(record: Record, caller: Caller) -> bool:
    """As ``Session.visible_to``: the owner or an admin; no owner: admins only."""
    return caller.admin or (bool(record.owner) and caller.identity == record.owner)


def hop_to(address: str, secret: bytes) -> Hop:
    """The relay hop to a replica's internal ``host:port`` (or ``[v6]:port``)."""
    host, _, port = address.rpartition(":")
    return Hop(host=host.strip("[]"), port=int(port), secret=secret)


def records_of(registry: Registry, directory: Directory) -> list[Record]:
    """The directory records of this process's open sessions."""
    return [
        Record(s.id, directory.replica, directory.address, s.owner, s.server_name, s.connected_at)
        for s in registry.all()
        if not s.closed
    ]


class Replicas:
    """``Registry.shared`` of a replica (see the module docstring)."""

    def __init__(self, directory: Directory, secret: bytes) -> None:
        self.directory = directory
        self._secret = secret

    def __repr__(self) -> str:
        return f"Replicas(replica={self.directory.replica!r})"

    def changed(self, session_id: str, *, ended: bool = False) -> None:
        self.directory.changed(session_id, ended=ended)

    async def listed(self, caller: Caller, local: set[str]) -> list[object] | None:
        try:
            records = await self.directory.all()
        except Unavailable:
            return None
        return [r.as_dict() for r in records if r.id not in local and _visible(r, caller)]

    async def locate(self, key: str, caller: Caller) -> Hop | None:
        """The holder of session id ``key``, or of the newest session ``caller`` may see
        registered as server name ``key`` (the caller's own first); None: not found, held
        here, or the shared state is away. At most ``[state] timeout`` in all."""
        with trio.move_on_after(self.directory.backend.settings.timeout):
            return await self._locate(key, caller)
        return None

    async def _locate(self, key: str, caller: Caller) -> Hop | None:
        try:
            record = await self.directory.get(key)
            if record is None:
                named = [
                    r
                    for r in await self.directory.all()
                    if r.server_name == key and _visible(r, caller)
                ]
                own = [r for r in named if r.owner and r.owner == caller.identity]
                record = max(own or named, key=lambda r: r.connected_at, default=None)
        except Unavailable:
            return None
        if record is None or not _visible(record, caller):
            return None
        if record.replica == self.directory.replica:
            return None  # ours (it ended meanwhile): the local lookup already said no
        return hop_to(record.address, self._secret)
