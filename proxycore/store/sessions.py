"""The tunnel-session directory shared by the replicas (docs/tunnel.md, "Past one machine").

Each replica publishes a record per session it holds: ``<key_prefix>ts:<id>`` (a hash: the
holding replica, its internal relay address, owner, server name, connected at), with a TTL of
``[state] session_ttl``, plus the id in ``<key_prefix>ts-index`` (a sorted set scored by the
record's expiry, for listing). The holder refreshes its records every third of the TTL and
publishes a new one, or removes an ended one, right away; a replica that dies stops
refreshing and its sessions leave the directory within the TTL. Records carry no secret; the
address is for replicas only and never leaves in a response.

This module knows records, not sessions: the tunnel layer gives :meth:`Directory.run` its
live sessions as :class:`Record`\\ s and decides who may see what.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from ..store.backend import Arg, Client, StateBackend, Unavailable

__all__ = ["Directory", "Record"]

#: KEYS[1] the index; ARGV: ttl (ms), key prefix, then per record: id, replica, address,
#: owner, server_name, connected_at.
_PUT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local n = 0
for i = 3, #ARGV, 6 do
  local key = ARGV[2] .. 'ts:' .. ARGV[i]
  redis.call('HSET', key, 'id', ARGV[i], 'replica', ARGV[i + 1], 'address', ARGV[i + 2],
             'owner', ARGV[i + 3], 'server_name', ARGV[i + 4], 'connected_at', ARGV[i + 5],
             'refreshed', now)
  redis.call('PEXPIRE', key, ttl)
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  n = n + 1
end
return n
"""

#: KEYS[1] the index; ARGV: key prefix, then ids.
_REMOVE: Final = """
for i = 2, #ARGV do
  redis.call('DEL', ARGV[1] .. 'ts:' .. ARGV[i])
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return #ARGV - 1
"""

#: KEYS[1] the index; ARGV: key prefix. Every live record, as flat field/value arrays.
_LIST: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local rec = redis.call('HGETALL', ARGV[1] .. 'ts:' .. id)
  if #rec > 0 then table.insert(out, rec) end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Record:
    """One session in the directory."""

    id: str
    replica: str
    address: str  # host:port of the holder's internal relay listener
    owner: str
    server_name: str
    connected_at: float
    refreshed: float = 0.0  # the backend's clock, seconds

    def as_dict(self) -> dict[str, object]:
        """The public view (no replica, no address), like a local session's."""
        return {
            "id": self.id,
            "server_name": self.server_name,
            "owner": self.owner,
            "connected_at": self.connected_at,
            "last_heartbeat": self.refreshed,
            "pending": None,
        }


def _record(flat: list[Any]) -> Record | None:
    fields = dict(zip(flat[::2], flat[1::2], strict=False))
    try:
        return Record(
            str(fields["id"]),
            str(fields["replica"]),
            str(fields["address"]),
            str(fields["owner"]),
            str(fields["server_name"]),
            float(fields["connected_at"]),
            float(fields.get("refreshed", 0)) / 1000,
        )
    except (KeyError, ValueError):
        return None


class Directory:
    """This replica's view of the shared session directory (see the module docstring)."""

    def __init__(self, backend: StateBackend, address: str) -> None:
        self.backend = backend
        #: This replica's internal relay address (what other replicas dial).
        self.address = address
        self._index = f"{backend.prefix}ts-index"
        self._dirty: set[str] = set()
        self._gone: set[str] = set()
        self._wake = trio.Event()

    @property
    def replica(self) -> str:
        return self.backend.replica

    def changed(self, session_id: str, *, ended: bool = False) -> None:
        """A local session opened (publish it now) or ended (remove it now)."""
        if ended:
            self._dirty.discard(session_id)
            self._gone.add(session_id)
        else:
            self._dirty.add(session_id)
        self._wake.set()

    async def get(self, session_id: str) -> Record | None:
        """The live record of ``session_id`` (raises ``Unavailable``)."""

        async def read(client: Client) -> Any:
            return await client.hgetall(f"{self.backend.prefix}ts:{session_id}")

        found = await self.backend.call(read)
        if not found:
            return None
        flat: list[Any] = []
        for name, value in found.items():
            flat += [name, value]
        return _record(flat)

    async def all(self) -> list[Record]:
        """Every live record (raises ``Unavailable``)."""
        rows = await self.backend.script(_LIST, [self._index], [self.backend.prefix])
        return [r for r in (_record(list(row)) for row in rows) if r is not None]

    async def run(self, local: Callable[[], list[Record]]) -> None:
        """Publish and refresh this replica's records until cancelled; ``local()`` lists
        them (the records of the sessions it holds now)."""
        interval = self.backend.settings.session_ttl / 3
        next_refresh = trio.current_time()
        epoch = self.backend.epoch
        while True:
            with trio.move_on_at(next_refresh):
                await self._wake.wait()
            self._wake = trio.Event()
            if not self.backend.up:
                await trio.sleep(min(interval, 0.1))
                continue
            records = local()
            if epoch != self.backend.epoch:  # back after an outage: publish everything now
                epoch, next_refresh = self.backend.epoch, trio.current_time()
            if self._gone:
                gone, self._gone = self._gone, set()
                with contextlib.suppress(Unavailable):  # else they expire within the TTL
                    await self.backend.script(
                        _REMOVE, [self._index], [self.backend.prefix, *sorted(gone)]
                    )
            due = trio.current_time() >= next_refresh
            if due:
                wanted = records
                next_refresh = trio.current_time() + interval
            else:
                wanted = [r for r in records if r.id in self._dirty]
            self._dirty.clear()
            if wanted:
                await self._put(wanted)

    async def _put(self, records: list[Record]) -> None:
        ttl = max(1, round(self.backend.settings.session_ttl * 1000))
        args: list[Arg] = [ttl, self.backend.prefix]
        for r in records:
            args += [r.id, r.replica, r.address, r.owner, r.server_name, repr(r.connected_at)]
        try:
            await self.backend.script(_PUT, [self._index], args)
        except Unavailable:
            for r in records:
                self._dirty.add(r.id)  # published again when the backend is back
