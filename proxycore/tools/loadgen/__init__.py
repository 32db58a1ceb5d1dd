"""The load generator engine: HTTP/1.1 over raw non-blocking sockets, driven by trio.

:func:`run_load` drives a :class:`LoadSpec` against any HTTP/1.1 server and returns
a :class:`LoadResult` of counters and :class:`~proxycore.tools.hdr.Histogram` timings.

Models:

* **closed** (``rate`` is None): ``concurrency`` slots each send a request, wait for
  the whole response, and send the next, until ``requests`` have been started or
  ``duration`` has passed.
* **open** (``rate`` set): requests are due at ``rate`` per second (uniform or
  Poisson arrivals) by one dispatcher; ``concurrency`` is the most in flight. An
  arrival that finds every slot busy waits in a queue, and every timing of an
  open-model request runs from its *intended* start (no coordinated omission, as
  wrk2): a stalled server shows up as latency, and ``queue`` records the waits. A
  request is due by its intended start + ``timeout``; an arrival still queued past
  that is never sent and counted in ``dropped``.

Each slot owns one connection (reused when ``keepalive``; with ``keepalive=False``
every request opens a fresh one and sends ``Connection: close``). A reused
connection that turns out dead before any response byte (the server's keep-alive
timeout raced us) is retried once on a fresh connection, as a browser would.

HTTP: the request is built, validated and serialized once by h11 (so it is always
well-formed) and those bytes are sent for every request. Responses are read by a
small parser here, not by h11: the status line, the framing fields
(Content-Length, Transfer-Encoding, Connection) and the body framing (length;
chunked, through the project's strict :class:`~proxycore.http.chunked.ChunkedScanner`;
until close; none for HEAD, 1xx, 204 and 304). Other fields are skipped: a load
generator is no gatekeeper. Measured against nginx on one core, h11 response
parsing made ~256 us of CPU per keep-alive request (about 3.8k requests/s, below
the proxy it is meant to measure); this reader makes ~95 us, mostly syscalls and
trio's wake-ups.

What is measured (closed model: from the moment the request bytes were handed to the
kernel; open model: from the request's intended start):

* ``ttfb``: to the first response byte (taken before anything is parsed);
* ``latency``: to the end of the response body;
* ``first_event`` (``sse``): to the receipt of the chunk completing the first SSE
  event that has a ``data:`` field;
* ``event_delay`` (``sse``): per SSE event whose data carries ``"t_ns": <int>``
  (``time.time_ns()`` at the sender), ``time.time_ns()`` when the chunk holding
  it was received minus ``t_ns``. Same clock only when sender and generator share
  a host. Events without ``t_ns`` (such as ``proxycore.tools.sim``'s final ``done``) are
  counted in ``events`` but give no delay sample.
* ``connect``: TCP connect (and TLS handshake) time of every connection opened.
* ``stream`` (``openai``, ``anthropic``, ``sse``; :mod:`.llm`): ``ttft`` to the first
  non-empty content delta, ``itl`` between consecutive deltas, output tokens (the
  stream's usage if it has one, else the deltas counted: ``usage_streams`` /
  ``counted_streams``), tokens/s per stream (``stream_tps``: tokens over the stream's
  latency) and in aggregate. A stream that ends without its terminator (``[DONE]``,
  ``message_stop``) is an error (``incomplete``), one with an error event too
  (``stream_error``).
* ``mcp_method`` (:mod:`.mcp`): each slot is an MCP virtual user (initialize once,
  ``notifications/initialized``, then the method in a loop with its session id);
  ``latency`` per call, JSON-RPC errors by code (``rpc_errors``), sessions
  re-initialized after a 404 (``mcp_reinitializations``).
* ``cpu_seconds``: the generator process's own CPU time (``cpu_share`` of one core).

HTTPS (``tls``): each connection is a TLS stream verified against ``ca_file`` or the
system store for ``sni`` (else the host), unless ``insecure``; kept alive as over TCP.

``ttfb``, ``latency`` and ``first_event`` are recorded only for successful
(non-4xx/5xx, complete) responses, so fast error replies never flatter them.
``event_delay``, ``events`` and ``body_bytes`` count everything received.

Errors never escape :func:`run_load` (only cancellation does): each failed request
is counted under one kind of :data:`ERROR_KINDS`. Everything is bounded: a run
ends after ``requests`` starts or ``duration`` seconds, and every request
(connect included) is cut after ``timeout`` seconds, so a run lasts at most about
``duration + timeout`` (or ``ceil(requests / concurrency) * timeout``).

Modules: ``spec`` (what to send and what was measured), ``wire`` (one slot's socket and the
response-head parser), ``exchange`` (connect, TLS, one request and its response),
``engine`` (the models, the request cycle per mode and :func:`run_load`), ``bodies``
(request bytes, templates), ``llm`` (token-stream parsers), ``mcp`` (JSON-RPC, sessions),
``figures`` (figures by name, merging rounds), ``compare`` (interleaved rounds, ratios),
``thresholds`` (``--fail-if``), ``report`` (rows, Markdown, JSON), ``console`` (rich
output), ``charts`` (``--png``). The full reference is docs/loadtest.md.
"""

from __future__ import annotations

from ..loadgen.engine import run_load
from ..loadgen.spec import ERROR_KINDS, LoadProgress, LoadResult, LoadSpec

__all__ = ["ERROR_KINDS", "LoadProgress", "LoadResult", "LoadSpec", "run_load"]
