"""Transcript files: one JSON line per SSE stream, appended by a writer task.

Streams hand their line to a bounded queue and never wait: if the disk is so
slow that the queue is full, the line is dropped and counted (and logged), so a
slow disk never stalls a stream. The queue is bounded twice: at most
``QUEUE_LINES`` lines per transcript file, and at most ``QUEUE_BYTES`` bytes of
lines waiting or being written, all files together (one line can be several
MiB: ``transcript_max_bytes`` of events, JSON-escaped). A line larger than
``QUEUE_BYTES`` is always dropped. The writer appends in a worker thread
(``trio.to_thread``) so the event loop never blocks on the disk.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Final

import trio

__all__ = ["QUEUE_BYTES", "QUEUE_LINES", "TranscriptWriters", "append_line"]

log: Final = logging.getLogger("proxycore.transcript")

QUEUE_LINES: Final = 256
#: The bytes of queued (and in-write) transcript lines, all files together.
QUEUE_BYTES: Final = 64 * 1024 * 1024


def append_line(path: str, line: bytes) -> None:
    """Append ``line`` to ``path`` (created ``0600``) with one ``write``; blocking, so the
    writer task runs it in a worker thread. Raises ``OSError``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class _Writer:
    def __init__(self, path: str, owner: TranscriptWriters) -> None:
        self.path = path
        self.owner = owner
        self.send, self._receive = trio.open_memory_channel[bytes](QUEUE_LINES)
        self.dropped = 0

    async def run(self) -> None:
        async for line in self._receive:
            try:
                await trio.to_thread.run_sync(append_line, self.path, line)
            except OSError as exc:
                log.error("cannot append to transcript %s: %s", self.path, exc.strerror or exc)
            finally:
                self.owner.queued_bytes -= len(line)


class TranscriptWriters:
    """One writer task per transcript path, started on first use in ``nursery``."""

    def __init__(self, max_bytes: int = QUEUE_BYTES) -> None:
        self._writers: dict[str, _Writer] = {}
        self.nursery: trio.Nursery | None = None
        #: Bytes of lines queued or being written (bounded by ``max_bytes``).
        self.queued_bytes = 0
        self.max_bytes = max_bytes

    def submit(self, path: str, record: dict[str, object]) -> bool:
        """Queue one JSON line for ``path``; False if it had to be dropped."""
        writer = self._writers.get(path)
        if writer is None:
            if self.nursery is None:
                log.error("no task to write transcript %s; line dropped", path)
                return False
            writer = self._writers[path] = _Writer(path, self)
            self.nursery.start_soon(writer.run)
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        if self.queued_bytes + len(line) > self.max_bytes:
            return self._drop(writer, f"over {self.max_bytes} bytes queued")
        try:
            writer.send.send_nowait(line)
        except trio.WouldBlock:
            return self._drop(writer, f"{QUEUE_LINES} lines queued")
        self.queued_bytes += len(line)
        return True

    @staticmethod
    def _drop(writer: _Writer, why: str) -> bool:
        writer.dropped += 1
        log.warning(
            "transcript %s: writer behind (%s), line dropped (%d so far)",
            writer.path,
            why,
            writer.dropped,
        )
        return False
