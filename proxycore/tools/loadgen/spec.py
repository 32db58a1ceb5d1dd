"""What a load run sends (:class:`LoadSpec`), what it reports while running
(:class:`LoadProgress`) and what it measured (:class:`LoadResult`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Final, Literal

import h11

from ..hdr import Histogram
from ..loadgen.llm import FORMATS, StreamFormat

__all__ = [
    "ERROR_KINDS",
    "LoadProgress",
    "LoadResult",
    "LoadSpec",
    "build_request",
    "tps_summary",
]

#: Every kind a failed request is counted under in ``LoadResult.error_kinds``:
#: ``tls`` a failed TLS handshake; ``incomplete`` a token stream that ended without its
#: terminator; ``stream_error`` a token stream that carried an error event; ``jsonrpc``
#: an MCP call answered with a JSON-RPC error (by code in ``LoadResult.rpc_errors``).
ERROR_KINDS: Final = (
    "connect",
    "tls",
    "timeout",
    "status_5xx",
    "status_4xx",
    "reset",
    "protocol",
    "incomplete",
    "stream_error",
    "jsonrpc",
)

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
    #: Seconds allowed per request, connect included (open model: from the intended start).
    timeout: float = 60.0
    #: HTTPS: TLS on every connection, verified against ``ca_file`` (else the system
    #: store) for ``sni`` (else ``host``), unless ``insecure``.
    tls: bool = False
    ca_file: str | None = None
    insecure: bool = False
    sni: str | None = None
    #: Parse the body as a token stream of this format (TTFT, ITL, tokens).
    stream: StreamFormat | None = None
    #: A body per request: ``{n}`` becomes the request number, ``{rand}`` 16 random hex
    #: digits (replaces ``body``).
    body_template: str | None = None
    #: MCP: call this JSON-RPC method over Streamable HTTP (POST to ``path``) in a loop,
    #: each slot a virtual user with its own session; ``mcp_params`` is a JSON object.
    mcp_method: str | None = None
    mcp_params: str | None = None

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
        if self.stream is not None and self.stream not in FORMATS:
            problems.append(f"stream must be one of {', '.join(FORMATS)}")
        if self.sni is not None and not self.sni:
            problems.append("sni is empty")
        if (self.ca_file or self.insecure or self.sni) and not self.tls:
            problems.append("ca_file, insecure and sni need tls (an https:// URL)")
        if self.mcp_method is not None:
            if not self.mcp_method or self.mcp_method.startswith("notifications/"):
                problems.append("mcp_method must name a request method (not a notification)")
            if self.stream is not None:
                problems.append("mcp_method and stream cannot be combined")
            if self.body or self.body_template is not None:
                problems.append("mcp_method builds its own bodies (no body or body_template)")
        if self.mcp_params is not None:
            try:
                params = json.loads(self.mcp_params)
            except ValueError:
                params = None
            if not isinstance(params, dict):
                problems.append("mcp_params must be a JSON object")
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

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.authority}{self.path}"


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
    #: Token streams: time to the first content delta, gaps between deltas.
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)
    #: Output tokens per second of each successful stream (tokens / its latency).
    stream_tps: list[float] = field(default_factory=list)
    output_tokens: int = 0
    #: Successful streams whose tokens came from their usage / from counting deltas.
    usage_streams: int = 0
    counted_streams: int = 0
    #: Open model: how long each request waited for a free slot after its intended start.
    queue: Histogram = field(default_factory=Histogram)
    #: MCP: initialize exchanges made, sessions re-initialized after a 404, error codes.
    mcp_initializations: int = 0
    mcp_reinitializations: int = 0
    rpc_errors: dict[str, int] = field(default_factory=dict)
    #: The generator's own CPU seconds during the run (user + system, this process).
    cpu_seconds: float = 0.0

    @property
    def cpu_share(self) -> float:
        """The generator's CPU time over the run's wall time (1.0 = one core busy)."""
        return self.cpu_seconds / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Output tokens of successful streams per second of the run (aggregate)."""
        return self.output_tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def error_rate(self) -> float:
        """Failed requests (dropped arrivals included) over all requests due."""
        due = self.started + self.dropped
        return (self.errors + self.dropped) / due if due else 0.0

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
                "tls": spec.tls,
                "ca_file": spec.ca_file,
                "insecure": spec.insecure,
                "sni": spec.sni,
                "stream": spec.stream,
                "body_template": spec.body_template is not None,
                "mcp_method": spec.mcp_method,
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
            "ttft": self.ttft.summary_ms(),
            "itl": self.itl.summary_ms(),
            "queue": self.queue.summary_ms(),
            "stream_tps": tps_summary(self.stream_tps),
            "output_tokens": self.output_tokens,
            "tokens_source": {"usage": self.usage_streams, "counted": self.counted_streams},
            "tokens_per_s": self.tokens_per_s,
            "error_rate": self.error_rate,
            "mcp": {
                "initializations": self.mcp_initializations,
                "reinitializations": self.mcp_reinitializations,
                "rpc_errors": dict(self.rpc_errors),
            },
            "cpu_seconds": self.cpu_seconds,
            "cpu_share": self.cpu_share,
        }


def tps_summary(values: list[float]) -> dict[str, float]:
    """p50, p90, p99, min, mean and count of per-stream tokens/s (nearest rank; the
    slow tail of a rate is its low end, hence min)."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "min": 0.0, "mean": 0.0, "count": 0.0}
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[max(1, math.ceil(q * n / 100.0)) - 1]

    return {
        "p50": rank(50.0),
        "p90": rank(90.0),
        "p99": rank(99.0),
        "min": ordered[0],
        "mean": sum(ordered) / n,
        "count": float(n),
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
        default = 443 if spec.tls else 80
        headers.append(
            ("Host", spec.authority.rsplit(":", 1)[0] if spec.port == default else spec.authority)
        )
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
