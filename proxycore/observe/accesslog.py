"""One JSON line per exchange on the ``proxycore.access`` logger (stderr by default).

Fields never include a credential: the query string is left out (it may carry
API keys), and no header value is logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Final

__all__ = ["ExchangeRecord", "configure_logging", "log_exchange"]

access_logger: Final = logging.getLogger("proxycore.access")
error_logger: Final = logging.getLogger("proxycore.error")


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
        line: dict[str, object] = {
            "time": round(time.time(), 6),
            "pid": os.getpid(),
            "request_id": self.request_id,
            "client": self.client,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "upstream": self.upstream,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "ttfb_ms": None if self.ttfb is None else round(self.ttfb * 1000, 3),
            "duration_ms": round(self.duration * 1000, 3),
            "outcome": self.outcome,
        }
        if self.detail:
            line["detail"] = self.detail
        if self.attempts:
            line["attempts"] = [{"upstream": u, "outcome": o} for u, o in self.attempts]
        return json.dumps(line, separators=(",", ":"))


def log_exchange(record: ExchangeRecord) -> None:
    if access_logger.isEnabledFor(logging.INFO):
        access_logger.info(record.as_json())


def configure_logging(level: str = "info", *, access: bool = True) -> None:
    """Send proxycore's logs to stderr: access lines as bare JSON, others prefixed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.handlers[:] = [handler]
    access_logger.propagate = False
    access_logger.setLevel(logging.INFO if access else logging.WARNING)
    root = logging.getLogger("proxycore")
    if not root.handlers:
        other = logging.StreamHandler(sys.stderr)
        other.setFormatter(logging.Formatter("proxycore %(levelname)s %(name)s: %(message)s"))
        root.addHandler(other)
    root.setLevel(level.upper())
