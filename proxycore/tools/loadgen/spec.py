"""What a load run sends (:class:`LoadSpec`), what it reports while running
(:class:`LoadProgress`) and what it measured (:class:`LoadResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Literal

import h11

from ..hdr import Histogram

__all__ = ["ERROR_KINDS", "LoadProgress", "LoadResult", "LoadSpec", "build_request"]

#: Every kind a failed request is counted under in ``LoadResult.error_kinds``.
ERROR_KINDS: Final = ("connect", "timeout", "status_5xx", "status_4xx", "reset", "protocol")

#: Headers whose values are replaced by "<redacted>" in ``LoadResult.to_json``.
_SECRET_HINTS: Final = ("auth", "cookie", "token", "key", "secret", "password")
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True)
class LoadSpec:
    """What to send, how much, and how. Validated on construction (ValueError)."""

    host: str
    port: int
    path: str = "/"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    #: Connections (closed model) or most requests in flight (open model).
    concurrency: int = 10
    #: Stop after starting this many requests (open model: arrivals, dropped included).
    requests: int | None = None
    #: ... or stop starting new ones after this many seconds (in-flight ones finish).
    duration: float | None = None
    #: Open model: start this many requests per second.
    rate: float | None = None
    #: Open-model arrival process: evenly spaced, or Poisson (exponential gaps).
    arrivals: Literal["uniform", "poisson"] = "uniform"
    keepalive: bool = True
    #: Parse the body as Server-Sent Events (first_event, event_delay, events).
    sse: bool = False
    #: Read each response at most this many bytes per second (a slow reader).
    read_rate: int | None = None
    #: Seconds allowed per request, connect included.
    timeout: float = 60.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.host:
            problems.append("host is empty")
        if not 0 < self.port < 65536:
            problems.append("port must be within 1..65535")
        if not self.path.startswith("/"):
            problems.append("path must start with '/'")
        if self.concurrency < 1:
            problems.append("concurrency must be at least 1")
        if self.requests is None and self.duration is None:
            problems.append("give requests or duration (or both): a run must be bounded")
        if self.requests is not None and self.requests < 1:
            problems.append("requests must be at least 1")
        for name in ("duration", "rate", "timeout"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0")
        if self.read_rate is not None and self.read_rate < 1:
            problems.append("read_rate must be at least 1 byte/s")
        if self.arrivals not in ("uniform", "poisson"):
            problems.append("arrivals must be 'uniform' or 'poisson'")
        if not problems:
            try:
                build_request(self)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class LoadProgress:
    """A snapshot of a run, given to the ``progress`` callback. Times in seconds."""

    elapsed: float
    started: int
    ok: int
    errors: int
    dropped: int
    in_flight: int
    ttfb_p50: float
    ttfb_p99: float

    @property
    def done(self) -> int:
        return self.ok + self.errors

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class LoadResult:
    """What a run measured. Histograms hold seconds; ``to_json`` reports milliseconds."""

    spec: LoadSpec
    ok: int
    errors: int
    dropped: int
    #: Failed requests by kind (only kinds that occurred), see ERROR_KINDS.
    error_kinds: dict[str, int]
    elapsed: float
    ttfb: Histogram
    latency: Histogram
    first_event: Histogram
    event_delay: Histogram
    body_bytes: int
    #: SSE events received that had a data field (with or without t_ns).
    events: int
    #: Requests started (ok + errors); open-model arrivals that were dropped are not.
    started: int = 0
    #: TCP connections opened successfully.
    connections: int = 0
    connect: Histogram = field(default_factory=Histogram)

    @property
    def rps(self) -> float:
        """Successful responses per second of the run."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def throughput(self) -> float:
        """Response body bytes per second of the run."""
        return self.body_bytes / self.elapsed if self.elapsed > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        """Everything, JSON-ready: timings as ``summary_ms`` dicts (milliseconds).

        Header values that look like credentials are redacted; the request body is
        reported by its length only.
        """
        spec = self.spec
        return {
            "spec": {
                "host": spec.host,
                "port": spec.port,
                "path": spec.path,
                "method": spec.method,
                "headers": [[name, _redact(name, value)] for name, value in spec.headers],
                "body_bytes": len(spec.body),
                "concurrency": spec.concurrency,
                "requests": spec.requests,
                "duration": spec.duration,
                "rate": spec.rate,
                "arrivals": spec.arrivals,
                "keepalive": spec.keepalive,
                "sse": spec.sse,
                "read_rate": spec.read_rate,
                "timeout": spec.timeout,
            },
            "ok": self.ok,
            "errors": self.errors,
            "dropped": self.dropped,
            "started": self.started,
            "connections": self.connections,
            "error_kinds": dict(self.error_kinds),
            "elapsed": self.elapsed,
            "rps": self.rps,
            "throughput": self.throughput,
            "body_bytes": self.body_bytes,
            "events": self.events,
            "ttfb": self.ttfb.summary_ms(),
            "latency": self.latency.summary_ms(),
            "first_event": self.first_event.summary_ms(),
            "event_delay": self.event_delay.summary_ms(),
            "connect": self.connect.summary_ms(),
        }


def _redact(name: str, value: str) -> str:
    lowered = name.lower()
    return "<redacted>" if any(hint in lowered for hint in _SECRET_HINTS) else value


def build_request(spec: LoadSpec) -> bytes:
    """The request bytes sent on every cycle: built, validated and serialized once by h11."""
    names = {name.lower() for name, _ in spec.headers}
    if "transfer-encoding" in names:
        raise ValueError("Transfer-Encoding is not supported: the body is sent with Content-Length")
    for name, value in spec.headers:
        if name.lower() == "content-length" and value.strip() != str(len(spec.body)):
            raise ValueError(f"Content-Length {value!r} does not match the body ({len(spec.body)})")
    headers: list[tuple[str, str]] = []
    if "host" not in names:
        headers.append(("Host", spec.authority))
    if "user-agent" not in names:
        headers.append(("User-Agent", "proxycore-loadtest"))
    headers.extend(spec.headers)
    if "content-length" not in names and (spec.body or spec.method.upper() in _BODY_METHODS):
        headers.append(("Content-Length", str(len(spec.body))))
    if not spec.keepalive and "connection" not in names:
        headers.append(("Connection", "close"))
    conn = h11.Connection(h11.CLIENT)
    try:
        wire = conn.send(h11.Request(method=spec.method, target=spec.path, headers=headers)) or b""
        if spec.body:
            wire += conn.send(h11.Data(data=spec.body)) or b""
        return wire + (conn.send(h11.EndOfMessage()) or b"")
    except h11.LocalProtocolError as exc:
        raise ValueError(f"invalid request: {exc}") from None
