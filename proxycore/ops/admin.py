"""The admin listener: ``/healthz``, ``/readyz`` and ``/metrics``.

No authentication and no upstream is ever touched: bind it to loopback or to
an internal interface. Low traffic, so it uses trio's own streams and h11
plainly (no fast path).

- ``/healthz``: static 200 while the process runs.
- ``/readyz``: 200 once the listeners are up and a config is loaded, 503 while
  shutting down (so a load balancer stops sending before the drain ends).
- ``/metrics``: the Prometheus text format.

A request whose handler fails (an unexpected exception: a malformed worker
scrape in the supervisor's merged ``/metrics``, say) gets a 500 and one log
line; nothing else is affected, and an exception never leaves a connection's
task (it would end the process, and a supervisor's workers with it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import h11
import trio

from ..net.stream import CHUNK

__all__ = ["METRICS_CONTENT_TYPE", "AdminApp", "serve_admin"]

log: Final = logging.getLogger("proxycore.admin")

METRICS_CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"
_TIMEOUT_S: Final = 10.0
_MAX_HEAD: Final = 16 * 1024


class AdminApp:
    """What the admin endpoints report; ``ready`` and ``metrics`` are callbacks."""

    def __init__(
        self,
        ready: Callable[[], bool],
        metrics: Callable[[], Awaitable[bytes]],
        detail: Callable[[], bytes] | None = None,
    ) -> None:
        """``detail``: lines added to ``/readyz`` (the upstreams of groups)."""
        self.ready = ready
        self.metrics = metrics
        self.detail = detail

    async def respond(self, method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
        """``(status, content type, body)`` for one request."""
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, b"text/plain", b"method not allowed\n"
        if path == b"/healthz":
            return 200, b"text/plain", b"ok\n"
        if path == b"/readyz":
            detail = self.detail() if self.detail is not None else b""
            if self.ready():
                return 200, b"text/plain", b"ready\n" + detail
            return 503, b"text/plain", b"not ready\n" + detail
        if path == b"/metrics":
            return 200, METRICS_CONTENT_TYPE, await self.metrics()
        return 404, b"text/plain", b"not found\n"

    async def handle(self, stream: trio.SocketStream) -> None:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            with trio.move_on_after(_TIMEOUT_S):
                while True:
                    event = h.next_event()
                    if event is h11.NEED_DATA:
                        h.receive_data(await stream.receive_some(CHUNK))
                        continue
                    if not isinstance(event, h11.Request):
                        return
                    status, ctype, body = await self._answer(event.method, event.target)
                    headers = [
                        (b"Content-Type", ctype),
                        (b"Content-Length", b"%d" % len(body)),
                        (b"Cache-Control", b"no-store"),
                    ]
                    data = h.send(h11.Response(status_code=status, headers=headers))
                    if event.method != b"HEAD":
                        data += h.send(h11.Data(data=body))
                    data += h.send(h11.EndOfMessage())
                    await stream.send_all(data)
                    while (event := h.next_event()) is not h11.PAUSED:
                        if event is h11.NEED_DATA:
                            h.receive_data(await stream.receive_some(CHUNK))
                        elif isinstance(event, h11.ConnectionClosed):
                            return
                    if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                        return
                    h.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception as exc:  # never out of this task: see the module docstring
            log.error("admin connection failed: %s", _describe(exc))
        finally:
            await stream.aclose()

    async def _answer(self, method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
        """:meth:`respond`, with an unexpected exception turned into a 500 (one log line)."""
        try:
            return await self.respond(method, target)
        except Exception as exc:
            path = target.split(b"?", 1)[0].decode("ascii", "replace")
            log.error("admin %s failed (500): %s", path[:200], _describe(exc))
            return 500, b"text/plain", b"internal error\n"


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line (no traceback: one log line per failure)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


async def serve_admin(
    app: AdminApp,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; reports the bound address."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    log.info("admin listening on %s:%d", sockname[0], sockname[1])
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, app.handle, listeners)
        task_status.started((str(sockname[0]), int(sockname[1])))
