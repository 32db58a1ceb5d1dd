"""The bookkeeping of one exchange, the same for both front ends.

A :class:`Ledger` is made when an exchange starts and closed when it ends,
whatever happened in between. It owns:

- the access-log record (:class:`~proxycore.observe.accesslog.ExchangeRecord`)
  and what hooks may know (:class:`~proxycore.proxy.hooks.ExchangeInfo`);
- the in-flight gauge, the admission's release, the metrics observation;
- calling hooks (a failing hook is a logged 500, headers a hook set are
  checked before any byte goes out) and the ``on_request`` answer's checks;
- the SSE tap and the route's transcript, then ``on_exchange_end``.

The front end passes its own logger, so hook failures keep being logged under
``proxycore.exchange`` (native) or ``proxycore.asgi``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import trio

from ..config import Route
from ..errors import InternalError, ProxyError, UpstreamError
from ..http.headers import Headers, invalid_header_problem
from ..http.sse import SSEEvent, SSEParser
from ..observe.accesslog import ExchangeRecord, log_exchange
from ..proxy.hooks import ExchangeInfo, Response, Summary
from ..proxy.hooks import Request as HookRequest
from ..proxy.state import ProxyState

__all__ = ["Ledger"]

T = TypeVar("T")

#: Access-log outcomes that keep their name in a transcript (the rest: upstream_failed).
TRANSCRIPT_OUTCOMES: Final = {
    "complete": "complete",
    "client_gone": "client_gone",
    "upstream_timeout": "timeout",
}


class Ledger:
    """Record, hooks and end-of-exchange bookkeeping of one exchange (see the module)."""

    __slots__ = (
        "hooks",
        "info",
        "log",
        "record",
        "release",
        "request_id",
        "route",
        "state",
        "tap",
        "wall_start",
    )

    def __init__(
        self, state: ProxyState, method: str, client: str, request_id: str, log: logging.Logger
    ) -> None:
        """Counts the exchange in flight until :meth:`close`."""
        self.record = ExchangeRecord(
            request_id=request_id, method=method, client=client, started=trio.current_time()
        )
        self.info = ExchangeInfo(
            request_id=request_id, route="", method=method, path="", client=client
        )
        #: The request id as sent (``X-Request-ID`` both ways).
        self.request_id = request_id.encode("ascii")
        self.state = state
        self.hooks = state.hooks
        self.log = log
        #: Set once admitted: the route, and what gives back the admission's slot.
        self.route: Route | None = None
        self.release: Callable[[], None] | None = None
        #: The SSE tap, when the response was relayed with the route's SSE features.
        self.tap: SSEParser | None = None
        self.wall_start = time.time()
        state.exchanges_in_flight += 1

    def name_upstream(self, route: Route) -> None:
        """The request is about to go to ``route``'s upstream (for the access log)."""
        target = route.target
        self.record.upstream = f"{target.scheme}://{target.host_header}"

    # -- hooks ---------------------------------------------------------------

    async def call_hook(self, name: str, call: Awaitable[T]) -> T:
        """Await a hook; its failure becomes a 500 (logged with the request id)."""
        try:
            return await call
        except Exception:
            self.log.exception("hook %s failed (request %s)", name, self.record.request_id)
            raise InternalError(f"the {name} hook failed") from None

    def check_hook_headers(self, name: str, headers: object) -> None:
        """Headers a hook set or changed must be safe to serialize; else a 500 (logged)."""
        problem = invalid_header_problem(headers)
        if problem is not None:
            self.log.error(
                "hook %s set an invalid header (request %s): %s",
                name,
                self.record.request_id,
                problem,
            )
            raise InternalError(f"the {name} hook set an invalid header")

    async def on_request(
        self, path: str, query: bytes, headers: Headers, body: bytes | None
    ) -> tuple[Headers, Response | None]:
        """Run the ``on_request`` hook (set): the headers to go on with, and its answer.

        An answer's headers and status are checked (a 500 otherwise); the outcome is
        then ``answered_by_hook``.
        """
        assert self.hooks.on_request is not None
        request = HookRequest(
            exchange=self.info,
            method=self.record.method,
            path=path,
            query=query.decode("latin-1"),
            headers=headers,
            body=body,
        )
        answer = await self.call_hook("on_request", self.hooks.on_request(request))
        self.check_hook_headers("on_request", request.headers)
        if answer is None:
            return request.headers, None
        self.check_hook_headers("on_request", answer.headers)
        status: object = answer.status
        no_body = status in (204, 304) and answer.body  # a body would desync the connection
        if not isinstance(status, int) or not 200 <= status <= 599 or no_body:
            self.log.error(
                "hook on_request answered with an invalid status (request %s): %r",
                self.record.request_id,
                status,
            )
            raise InternalError("the on_request hook answered with an invalid status")
        self.record.outcome = "answered_by_hook"
        return request.headers, answer

    async def on_response_head(self, status: int, headers: Headers) -> None:
        """Run the ``on_response_head`` hook (set); it may change ``headers`` in place."""
        assert self.hooks.on_response_head is not None
        hook = self.hooks.on_response_head(self.info, status, headers)
        await self.call_hook("on_response_head", hook)
        self.check_hook_headers("on_response_head", headers)

    async def sse_event(self, event: SSEEvent) -> None:
        """Run the ``on_sse_event`` hook (set) for one relayed event. A failure is logged
        and the stream goes on: after the head there is nothing left to answer."""
        assert self.hooks.on_sse_event is not None
        try:
            await self.hooks.on_sse_event(self.info, event)
        except Exception:
            self.log.exception("hook on_sse_event failed (request %s)", self.record.request_id)

    # -- the end -------------------------------------------------------------

    def unexpected(self, exc: Exception) -> InternalError:
        """An exception no part of the exchange expected (a bug, a library's surprise):
        log it as ONE line (its type, where it was raised, the request id; never its
        message, which may quote request bytes) and return the 500 that ends the
        exchange (answered, or a cut if the response already started)."""
        leaves = _leaves(exc)
        first = leaves[0]
        name, where = type(first).__name__, _raised_at(first)
        more = f" (and {len(leaves) - 1} more)" if len(leaves) > 1 else ""
        self.log.error(
            "unexpected %s in the exchange (request %s) at %s%s",
            name,
            self.record.request_id,
            where,
            more,
        )
        return InternalError("internal error", detail=f"unexpected {name} at {where}")

    def failed(self, exc: ProxyError) -> None:
        """Record a proxy-made error (the status is the front end's: it knows what was sent)."""
        rec = self.record
        rec.outcome = exc.outcome
        rec.detail = exc.detail
        if isinstance(exc, UpstreamError):
            rec.error_kind = exc.kind

    def close(self) -> None:
        """Release the admission, log, observe, write the transcript. Call once, when the
        last byte went (or did not); then :meth:`on_exchange_end` if that hook is set."""
        rec, state = self.record, self.state
        if self.release is not None:
            self.release()
        state.exchanges_in_flight -= 1
        rec.duration = trio.current_time() - rec.started
        log_exchange(rec)
        state.metrics.observe(rec)
        route = self.route
        if self.tap is not None and route is not None and route.sse.transcript:
            self._write_transcript(route.sse.transcript)

    async def on_exchange_end(self) -> None:
        """Run the ``on_exchange_end`` hook (set); a failure is logged."""
        assert self.hooks.on_exchange_end is not None
        rec, tap = self.record, self.tap
        summary = Summary(
            status=rec.status,
            outcome=rec.outcome,
            bytes_in=rec.bytes_in,
            bytes_out=rec.bytes_out,
            ttfb=rec.ttfb,
            duration=rec.duration,
            events=None if tap is None else list(tap.events),
            events_truncated=False if tap is None else tap.truncated,
        )
        try:
            await self.hooks.on_exchange_end(self.info, summary)
        except Exception:
            self.log.exception("hook on_exchange_end failed (request %s)", rec.request_id)

    def _write_transcript(self, path: str) -> None:
        tap, rec = self.tap, self.record
        assert tap is not None
        outcome = TRANSCRIPT_OUTCOMES.get(rec.outcome, "upstream_failed")
        record: dict[str, object] = {
            "request_id": rec.request_id,
            "route": rec.route,
            "identity": self.info.identity,
            "method": rec.method,
            "path": rec.path,
            "started": self.wall_start,
            "ttfb_ms": None if rec.ttfb is None else round(rec.ttfb * 1000, 3),
            "duration_ms": round(rec.duration * 1000, 3),
            "status": rec.status,
            "events_count": tap.count,
            "events": [event.as_dict() for event in tap.events],
            "truncated": tap.truncated,
            "outcome": outcome,
        }
        self.state.transcripts.submit(path, record)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, exception groups (a nursery's) flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)] or [exc]
    return [exc]


def _raised_at(exc: BaseException) -> str:
    """``module:line (function)`` of the innermost frame of ``exc``'s traceback."""
    tb = exc.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    module = tb.tb_frame.f_globals.get("__name__", code.co_filename)
    return f"{module}:{tb.tb_lineno} ({code.co_name})"
