"""LLM token streams: an SSE splitter and the per-request :class:`TokenStream` that reads
OpenAI-style, Anthropic-style or plain SSE streams and times their content deltas.

Formats (``--stream``):

* ``openai``: ``data: {...}`` events; a content delta is a non-empty
  ``choices[0].delta.content`` (chat) or ``choices[0].text`` (completions); ``usage``
  (``completion_tokens``) when an event carries it; the terminator is ``data: [DONE]``.
* ``anthropic``: the event type is the ``event:`` field (else the data's ``type``);
  a content delta is a ``content_block_delta`` with a non-empty ``delta.text`` (or
  ``delta.thinking``); usage is ``message_delta``'s ``usage.output_tokens``; the
  terminator is ``message_stop``; an ``error`` event fails the stream.
* ``sse``: every event with a non-empty data field is a delta; no usage; the stream is
  complete when its body is (no terminator event).

Pure: no trio, no I/O. Times are whatever clock the caller passes (seconds).
"""

from __future__ import annotations

import json
from typing import Final, Literal

__all__ = ["FORMATS", "MAX_EVENT_BYTES", "SSESplitter", "StreamFormat", "TokenStream"]

StreamFormat = Literal["openai", "anthropic", "sse"]
FORMATS: Final[tuple[StreamFormat, ...]] = ("openai", "anthropic", "sse")
#: An event larger than this (no blank line in sight) is dropped unparsed.
MAX_EVENT_BYTES: Final = 1024 * 1024


class SSESplitter:
    """Splits a body into SSE events: ``(event type, data)`` pairs (data lines joined
    with LF, comments and other fields skipped, CRLF/CR line ends accepted). An event
    without a data field is not returned."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes]]:
        pending = self.pending
        pending += data
        if b"\r" in pending:
            tail = pending.endswith(b"\r")  # maybe the first half of a CRLF: keep it
            lines = pending[:-1] if tail else pending
            pending[:] = lines.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if tail:
                pending += b"\r"
        out: list[tuple[bytes, bytes]] = []
        start = 0
        while (end := pending.find(b"\n\n", start)) != -1:
            kind = b"message"
            data_lines: list[bytes] = []
            for line in bytes(pending[start:end]).split(b"\n"):
                name, _, value = line.partition(b":")
                if value.startswith(b" "):
                    value = value[1:]
                if name == b"data":
                    data_lines.append(value)
                elif name == b"event":
                    kind = value
            if data_lines:
                out.append((kind, b"\n".join(data_lines)))
            start = end + 2
        if start:
            del pending[:start]
        if len(pending) > MAX_EVENT_BYTES:
            pending.clear()
        return out


def _load(data: bytes) -> dict[str, object] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class TokenStream:
    """One streamed response: when each content delta arrived, the usage, the end.

    ``feed(data, now)`` with body bytes as they arrive; then read :attr:`deltas`
    (arrival times of non-empty content deltas), :attr:`usage_tokens` (None if the
    stream carried none), :attr:`terminated` and :attr:`failed`.
    """

    __slots__ = ("deltas", "failed", "format", "splitter", "terminated", "text", "usage_tokens")

    def __init__(self, fmt: StreamFormat, *, keep_text: bool = False) -> None:
        self.format = fmt
        self.splitter = SSESplitter()
        self.deltas: list[float] = []
        self.usage_tokens: int | None = None
        self.terminated = fmt == "sse"
        #: An error event was received (anthropic ``error``, openai ``{"error": ...}``).
        self.failed = False
        #: The streamed text, if ``keep_text``.
        self.text: list[str] | None = [] if keep_text else None

    @property
    def tokens(self) -> int:
        """Output tokens: the stream's usage when it had one, else the deltas counted."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.deltas)

    def feed(self, data: bytes | bytearray | memoryview, now: float) -> None:
        for kind, payload in self.splitter.feed(data):
            if self.format == "openai":
                self._openai(payload, now)
            elif self.format == "anthropic":
                self._anthropic(kind, payload, now)
            elif payload:
                self.deltas.append(now)

    def _delta(self, text: object, now: float) -> None:
        if isinstance(text, str) and text:
            self.deltas.append(now)
            if self.text is not None:
                self.text.append(text)

    def _openai(self, payload: bytes, now: float) -> None:
        if payload.strip() == b"[DONE]":
            self.terminated = True
            return
        event = _load(payload)
        if event is None:
            return
        if event.get("error"):
            self.failed = True
        choices = event.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta.get("content"), now)
            else:
                self._delta(choice.get("text"), now)
        usage = event.get("usage")
        if isinstance(usage, dict):
            tokens = _int(usage.get("completion_tokens"))
            if tokens is not None:
                self.usage_tokens = tokens

    def _anthropic(self, kind: bytes, payload: bytes, now: float) -> None:
        event = _load(payload)
        name = kind.decode("latin-1")
        if name == "message" and event is not None and isinstance(event.get("type"), str):
            name = str(event["type"])
        if name == "message_stop":
            self.terminated = True
        elif name == "error":
            self.failed = True
        elif event is None:
            return
        elif name == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                self._delta(delta.get("text") or delta.get("thinking"), now)
        elif name == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                tokens = _int(usage.get("output_tokens"))
                if tokens is not None:
                    self.usage_tokens = tokens
