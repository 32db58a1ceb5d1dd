"""One JSON line per exchange on the ``proxycore.access`` logger (stderr by default).

Fields never include a credential: the query string is left out (it may carry
API keys), and no header value is logged.

The lines are not written one by one: :class:`BufferedLineHandler` (what
:func:`configure_logging` installs) keeps them in memory and writes them in batches
of whole lines, each batch at most ``PIPE_BUF`` bytes (so a line is never split, even
with several worker processes on one pipe), when ``capacity`` bytes are held, when
the oldest held line is ``interval`` seconds old (a flusher thread, or the next line
after the deadline), on :meth:`~BufferedLineHandler.flush` (the runner calls
:func:`flush_logs` once the drain is over) and on close (``logging.shutdown`` at exit).
Embedders keep plain ``logging``: any handler or filter of their own on the access
logger takes the ordinary path (one ``LogRecord`` per line); only the handler this
module installs gets the line without a record.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import threading
import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _q
from typing import Final, TextIO

__all__ = [
    "BufferedLineHandler",
    "ExchangeRecord",
    "configure_logging",
    "flush_logs",
    "log_exchange",
]

access_logger: Final = logging.getLogger("proxycore.access")
error_logger: Final = logging.getLogger("proxycore.error")

#: Bytes held before a write (lines are written as they fit in WRITE_MAX each).
CAPACITY: Final = 64 * 1024
#: The oldest held line is written at most this long after it was logged (seconds).
INTERVAL: Final = 0.2
#: One write never exceeds this (unless one line is longer): atomic on a pipe.
WRITE_MAX: Final = getattr(select, "PIPE_BUF", 4096)
#: The formatter of the installed handler: the bare message (the line as given).
_BARE: Final = logging.Formatter("%(message)s")

_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


class BufferedLineHandler(logging.Handler):
    """A logging handler that writes its lines in batches (see the module docstring).

    ``stream`` is a text stream (default ``sys.stderr`` at the time of each write).
    The flusher thread is a daemon started with the first held line (again in a
    forked child); it sleeps while nothing is held.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        capacity: int = CAPACITY,
        interval: float = INTERVAL,
        write_max: int = WRITE_MAX,
    ) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self.interval = interval
        self.write_max = max(1, write_max)
        self._lines: list[str] = []
        self._held = 0
        self._deadline = 0.0
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._thread_pid = 0
        self.setFormatter(_BARE)

    @property
    def held_bytes(self) -> int:
        """Bytes of lines held, not yet written."""
        return self._held

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._add(line)

    def add_line(self, line: str) -> None:
        """Hold ``line`` (no newline) without a ``LogRecord``: the access log's fast path."""
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._add(line)

    def _add(self, line: str) -> None:  # under self.lock
        now = time.monotonic()
        if not self._lines:
            self._deadline = now + self.interval
            self._start_flusher()
        self._lines.append(line)
        self._held += len(line) + 1
        if self._held >= self.capacity or now >= self._deadline or self._closed:
            self._write_held()

    def _start_flusher(self) -> None:
        if self._closed or self.interval <= 0:
            return
        pid = os.getpid()
        if self._thread is None or self._thread_pid != pid:
            self._thread_pid = pid
            self._wake = threading.Event()
            self._thread = threading.Thread(
                target=self._flusher, name="proxycore-access-log", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def _flusher(self) -> None:
        wake = self._wake
        while not self._closed:
            wake.wait()
            wake.clear()
            while not self._closed:
                delay = self._deadline - time.monotonic()
                if delay <= 0:
                    break
                time.sleep(min(delay, self.interval))
            self.flush()

    def _write_held(self) -> None:  # under self.lock
        lines, self._lines, self._held = self._lines, [], 0
        stream = self.stream if self.stream is not None else sys.stderr
        batch: list[str] = []
        size = 0
        try:
            for line in lines:
                n = len(line) + 1
                if batch and size + n > self.write_max:
                    stream.write("\n".join(batch) + "\n")
                    stream.flush()
                    batch, size = [], 0
                batch.append(line)
                size += n
            if batch:
                stream.write("\n".join(batch) + "\n")
                stream.flush()
        except Exception:  # like StreamHandler: report (logging.raiseExceptions), go on
            self.handleError(logging.makeLogRecord({"msg": "access log write failed"}))

    def flush(self) -> None:
        """Write every held line now."""
        with self.lock:  # type: ignore[union-attr]
            if self._lines:
                self._write_held()

    def close(self) -> None:
        """Write what is held and stop the flusher (``logging.shutdown`` calls this)."""
        with self.lock:  # type: ignore[union-attr]
            self._closed = True
            if self._lines:
                self._write_held()
        self._wake.set()  # the flusher sees _closed and ends (not joined: it may be
        super().close()  # waiting for this lock, which logging.shutdown holds here)


def flush_logs() -> None:
    """Write every access line held in memory (the runner calls this after the drain)."""
    for handler in access_logger.handlers:
        handler.flush()


@dataclass(slots=True)
class ExchangeRecord:
    """What the access log says about one exchange; filled in as it runs."""

    request_id: str = ""
    method: str = ""
    path: str = ""
    client: str = ""
    route: str = ""
    upstream: str = ""
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = 0.0
    ttfb: float | None = None
    duration: float = 0.0
    outcome: str = "complete"
    #: Upstream failure kind for metrics (connect, timeout, reset, protocol), or "".
    error_kind: str = ""
    #: What went wrong in full (e.g. the upstream address a connect failed on), or "":
    #: logged only, never sent to the client (``ProxyError.detail``).
    detail: str = ""
    #: Every try of an exchange that went to more than one upstream: (upstream, outcome).
    attempts: list[tuple[str, str]] | None = None

    def as_json(self) -> str:
        """The access line: the same JSON as ``json.dumps`` of the fields in this order
        (compact separators, ASCII escapes), built without the dict."""
        ttfb = "null" if self.ttfb is None else repr(round(self.ttfb * 1000, 3))
        line = (
            f'{{"time":{round(time.time(), 6)!r},"pid":{_pid},'
            f'"request_id":{_q(self.request_id)},"client":{_q(self.client)},'
            f'"method":{_q(self.method)},"path":{_q(self.path)},"route":{_q(self.route)},'
            f'"upstream":{_q(self.upstream)},"status":{int(self.status)},'
            f'"bytes_in":{int(self.bytes_in)},"bytes_out":{int(self.bytes_out)},'
            f'"ttfb_ms":{ttfb},"duration_ms":{round(self.duration * 1000, 3)!r},'
            f'"outcome":{_q(self.outcome)}'
        )
        if self.detail:
            line += f',"detail":{_q(self.detail)}'
        if self.attempts:
            attempts = [{"upstream": u, "outcome": o} for u, o in self.attempts]
            line += ',"attempts":' + json.dumps(attempts, separators=(",", ":"))
        return line + "}"


def log_exchange(record: ExchangeRecord) -> None:
    """Log ``record``'s line: straight into the installed buffer when nothing else
    (another handler, a filter, a formatter, propagation) would see the record."""
    if not access_logger.isEnabledFor(logging.INFO):
        return
    handlers = access_logger.handlers
    if len(handlers) == 1 and not access_logger.propagate and not access_logger.filters:
        handler = handlers[0]
        if (
            type(handler) is BufferedLineHandler
            and handler.formatter is _BARE
            and not handler.filters
            and handler.level <= logging.INFO
        ):
            handler.add_line(record.as_json())
            return
    access_logger.info(record.as_json())


def configure_logging(level: str = "info", *, access: bool = True) -> None:
    """Send proxycore's logs to stderr: access lines as bare JSON (buffered: see the
    module docstring), others prefixed, each as it comes."""
    for old in access_logger.handlers:
        old.flush()
    handler = BufferedLineHandler()
    access_logger.handlers[:] = [handler]
    access_logger.propagate = False
    access_logger.setLevel(logging.INFO if access else logging.WARNING)
    root = logging.getLogger("proxycore")
    if not root.handlers:
        other = logging.StreamHandler(sys.stderr)
        other.setFormatter(logging.Formatter("proxycore %(levelname)s %(name)s: %(message)s"))
        root.addHandler(other)
    root.setLevel(level.upper())
