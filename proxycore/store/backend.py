"""The connection to the shared-state backend (Redis or Valkey, through ``coredis``).

One :class:`StateBackend` per process (``ProxyState.backend``, made when ``[state] redis`` is
set). Its :meth:`run` task holds the client open, probes the server (``PING``) and reconnects
with capped exponential backoff; it logs one line when the backend goes and one when it comes
back, and keeps :attr:`up` for the ``proxycore_state_backend_up`` gauge.

Requests use :meth:`call`: at most ``[state] timeout`` (a trio cancel scope) and never while
the backend is known to be down, so no request waits on a dead or slow server. A failed or
timed-out call marks the backend down (the probe brings it back) and raises
:class:`Unavailable`; the caller then follows ``on_unavailable`` (local state, or
:class:`StateUnavailable`: 503). Nothing here logs or shows the URL's password.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from ..config.state import StateSettings, redact
from ..errors import ProxyError

__all__ = [
    "Arg",
    "Client",
    "StateBackend",
    "StateUnavailable",
    "Unavailable",
]

log: Final = logging.getLogger("proxycore.state")

Client = coredis.Redis[str]
_T = TypeVar("_T")
#: A script argument.
Arg = str | int | float

#: Seconds between two probes while the backend is up (a dead server is noticed by then).
PROBE_INTERVAL_S: Final = 1.0
#: The first reconnect delay; doubled up to ``[state] reconnect_max``.
BACKOFF_START_S: Final = 0.05


class Unavailable(Exception):
    """The backend can't answer now (down, or slower than ``[state] timeout``)."""


class StateUnavailable(ProxyError):
    """``on_unavailable = "closed"`` and the shared state is away: refuse (fail closed)."""

    status = 503
    type = "state_unavailable"
    outcome = "state_unavailable"


class StateBackend:
    """The shared-state client of this process (see the module docstring)."""

    def __init__(self, settings: StateSettings, *, replica: str = "") -> None:
        self.settings = settings
        #: Names this process in lease ids and session records.
        self.replica = replica or f"{os.getpid()}-{secrets.token_hex(4)}"
        self.up = False
        #: Bumped every time the backend comes (back) up: lease holders re-assert then.
        self.epoch = 0
        self._sentinel, self.client = _make_client(settings)
        self._wake = trio.Event()
        self._was_up: bool | None = None
        self._scripts: dict[str, Any] = {}
        #: Run (its calls ``probing``) each time the backend is found again, before it is up.
        self.before_up: Callable[[], Awaitable[None]] | None = None

    def __repr__(self) -> str:
        urls = ", ".join(redact(u) for u in self.settings.redis)
        return f"StateBackend({urls}, up={self.up})"

    @property
    def prefix(self) -> str:
        return self.settings.key_prefix

    @property
    def closed_mode(self) -> bool:
        """``on_unavailable = "closed"``: refuse rather than fall back."""
        return self.settings.on_unavailable == "closed"

    def unavailable(self) -> StateUnavailable:
        return StateUnavailable("shared state is unavailable; try again later")

    # -- requests ---------------------------------------------------------------------------

    async def call(self, fn: Callable[[Client], Awaitable[_T]], *, probing: bool = False) -> _T:
        """``fn(client)`` within ``[state] timeout``; :class:`Unavailable` when the backend is
        down, fails or is too slow (it is then marked down until the probe succeeds).
        ``probing``: the recovery hook's calls, made before the backend is marked up."""
        if not self.up and not probing:
            raise Unavailable("down")
        with trio.move_on_after(self.settings.timeout):
            try:
                return await fn(self.client)
            except (coredis.exceptions.RedisError, OSError) as exc:
                self.mark_down(type(exc).__name__)
                raise Unavailable("failed") from None
        self.mark_down("timeout")
        raise Unavailable("timeout")

    async def script(
        self, source: str, keys: list[str], args: list[Arg], *, probing: bool = False
    ) -> Any:
        """Run a Lua script (``EVALSHA``, loaded on first use or after a server restart)
        through :meth:`call`: one round trip."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)

        async def run(_: Client) -> Any:
            return await script(keys=keys, args=args)

        return await self.call(run, probing=probing)

    def mark_down(self, why: str) -> None:
        if self.up:
            self.up = False
            self._report(False, why)
            self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the client open and keep :attr:`up` true to the server until cancelled.
        ``task_status.started()`` after the first connection attempt (up or not: a backend
        down at start follows ``on_unavailable`` like one lost later)."""
        started = False
        async with contextlib.AsyncExitStack() as stack:
            if self._sentinel is not None:
                await stack.enter_async_context(self._sentinel)
            await stack.enter_async_context(self.client)
            delay = BACKOFF_START_S
            while True:
                ok = await self._probe()
                if ok and not self.up and self.before_up is not None:
                    # e.g. releases kept while it was away: sent before any request may
                    # use the backend again (else they would find those slots still held)
                    with contextlib.suppress(Unavailable):
                        await self.before_up()
                if ok and not self.up:
                    self.epoch += 1
                    self.up = True
                    self._report(True, "")
                elif not ok:
                    self.mark_down("unreachable")
                    if self._was_up is None:
                        self._report(False, "unreachable at start")
                if not started:
                    task_status.started()
                    started = True
                if ok:
                    delay = BACKOFF_START_S
                    self._wake = trio.Event()
                    with trio.move_on_after(PROBE_INTERVAL_S):
                        await self._wake.wait()
                else:
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.settings.reconnect_max)

    async def _probe(self) -> bool:
        with trio.move_on_after(max(self.settings.timeout * 10, 0.5)):
            try:
                return bool(await self.client.ping())
            except (coredis.exceptions.RedisError, OSError):
                return False
        return False

    def _report(self, up: bool, why: str) -> None:
        if self._was_up == up:
            return
        where = ", ".join(redact(u) for u in self.settings.redis)
        if up:
            log.warning("shared state backend is up (%s)", where)
        else:
            fallback = (
                "refusing requests that need it (503)"
                if self.closed_mode
                else "using per-process state meanwhile"
            )
            log.warning("shared state backend unavailable (%s: %s); %s", where, why, fallback)
        self._was_up = up


def _make_client(settings: StateSettings) -> tuple[coredis.Sentinel[str] | None, Client]:
    """The client (and, with Sentinel, the Sentinel it asks for the primary)."""
    timeout = max(settings.timeout * 10, 0.5)  # the cancel scopes bound requests tighter
    common: dict[str, Any] = {
        "decode_responses": True,
        "stream_timeout": timeout,
        "connect_timeout": timeout,
        "retry_policy": NoRetryPolicy(),
    }
    if not settings.sentinel:
        client: Client = coredis.Redis.from_url(settings.redis[0], **common)
        return None, client
    nodes = []
    for url in settings.redis:
        parts = urlsplit(url)
        nodes.append((parts.hostname or "", parts.port or 26379))
    password = urlsplit(settings.redis[0]).password
    sentinel: coredis.Sentinel[str] = coredis.Sentinel(
        nodes,
        decode_responses=True,
        sentinel_kwargs={"password": password} if password else None,
        stream_timeout=timeout,
        connect_timeout=timeout,
        password=password,
    )
    primary: Client = sentinel.primary_for(settings.sentinel_service)
    return sentinel, primary
