"""The buffered access log: lines are held and written in batches of whole lines, by
size, by a short timer, on flush and on close; nothing is lost, order is kept, and an
embedder's own logging setup still sees every line. No speed is asserted."""

from __future__ import annotations

import io
import json
import logging
import time
import weakref
from collections.abc import Iterator

import pytest

from proxycore.observe.accesslog import (
    BufferedLineHandler,
    ExchangeRecord,
    access_logger,
    configure_logging,
    flush_logs,
    log_exchange,
)

#: Long enough that the timer never fires during a test that does not wait for it.
NEVER = 3600.0


class RecordingStream(io.StringIO):
    """A text stream that keeps each ``write`` call's text."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    """configure_logging changes global loggers: put them back after the test."""
    root = logging.getLogger("proxycore")
    saved = (
        access_logger.handlers[:],
        access_logger.level,
        access_logger.propagate,
        access_logger.filters[:],
        root.handlers[:],
        root.level,
    )
    try:
        yield
    finally:
        for handler in access_logger.handlers:
            if handler not in saved[0]:
                handler.close()
        access_logger.handlers[:] = saved[0]
        access_logger.setLevel(saved[1])
        access_logger.propagate = saved[2]
        access_logger.filters[:] = saved[3]
        root.handlers[:] = saved[4]
        root.setLevel(saved[5])


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(f"test.accesslog.{name}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def _line(i: int) -> str:
    return json.dumps({"request_id": f"req-{i:05d}", "pad": "x" * 200})


def test_lines_are_held_then_all_written_in_order_on_flush() -> None:
    stream = RecordingStream()
    handler = BufferedLineHandler(stream, interval=NEVER)
    logger = _logger(handler, "order")
    lines = [_line(i) for i in range(100)]  # ~22 KB: under the 64 KiB capacity
    for line in lines:
        logger.info(line)
    assert stream.writes == [], "a line was written per request"
    assert handler.held_bytes == sum(len(line) + 1 for line in lines)

    handler.flush()
    assert stream.getvalue() == "".join(line + "\n" for line in lines)
    assert handler.held_bytes == 0
    # Whole lines, at most PIPE_BUF bytes per write: far fewer writes than lines.
    assert len(stream.writes) < len(lines) // 5
    for chunk in stream.writes:
        assert chunk.endswith("\n")
        assert len(chunk.encode()) <= handler.write_max
    handler.close()


def test_capacity_writes_without_waiting_for_the_timer() -> None:
    stream = RecordingStream()
    handler = BufferedLineHandler(stream, capacity=2000, interval=NEVER, write_max=700)
    logger = _logger(handler, "capacity")
    lines = [_line(i) for i in range(30)]
    for line in lines:
        logger.info(line)
    assert stream.writes, "nothing written although the capacity was passed"
    assert handler.held_bytes < 2000
    written = stream.getvalue().splitlines()
    assert written == lines[: len(written)]
    # Each write is a run of whole lines within write_max (one line alone may exceed it).
    for chunk in stream.writes:
        assert chunk.endswith("\n")
        assert len(chunk) <= 700 or chunk.count("\n") == 1
    handler.flush()
    assert stream.getvalue().splitlines() == lines
    handler.close()


def test_timer_writes_lines_of_an_idle_buffer() -> None:
    stream = RecordingStream()
    handler = BufferedLineHandler(stream, interval=0.05)
    logger = _logger(handler, "timer")
    logger.info("one")
    logger.info("two")
    deadline = time.monotonic() + 30  # a bound that only tells "written" from "never"
    while stream.getvalue() != "one\ntwo\n":
        assert time.monotonic() < deadline, "the timer never wrote the held lines"
        time.sleep(0.01)
    # and again for a second batch, after the buffer went empty
    logger.info("three")
    while not stream.getvalue().endswith("three\n"):
        assert time.monotonic() < deadline, "the timer never wrote the second batch"
        time.sleep(0.01)
    handler.close()


def test_a_line_after_the_deadline_writes_the_batch_without_the_thread() -> None:
    stream = RecordingStream()
    handler = BufferedLineHandler(stream, interval=0.0)  # deadline already passed
    logger = _logger(handler, "deadline")
    logger.info("a")
    logger.info("b")
    assert stream.getvalue() == "a\nb\n"
    handler.close()


def test_close_writes_what_is_held_and_later_lines_go_straight_out() -> None:
    stream = RecordingStream()
    handler = BufferedLineHandler(stream, interval=NEVER)
    logger = _logger(handler, "close")
    logger.info("held")
    assert stream.getvalue() == ""
    handler.close()  # what logging.shutdown does at exit
    assert stream.getvalue() == "held\n"
    handler.emit(logging.makeLogRecord({"msg": "late"}))
    assert stream.getvalue() == "held\nlate\n"


def test_logging_shutdown_writes_held_lines() -> None:
    stream = RecordingStream()
    handler = BufferedLineHandler(stream, interval=NEVER)
    logger = _logger(handler, "shutdown")
    logger.info("at exit")
    logging.shutdown([weakref.ref(handler)])
    assert stream.getvalue() == "at exit\n"


def _record(i: int, **extra: object) -> ExchangeRecord:
    rec = ExchangeRecord(
        request_id=f"req-{i}",
        method="GET",
        path='/v1/caf\u00e9/"quoted"\\back\nline\t\x01',
        client="127.0.0.1",
        route="/",
        upstream="http://127.0.0.1:9/",
        status=200,
        bytes_in=0,
        bytes_out=100,
        ttfb=0.000312,
        duration=0.0012345,
    )
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def _reference(rec: ExchangeRecord, line: dict[str, object]) -> str:
    """What the access line was before: json.dumps of the fields, compact."""
    fields: dict[str, object] = {
        "time": line["time"],
        "pid": line["pid"],
        "request_id": rec.request_id,
        "client": rec.client,
        "method": rec.method,
        "path": rec.path,
        "route": rec.route,
        "upstream": rec.upstream,
        "status": rec.status,
        "bytes_in": rec.bytes_in,
        "bytes_out": rec.bytes_out,
        "ttfb_ms": None if rec.ttfb is None else round(rec.ttfb * 1000, 3),
        "duration_ms": round(rec.duration * 1000, 3),
        "outcome": rec.outcome,
    }
    if rec.detail:
        fields["detail"] = rec.detail
    if rec.attempts:
        fields["attempts"] = [{"upstream": u, "outcome": o} for u, o in rec.attempts]
    return json.dumps(fields, separators=(",", ":"))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"ttfb": None, "outcome": "client_gone", "status": 0},
        {"detail": "connect to 127.0.0.1:9 failed: \u2603 refused"},
        {"attempts": [("http://a:1/", "upstream_connect"), ("http://b:2/", "complete")]},
    ],
    ids=["complete", "no-ttfb", "detail", "attempts"],
)
def test_access_line_is_the_json_it_always_was(extra: dict[str, object]) -> None:
    rec = _record(1, **extra)
    text = rec.as_json()
    line = json.loads(text)
    assert text == _reference(rec, line)
    assert text.isascii()


def test_log_exchange_goes_straight_to_the_installed_buffer(
    restore_loggers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_logging("warning", access=True)
    (handler,) = access_logger.handlers
    assert isinstance(handler, BufferedLineHandler)
    stream = RecordingStream()
    handler.stream = stream
    made: list[str] = []
    make_record = access_logger.makeRecord

    def counting(*args: object, **kwargs: object) -> logging.LogRecord:
        made.append("record")
        return make_record(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(access_logger, "makeRecord", counting)
    for i in range(50):
        log_exchange(_record(i))
    assert stream.writes == []
    flush_logs()
    ids = [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]
    assert ids == [f"req-{i}" for i in range(50)]
    assert not made, "a LogRecord was made per line"


def test_an_embedders_filter_or_handler_still_sees_every_line(restore_loggers: None) -> None:
    configure_logging("warning", access=True)
    (ours,) = access_logger.handlers
    assert isinstance(ours, BufferedLineHandler)
    our_stream = RecordingStream()
    ours.stream = our_stream
    seen: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record.getMessage())
        return True

    access_logger.addFilter(keep)  # the fast path must step aside
    log_exchange(_record(1))
    access_logger.removeFilter(keep)
    theirs = logging.StreamHandler(io.StringIO())
    access_logger.addHandler(theirs)  # a second handler: the record goes to both
    log_exchange(_record(2))
    flush_logs()
    assert [json.loads(s)["request_id"] for s in seen] == ["req-1"]
    assert isinstance(theirs.stream, io.StringIO)
    assert json.loads(theirs.stream.getvalue())["request_id"] == "req-2"
    ours_lines = our_stream.getvalue().splitlines()
    assert [json.loads(x)["request_id"] for x in ours_lines] == ["req-1", "req-2"]


def test_access_log_off_logs_nothing(restore_loggers: None) -> None:
    configure_logging("warning", access=False)
    (handler,) = access_logger.handlers
    assert isinstance(handler, BufferedLineHandler)
    stream = RecordingStream()
    handler.stream = stream
    log_exchange(_record(1))
    flush_logs()
    assert stream.getvalue() == ""
